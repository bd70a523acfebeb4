"""Idefics3 and SmolVLM adapters (SigLIP-like tower + pixel-shuffle connector + Llama).

Both families share one layout (transformers' ``Idefics3Processor`` and ``SmolVLMProcessor``
build the same string). The image processor resizes the image (longest edge ``size``),
splits it into ``rows × cols`` square tiles of ``max_image_size`` plus one downscaled global
image (no split when it already fits), and each tile becomes ``image_seq_len`` ``<image>``
tokens. The block for a split image is::

    for r in rows:  (<fake_token_around_image> <row_r_col_c> <image>×n) for c in cols, "\\n"
    "\\n" <fake_token_around_image> <global-img> <image>×n <fake_token_around_image>

and for an unsplit image only the last line, without the leading ``"\\n"``. Only ``<image>``
tokens (``config.image_token_id``) are image tokens; the row/column tags, the
``<fake_token_around_image>``/``<global-img>`` markers and the newlines are neither image
nor text content. The language model lives in ``model.model.text_model``.

Pixel inputs are ``pixel_values`` (n_images, max_tiles, C, S, S) and
``pixel_attention_mask`` (n_images, max_tiles, S, S): one row per image in the batch, not
per item, with all-zero tiles as padding. The model drops all-zero tiles, runs the tower on
the rest and scatters the features into the ``<image>`` positions of the whole batch in
order, so items without an image simply contribute no row (the row count need not equal the
batch size). A real tile that is exactly zero everywhere (a uniform image at the
normaliser's mean) would be dropped too: that is the model's own convention.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fam.backbones.base import BackboneAdapter
from fam.backbones.tokenizer import train_bpe_tokenizer
from fam.errors import ConfigError

log = logging.getLogger(__name__)

#: The processor's tags (transformers ``Idefics3Processor``); rows/cols go up to 6×6.
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
MAX_GRID = 6
ROW_COL_TOKENS = [f"<row_{r + 1}_col_{c + 1}>" for r in range(MAX_GRID) for c in range(MAX_GRID)]
IDEFICS3_SPECIAL_TOKENS = ["<pad>", "<|begin_of_text|>", "<end_of_utterance>", "<unk>", FAKE_TOKEN,
                           IMAGE_TOKEN, GLOBAL_TOKEN, *ROW_COL_TOKENS]

TINY_SIZES = {
    "xs": dict(hidden=64, layers=2, heads=2, kv_heads=1, v_dim=32, v_layers=2),
    "s": dict(hidden=128, layers=4, heads=4, kv_heads=2, v_dim=64, v_layers=2),
    "m": dict(hidden=256, layers=4, heads=4, kv_heads=2, v_dim=128, v_layers=2),
}


class SplitCount(int):
    """The number of ``<image>`` tokens of one image, carrying its tile grid.

    An ``int`` (what :meth:`BackboneAdapter.process_images` promises per image) so generic
    code keeps working, with ``rows``/``cols`` attached for :meth:`Idefics3Adapter.image_block`
    (0×0 = not split).
    """

    rows: int
    cols: int

    def __new__(cls, n_tokens: int, rows: int, cols: int) -> "SplitCount":
        obj = super().__new__(cls, n_tokens)
        obj.rows, obj.cols = rows, cols
        return obj


class Idefics3Adapter(BackboneAdapter):
    """Adapter for ``Idefics3ForConditionalGeneration`` (model_type ``idefics3``)."""

    family = "idefics3"
    model_types = ("idefics3",)

    def __init__(self, model, tokenizer, image_processor, **kwargs: Any):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        self._bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
        self.fake_token_id = self._token_id(FAKE_TOKEN)
        self.global_token_id = self._token_id(GLOBAL_TOKEN)
        self._row_col_ids = [self._token_id(t) for t in ROW_COL_TOKENS]
        # Same newline tokens as the processor's one-string tokenisation: "\n\n" before the
        # global image is one segment between special tokens, so it may merge into one token.
        self._nl = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        self._nl2 = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
        vc = self.config.vision_config
        self.image_seq_len = int((vc.image_size // vc.patch_size) ** 2 // self.config.scale_factor ** 2)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no {token!r} token, which the {self.family} image "
                              "layout needs; use the checkpoint's own tokenizer")
        return int(tid)

    @classmethod
    def _model_class(cls):
        from transformers import Idefics3ForConditionalGeneration
        return Idefics3ForConditionalGeneration

    @classmethod
    def _image_processor_class(cls):
        # The PIL backend: the default one needs torchvision.
        from transformers import Idefics3ImageProcessorPil
        return Idefics3ImageProcessorPil

    @classmethod
    def _config_class(cls):
        from transformers import Idefics3Config
        return Idefics3Config

    # ------------------------------------------------------------------ model access
    def language_model(self) -> torch.nn.Module:
        return self.hf_model.model.text_model

    def lora_target_modules(self) -> str:
        # The LM is ``text_model``; the SigLIP tower also has q/k/v projections, so the name
        # must anchor on text_model rather than on the projection names alone.
        return r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    # ------------------------------------------------------------------ layout
    def bos_ids(self) -> list[int]:
        return self._bos

    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        rows, cols = getattr(n_tokens, "rows", 0), getattr(n_tokens, "cols", 0)
        n = self.image_seq_len
        expected = n * (rows * cols + 1)
        if int(n_tokens) != expected:
            raise ValueError(f"{int(n_tokens)} image tokens do not fit a {rows}×{cols} split of "
                             f"{n} tokens per tile (+ global image); pass process_images' counts")
        ids: list[int] = []
        img: list[bool] = []

        def add(tokens: list[int], is_image: bool = False) -> None:
            ids.extend(tokens)
            img.extend([is_image] * len(tokens))

        for r in range(rows):
            for c in range(cols):
                add([self.fake_token_id, self._row_col_ids[r * MAX_GRID + c]])
                add([self.image_token_id] * n, True)
            # The last row's "\n" and the global image's leading "\n" form one "\n\n" segment.
            add(self._nl if r < rows - 1 else self._nl2)
        add([self.fake_token_id, self.global_token_id])
        add([self.image_token_id] * n, True)
        add([self.fake_token_id])
        return ids, img

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        if any(t is None for t in images):
            raise ValueError("process_images got None; pass only the present images")
        # One "sample" per image: (n_images, max_tiles, C, S, S), zero tiles as padding.
        out = self.image_processor([[im] for im in images], return_row_col_info=True,
                                   return_tensors="pt")
        rows = [r[0] for r in out["rows"]]
        cols = [c[0] for c in out["cols"]]
        if max(max(rows), max(cols)) > MAX_GRID:
            raise ConfigError(f"an image was split into {max(rows)}×{max(cols)} tiles; the "
                              f"layout has row/col tags up to {MAX_GRID}×{MAX_GRID}: lower the "
                              "image processor's size['longest_edge']")
        counts = [SplitCount(self.image_seq_len * (r * c + 1), r, c) for r, c in zip(rows, cols)]
        pix = {"pixel_values": out["pixel_values"],
               "pixel_attention_mask": out["pixel_attention_mask"].bool()}
        return pix, counts

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
                    tile_size: int = 64, patch_size: int = 8, scale_factor: int = 2) -> Any:
        if size not in TINY_SIZES:
            raise ConfigError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
        s = TINY_SIZES[size]
        text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=s["hidden"],
                    intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                    max_position_embeddings=4096, bos_token_id=token_ids["<|begin_of_text|>"],
                    eos_token_id=token_ids["<end_of_utterance>"], pad_token_id=token_ids["<pad>"],
                    tie_word_embeddings=False)
        vision = dict(hidden_size=s["v_dim"], intermediate_size=2 * s["v_dim"],
                      num_hidden_layers=s["v_layers"], num_attention_heads=max(1, s["v_dim"] // 16),
                      image_size=tile_size, patch_size=patch_size)
        return cls._config_class()(text_config=text, vision_config=vision,
                                   image_token_id=token_ids[IMAGE_TOKEN], scale_factor=scale_factor,
                                   pad_token_id=token_ids["<pad>"], tie_word_embeddings=False)

    #: (tile px, patch px, pixel-shuffle scale) of the tiny preset: 16 tokens per tile.
    tiny_geometry: tuple[int, int, int] = (64, 8, 2)

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, *, size: str = "s",
                   max_tiles_per_side: int = 2, corpus: Sequence[str] = (), vocab_size: int = 1024,
                   seed: int = 0, **kwargs: Any) -> "Idefics3Adapter":
        """A small random-initialised model of this family with an offline BPE tokenizer.

        Tiles are 64 px (8-px patches); images are resized to a longest edge of
        ``max_tiles_per_side`` tiles, so a square image becomes 2×2 tiles + the global image.
        """
        from transformers import PreTrainedTokenizerFast
        bpe = train_bpe_tokenizer(corpus, IDEFICS3_SPECIAL_TOKENS, vocab_size)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                      eos_token="<end_of_utterance>", pad_token="<pad>",
                                      unk_token="<unk>",
                                      additional_special_tokens=IDEFICS3_SPECIAL_TOKENS[4:])
        ids = {t: tok.convert_tokens_to_ids(t) for t in IDEFICS3_SPECIAL_TOKENS}
        tile, patch, scale = cls.tiny_geometry
        cfg = cls.tiny_config(len(tok), ids, size, tile, patch, scale)
        torch.manual_seed(seed)
        model = cls._model_class()(cfg)
        model.eval()
        proc = cls._image_processor_class()(size={"longest_edge": max_tiles_per_side * tile},
                                            max_image_size={"longest_edge": tile})
        adapter = cls(model, tok, proc, **kwargs)
        if out_dir is not None:
            adapter.save_pretrained(out_dir)
        return adapter


class SmolVLMAdapter(Idefics3Adapter):
    """Adapter for ``SmolVLMForConditionalGeneration`` (model_type ``smolvlm``).

    Same image layout as Idefics3 (``SmolVLMProcessor`` builds the same string). The tiny
    preset uses SmolVLM's larger pixel shuffle (scale 4: 4 tokens per 64-px tile).
    """

    family = "smolvlm"
    model_types = ("smolvlm",)
    tiny_geometry = (64, 8, 4)

    @classmethod
    def _model_class(cls):
        from transformers import SmolVLMForConditionalGeneration
        return SmolVLMForConditionalGeneration

    @classmethod
    def _image_processor_class(cls):
        from transformers import SmolVLMImageProcessorPil
        return SmolVLMImageProcessorPil

    @classmethod
    def _config_class(cls):
        from transformers import SmolVLMConfig
        return SmolVLMConfig
