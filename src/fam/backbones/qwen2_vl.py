"""Qwen2-VL and Qwen2.5-VL adapters (the FAM paper's main backbone).

Image block: ``<|vision_start|>`` + N × ``<|image_pad|>`` + ``<|vision_end|>`` with
``N = t·h·w / merge_size²`` from the image processor's ``image_grid_thw``. The model needs
``mm_token_type_ids`` (1 on image tokens) to compute its multimodal RoPE positions.

``prompt_format="vlm2vec"``: N bare ``<|image_pad|>`` (no vision start/end), no EOS and
sequential ``position_ids`` for every token, which is what VLM2Vec's forward computes: its
``get_rope_index`` only counts images that follow a ``<|vision_start|>``, finds none and falls
back to ``0..n-1`` (``docs/vlm2vec.md``).

Video (``video_input = "native"``, :mod:`fam.backbones.video`): ``<|vision_start|>`` + N ×
``<|video_pad|>`` + ``<|vision_end|>`` with ``N = t·h·w / merge_size²`` from
``video_grid_thw``, ``mm_token_type_ids`` 2 on video tokens; ``"vlm2vec"``: N bare
``<|video_pad|>`` as VLM2Vec-V2 writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fam.backbones.base import BackboneAdapter
from fam.backbones.batch import TokenGrid
from fam.backbones.fastpath import patch_embed_as_matmul
from fam.backbones.tokenizer import train_bpe_tokenizer
from fam.backbones.video import qwen_video_patches
from fam.errors import ConfigError

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

#: Tiny sizes: (text hidden, text layers, heads, kv heads, vision embed dim, vision depth).
TINY_SIZES = {
    "xs": dict(hidden=64, layers=2, heads=2, kv_heads=1, v_dim=32, v_depth=2),
    "s": dict(hidden=128, layers=4, heads=4, kv_heads=2, v_dim=64, v_depth=2),
    "m": dict(hidden=256, layers=4, heads=4, kv_heads=2, v_dim=128, v_depth=2),
}

#: Published shapes, built with random weights for benchmarks (``fam bench gpu``): the
#: numbers of Hugging Face ``Qwen/Qwen2-VL-2B-Instruct/config.json`` (the FAM paper's main
#: backbone; the same as ``fam.bench.plan.KNOWN_SHAPES["Qwen2-VL-2B"]``). Text model:
#: hidden_size 1536, num_hidden_layers 28, num_attention_heads 12, num_key_value_heads 2,
#: intermediate_size 8960, vocab_size 151936, rms_norm_eps 1e-6, rope_theta 1e6,
#: mrope_section [16, 24, 24], max_position_embeddings 32768, tie_word_embeddings true.
#: Vision tower: depth 32, embed_dim 1280, num_heads 16, mlp_ratio 4, patch_size 14,
#: spatial_merge_size 2, temporal_patch_size 2 (665 M parameters; 2.21 B in all).
PUBLISHED_SIZES = {
    "2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, v_dim=1280, v_depth=32,
               intermediate=8960, vocab=151936, rms_eps=1e-6, rope_theta=1e6, max_pos=32768,
               tie=True, v_heads=16, mlp_ratio=4),
}


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like Qwen2-VL's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


class Qwen2VLAdapter(BackboneAdapter):
    family = "qwen2_vl"
    # transformers' smart_resize: "absolute aspect ratio must be smaller than 200".
    max_aspect = 200.0
    model_types = ("qwen2_vl",)
    vlm2vec_image_token = "<|image_pad|>"
    #: min_pixels/max_pixels (common load options) reach this family's image processor.
    has_pixel_budget = True
    video_input = "native"
    vlm2vec_video_token = "<|video_pad|>"
    shared_prefix_ok = True
    position_id_dims = 3

    def __init__(self, model, tokenizer, image_processor, **kwargs: Any):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        cfg = self.config
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.video_token_id = int(cfg.video_token_id)
        # The patch embedding's Conv3d (kernel = stride) as the equal matrix product.
        patch_embed_as_matmul(self.model)

    @classmethod
    def _model_class(cls):
        from transformers import Qwen2VLForConditionalGeneration
        return Qwen2VLForConditionalGeneration

    @classmethod
    def _image_processor_class(cls):
        from transformers import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil

    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        ids = [self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id]
        return ids, [False] + [True] * n_tokens + [False]

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(list(images), return_tensors="pt")
        grid = out["image_grid_thw"]
        counts = (grid.prod(-1) // (self.merge_size ** 2)).tolist()
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts

    def image_token_grid(self, image: Image.Image) -> TokenGrid:
        # smart_resize scales the whole image (no crop); each token merges merge² patches.
        _, h, w = (int(v) for v in self.image_processor(
            [self.prepare_image(image)], return_tensors="pt")["image_grid_thw"][0])
        return TokenGrid(h // self.merge_size, w // self.merge_size)

    def video_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        ids = [self.vision_start_id] + [self.video_token_id] * n_tokens + [self.vision_end_id]
        return ids, [False] + [True] * n_tokens + [False]

    def process_videos(self, videos: Sequence[Sequence[Image.Image]]
                       ) -> tuple[dict[str, torch.Tensor], list[int]]:
        rows, grids = zip(*(qwen_video_patches(v, self.image_processor) for v in videos))
        grid = torch.tensor(grids, dtype=torch.long)
        counts = (grid.prod(-1) // (self.merge_size ** 2)).tolist()
        return {"pixel_values_videos": torch.cat(rows), "video_grid_thw": grid}, counts

    def extra_inputs(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.prompt_format == "vlm2vec":
            return super().extra_inputs(input_ids, image_mask, attention_mask)
        # text 0, image 1, video 2 (Qwen2-VL's get_rope_index)
        types = image_mask.to(torch.int32)
        return {"mm_token_type_ids": types.masked_fill(input_ids == self.video_token_id, 2)}

    def processor_spec(self) -> dict[str, Any]:
        # Qwen2VLProcessor also loads a video processor, which needs torchvision. The
        # image-only PaddleOCRVLProcessor does the same image-token expansion (N = t·h·w /
        # merge²) and returns mm_token_type_ids; vLLM ignores it and builds its own
        # Qwen2-VL processor.
        tokens = self.tokenizer.convert_ids_to_tokens(
            [self.vision_start_id, self.image_token_id, self.vision_end_id])
        return {"processor_class": "PaddleOCRVLProcessor", "processor_config": {},
                "image_placeholder": "".join(tokens), "named_tokens": {"image_token": tokens[1]}}

    #: transformers' processor taking this family's videos (its video processor needs
    #: torchvision).
    video_processor_class = "Qwen2VLProcessor"

    def video_processor_spec(self) -> dict[str, Any]:
        # The stock processor whose Qwen2VLVideoProcessor patches frames as
        # fam.backbones.video does: the image processor's pixel budget and normalisation,
        # every frame given (fam samples its 8 first), no total-video pixel cap.
        ip = self.image_processor
        lo, hi = self.pixel_budget
        tokens = self.tokenizer.convert_ids_to_tokens(
            [self.vision_start_id, self.video_token_id, self.vision_end_id])
        video_cfg = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": lo, "longest_edge": hi},
            "patch_size": int(ip.patch_size), "temporal_patch_size": int(ip.temporal_patch_size),
            "merge_size": int(ip.merge_size), "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std), "do_resize": True, "do_rescale": True,
            "rescale_factor": float(ip.rescale_factor), "do_normalize": True,
            "do_convert_rgb": True, "resample": int(ip.resample), "do_sample_frames": False,
            "cap_pixels_per_frame": False}
        return {"processor_class": self.video_processor_class,
                "video_placeholder": "".join(tokens), "named_tokens": {"video_token": tokens[1]},
                "video_processor_config": video_cfg}

    @property
    def pixel_budget(self) -> tuple[int | None, int | None]:
        size = getattr(self.image_processor, "size", None) or {}
        lo = size.get("shortest_edge") if hasattr(size, "get") else None
        hi = size.get("longest_edge") if hasattr(size, "get") else None
        lo = lo if lo is not None else getattr(self.image_processor, "min_pixels", None)
        hi = hi if hi is not None else getattr(self.image_processor, "max_pixels", None)
        return (int(lo) if lo is not None else None), (int(hi) if hi is not None else None)

    @classmethod
    def load_components(cls, path: str | Path, *, dtype=None, attn_implementation=None,
                        min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers import AutoTokenizer
        model = cls._load_model(path, dtype, attn_implementation)
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        ip_kw: dict[str, Any] = {}
        # Only the limits given: None keeps the checkpoint's preprocessor_config.json value.
        if min_pixels is not None:
            ip_kw["min_pixels"] = min_pixels
        if max_pixels is not None:
            ip_kw["max_pixels"] = max_pixels
        proc = cls._image_processor_class().from_pretrained(str(path), **ip_kw)
        return model, tok, proc

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int], size: str = "s") -> Any:
        """A config of ``size``: a tiny preset (``TINY_SIZES``) or a published shape
        (``PUBLISHED_SIZES``, whose vocabulary size is the published one: ids of the offline
        tokenizer are a subset of it)."""
        from transformers import Qwen2VLConfig
        sizes = {**TINY_SIZES, **PUBLISHED_SIZES}
        if size not in sizes:
            raise ConfigError(f"unknown size {size!r}; choose one of {sorted(sizes)}")
        s = sizes[size]
        head_dim = s["hidden"] // s["heads"]
        tie = s.get("tie", False)
        text = dict(vocab_size=s.get("vocab", vocab_size), hidden_size=s["hidden"],
                    intermediate_size=s.get("intermediate", 2 * s["hidden"]),
                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"],
                    max_position_embeddings=s.get("max_pos", 2048),
                    rope_parameters={"rope_type": "default",
                                     "rope_theta": s.get("rope_theta", 10000.0),
                                     "mrope_section": _mrope_section(head_dim)},
                    bos_token_id=None, eos_token_id=token_ids["<|im_end|>"],
                    pad_token_id=token_ids["<|endoftext|>"], tie_word_embeddings=tie)
        if "rms_eps" in s:
            text["rms_norm_eps"] = s["rms_eps"]
        vision = dict(depth=s["v_depth"], embed_dim=s["v_dim"], hidden_size=s["hidden"],
                      num_heads=s.get("v_heads", max(1, s["v_dim"] // 16)),
                      mlp_ratio=s.get("mlp_ratio", 2), patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision,
                             image_token_id=token_ids["<|image_pad|>"],
                             video_token_id=token_ids["<|video_pad|>"],
                             vision_start_token_id=token_ids["<|vision_start|>"],
                             vision_end_token_id=token_ids["<|vision_end|>"],
                             tie_word_embeddings=tie)

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, *, size: str = "s", image_size: int = 112,
                   corpus: Sequence[str] = (), vocab_size: int = 1024, seed: int = 0,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   **kwargs: Any) -> "Qwen2VLAdapter":
        """A random-initialised Qwen2-VL with an offline BPE tokenizer.

        Images are resized to ``image_size``² pixels (min = max pixels), i.e.
        ``(image_size/28)²`` image tokens after the 2×2 merge (16 at 112 px).

        Args:
            size: a tiny preset (``"xs"``, ``"s"``, ``"m"``) or a published shape (``"2b"``).
            dtype: parameter dtype; the weights are created in it (a 2B model in bfloat16
                never materialises a float32 copy). None: float32.
            device: where the weights are created and initialised (None: the CPU).
        """
        from transformers import PreTrainedTokenizerFast
        bpe = train_bpe_tokenizer(corpus, QWEN_SPECIAL_TOKENS, vocab_size)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>",
                                      additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        cfg = cls.tiny_config(len(tok), ids, size)
        torch.manual_seed(seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype or torch.float32)
        try:
            with torch.device(device or "cpu"):
                model = cls._model_class()(cfg)
        finally:
            torch.set_default_dtype(prev)
        model.eval()
        proc = cls._image_processor_class()(min_pixels=image_size * image_size,
                                            max_pixels=image_size * image_size)
        adapter = cls(model, tok, proc, **kwargs)
        if out_dir is not None:
            adapter.save_pretrained(out_dir)
        return adapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    video_processor_class = "Qwen2_5_VLProcessor"

    @classmethod
    def _model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration
        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int], size: str = "s") -> Any:
        from transformers import Qwen2_5_VLConfig
        if size not in TINY_SIZES:
            raise ConfigError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
        base = super().tiny_config(vocab_size, token_ids, size).to_dict()
        vis = base["vision_config"]
        s = TINY_SIZES[size]
        vision = dict(depth=vis["depth"], hidden_size=vis["embed_dim"], out_hidden_size=s["hidden"],
                      intermediate_size=2 * vis["embed_dim"], num_heads=vis["num_heads"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      window_size=56, fullatt_block_indexes=list(range(vis["depth"])))
        return Qwen2_5_VLConfig(text_config=base["text_config"], vision_config=vision,
                                image_token_id=base["image_token_id"],
                                video_token_id=base["video_token_id"],
                                vision_start_token_id=base["vision_start_token_id"],
                                vision_end_token_id=base["vision_end_token_id"],
                                tie_word_embeddings=False)
