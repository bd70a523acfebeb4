"""LLaVA-NeXT (LLaVA-1.6) adapter: CLIP tower + MLP projector + Llama, "anyres" tiling.

Image block: N × ``<image>``, but unlike LLaVA-1.5 the number N depends on the image's size.
The image processor picks the best resolution among ``image_grid_pinpoints`` for the
original (H, W), cuts the resized, padded image into tiles of the vision tower's size and
adds a resized "base" tile. The model then

- keeps all patches of the base tile (``(S/p)²``, CLS dropped by the ``default`` strategy),
- stitches the tiles' patches into one grid, **removes the rows/columns that cover the
  padding** (``unpad_image``) and appends one ``image_newline`` token per remaining row.

:meth:`LlavaNextAdapter.num_image_tokens` reproduces transformers'
``LlavaNextProcessor._get_number_of_features`` exactly (same rounding); the model raises
"Image features and image tokens do not match" on any disagreement, which the tests use as
the oracle on several aspect ratios.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fam.backbones.base import BackboneAdapter
from fam.backbones.llava import (LLAVA_SPECIAL_TOKENS, TINY_SIZES, LlavaAdapter,
                                 tiny_llama_tokenizer)
from fam.errors import ConfigError

log = logging.getLogger(__name__)


def _tiny_pinpoints(tile: int) -> list[list[int]]:
    """Anyres resolutions in units of the tile, the same shapes as LLaVA-1.6's defaults.

    LLaVA-1.6 uses ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`` for a
    336-px tower: 1×2, 2×1, 2×2, 3×1 and 1×3 tiles.
    """
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
            [tile, 3 * tile]]


class LlavaNextAdapter(BackboneAdapter):
    """Adapter for ``LlavaNextForConditionalGeneration`` (model_type ``llava_next``)."""

    family = "llava_next"
    model_types = ("llava_next",)
    #: VLM2Vec writes ``<image>`` and its processor expands it (``docs/vlm2vec.md``).
    vlm2vec_image_token = "<image>"

    def __init__(self, model, tokenizer, image_processor, **kwargs: Any):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        self._bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
        cfg = self.config
        proc_pins = getattr(image_processor, "image_grid_pinpoints", None)
        if proc_pins is not None and [list(p) for p in proc_pins] != [list(p) for p in
                                                                      cfg.image_grid_pinpoints]:
            # The processor tiles with its pinpoints, the model unpads with the config's: if they
            # differ, every image whose best resolution differs breaks the token count.
            raise ConfigError(f"image processor image_grid_pinpoints {proc_pins} differ from the "
                              f"model config's {cfg.image_grid_pinpoints}; fix "
                              "preprocessor_config.json or config.json so they agree")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("vision_feature_select_strategy must be 'default' or 'full', got "
                              f"{cfg.vision_feature_select_strategy!r}")

    @classmethod
    def _model_class(cls):
        from transformers import LlavaNextForConditionalGeneration
        return LlavaNextForConditionalGeneration

    @classmethod
    def _image_processor_class(cls):
        # The PIL backend: the default (torchvision) one would pull a CUDA torchvision build.
        from transformers import LlavaNextImageProcessorPil
        return LlavaNextImageProcessorPil

    def bos_ids(self) -> list[int]:
        return self._bos

    def processor_spec(self) -> dict[str, Any]:
        # LlavaNextProcessor counts features with the same anyres rounding as
        # num_image_tokens() (see the module docstring).
        spec = LlavaAdapter.processor_spec(self)
        spec["processor_class"] = "LlavaNextProcessor"
        return spec

    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        return [self.image_token_id] * n_tokens, [True] * n_tokens

    # ------------------------------------------------------------------ token count
    def num_image_tokens(self, orig_height: int, orig_width: int) -> int:
        """Image tokens of one image of original size (H, W): base tile + unpadded grid + newlines.

        Mirrors ``LlavaNextProcessor._get_number_of_features`` (transformers 5.x), with the
        CLS token counted in and then removed by the ``default`` feature-select strategy.
        """
        from transformers.image_processing_utils import select_best_resolution

        vc = self.config.vision_config
        tile, patch = int(vc.image_size), int(vc.patch_size)
        best_h, best_w = select_best_resolution([orig_height, orig_width],
                                                self.config.image_grid_pinpoints)
        scale_h, scale_w = best_h // tile, best_w // tile
        ph = pw = tile // patch
        cur_h, cur_w = ph * scale_h, pw * scale_w
        # Unpadding: the tiles' grid covers the letter-boxed image; drop the rows (or columns)
        # that only cover padding. Same float rounding as transformers (round to 7 digits).
        if orig_width / orig_height > cur_w / cur_h:
            new_h = int(round(orig_height * (cur_w / orig_width), 7))
            cur_h -= ((cur_h - new_h) // 2) * 2
        else:
            new_w = int(round(orig_width * (cur_h / orig_height), 7))
            cur_w -= ((cur_w - new_w) // 2) * 2
        unpadded = cur_h * cur_w
        newlines = cur_h
        # CLIP-like towers prepend a CLS token; "default" drops it, "full" keeps it.
        n_extra = 1 if vc.model_type == "clip_vision_model" else 0
        base = ph * pw + n_extra
        n = unpadded + newlines + base
        if self.config.vision_feature_select_strategy == "default":
            n -= n_extra
        return n

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(list(images), return_tensors="pt")
        # pixel_values: (n_images, max_tiles, C, S, S), zero tiles pad images with fewer tiles
        # (the model slices each image's real tiles using image_sizes); image_sizes: (n, 2) = (H, W).
        sizes = out["image_sizes"]
        counts = [self.num_image_tokens(int(h), int(w)) for h, w in sizes.tolist()]
        return {"pixel_values": out["pixel_values"], "image_sizes": sizes}, counts

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_components(cls, path: str | Path, *, dtype=None, attn_implementation=None):
        from transformers import AutoTokenizer
        model = cls._load_model(path, dtype, attn_implementation)
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        proc = cls._image_processor_class().from_pretrained(str(path))
        return model, tok, proc

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int], size: str = "s",
                    image_size: int = 56) -> Any:
        """A LLaVA-1.5 tiny config (same text/vision sizes) with anyres pinpoints added."""
        from transformers import LlavaNextConfig
        base = LlavaAdapter.tiny_config(vocab_size, token_ids, size, image_size).to_dict()
        return LlavaNextConfig(text_config=base["text_config"], vision_config=base["vision_config"],
                               image_token_id=token_ids["<image>"], vision_feature_layer=-2,
                               vision_feature_select_strategy="default",
                               image_grid_pinpoints=_tiny_pinpoints(image_size),
                               image_seq_length=(image_size // 14) ** 2, tie_word_embeddings=False)

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, *, size: str = "s", image_size: int = 56,
                   corpus: Sequence[str] = (), vocab_size: int = 1024, seed: int = 0,
                   **kwargs: Any) -> "LlavaNextAdapter":
        """A small random-initialised LLaVA-NeXT with an offline BPE tokenizer.

        Tiles are ``image_size``² (default 56 px, 4×4 patches of 14 px); the anyres grids are
        LLaVA-1.6's shapes (1×2, 2×1, 2×2, 3×1, 1×3 tiles). A square image gets
        16 (base) + 8·8 (grid) + 8 (newlines) = 88 tokens at the default size.
        """
        if size not in TINY_SIZES:
            raise ConfigError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
        tok = tiny_llama_tokenizer(corpus, vocab_size)
        ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
        cfg = cls.tiny_config(len(tok), ids, size, image_size)
        torch.manual_seed(seed)
        model = cls._model_class()(cfg)
        model.eval()
        proc = cls._image_processor_class()(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=_tiny_pinpoints(image_size))
        adapter = cls(model, tok, proc, **kwargs)
        if out_dir is not None:
            adapter.save_pretrained(out_dir)
        return adapter
