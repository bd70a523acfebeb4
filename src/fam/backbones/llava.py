"""LLaVA-1.5 adapter (CLIP vision tower + 2-layer MLP projector + Llama).

Image block: N × ``<image>``, N = number of vision-tower patches kept by
``vision_feature_select_strategy`` (``default`` drops CLS). The projector
(``multi_modal_projector``) is what patch-aligned training (method.md §4) trains.

A checkpoint may carry a C-Abstractor instead of LLaVA's projector
(:mod:`fam.backbones.cabstractor`, recorded as ``fam_projector`` in its ``config.json``):
the adapter then rebuilds the module on load, reads its weights strictly from the
checkpoint's safetensors, and writes one ``<image>`` per *pooled* token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from fam.backbones.base import BackboneAdapter
from fam.backbones.batch import TokenGrid
from fam.backbones.cabstractor import build_projector, projector_spec
from fam.backbones.tokenizer import train_bpe_tokenizer
from fam.errors import ConfigError

LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

#: Language models a tiny LLaVA can carry: LLaVA-1.5's Llama, or Qwen2 (as LLaVA-OneVision).
TINY_TEXT_MODELS = ("llama", "qwen2")

TINY_SIZES = {
    "xs": dict(hidden=64, layers=2, heads=2, kv_heads=1, v_dim=32, v_layers=2),
    "s": dict(hidden=128, layers=4, heads=4, kv_heads=2, v_dim=64, v_layers=2),
    "m": dict(hidden=256, layers=4, heads=4, kv_heads=2, v_dim=128, v_layers=2),
}


def tiny_llama_tokenizer(corpus: Sequence[str], vocab_size: int) -> Any:
    """An offline BPE tokenizer with LLaVA's special tokens that, like Llama's, adds ``<s>``.

    The BOS template matters wherever a whole prompt is tokenised at once with the
    tokenizer's own specials (LLaVA-NeXT's processor, ``prompt_format="vlm2vec"``); fam's own
    layout tokenises text without specials and places ``<s>`` itself.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    bpe = train_bpe_tokenizer(corpus, LLAVA_SPECIAL_TOKENS, vocab_size)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


class LlavaAdapter(BackboneAdapter):
    family = "llava"
    model_types = ("llava",)

    def __init__(self, model, tokenizer, image_processor, **kwargs: Any):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        self._bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []

    @classmethod
    def _model_class(cls):
        from transformers import LlavaForConditionalGeneration
        return LlavaForConditionalGeneration

    def bos_ids(self) -> list[int]:
        return self._bos

    def image_block(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        return [self.image_token_id] * n_tokens, [True] * n_tokens

    def num_image_tokens(self, height: int, width: int) -> int:
        spec = projector_spec(self.config)
        if spec is not None:  # a C-Abstractor: one token per pooled cell
            return int(spec["pooled"][0]) * int(spec["pooled"][1])
        vc = self.config.vision_config
        n = (height // vc.patch_size) * (width // vc.patch_size)
        if self.config.vision_feature_select_strategy == "full":
            n += 1
        return n

    def process_images(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(list(images), return_tensors="pt")
        pv = out["pixel_values"]
        n = self.num_image_tokens(pv.shape[-2], pv.shape[-1])
        return {"pixel_values": pv}, [n] * len(images)

    def processor_spec(self) -> dict[str, Any]:
        # LlavaProcessor expands "<image>" into (H/p)·(W/p) + num_additional_image_tokens
        # tokens, minus one with the "default" strategy: num_additional_image_tokens=1 (the
        # CLS token) gives exactly num_image_tokens() in both strategies.
        token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        cfg = self.config
        return {"processor_class": "LlavaProcessor",
                "processor_config": {"patch_size": int(cfg.vision_config.patch_size),
                                     "vision_feature_select_strategy":
                                         cfg.vision_feature_select_strategy,
                                     "num_additional_image_tokens": 1, "image_token": token},
                "image_placeholder": token, "named_tokens": {"image_token": token}}

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patch grid at the processor's crop size."""
        cs = self.image_processor.crop_size
        p = self.config.vision_config.patch_size
        return cs["height"] // p, cs["width"] // p

    def image_token_grid(self, image: Image.Image) -> TokenGrid:
        # CLIP's processor: shortest edge to S (the long one int(S·long/short)), then a
        # centre crop of crop_size; the grid covers that crop.
        proc = self.image_processor
        w, h = self.prepare_image(image).size
        size = getattr(proc, "size", None) or {}
        if getattr(proc, "do_resize", True) and "shortest_edge" in size:
            s = int(size["shortest_edge"])
            w, h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        box = (0.0, 0.0, 1.0, 1.0)
        if getattr(proc, "do_center_crop", False):
            cw, ch = int(proc.crop_size["width"]), int(proc.crop_size["height"])
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            box = (x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h)
        full = projector_spec(self.config) is None and \
            self.config.vision_feature_select_strategy == "full"
        return TokenGrid(*self.token_grid(), first=int(full), box=box)

    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tokens the LLM reads: the patch grid, or a
        C-Abstractor's pooled grid."""
        spec = projector_spec(self.config)
        if spec is not None:
            return int(spec["pooled"][0]), int(spec["pooled"][1])
        return self.patch_grid()

    @classmethod
    def _load_model(cls, path: str | Path, dtype: Any = None,
                    attn_implementation: str | None = None) -> torch.nn.Module:
        """LLaVA's loader; a checkpoint with a ``fam_projector`` record gets its projector
        rebuilt and its weights read strictly (transformers would build the MLP)."""
        from transformers import PretrainedConfig
        spec = projector_spec(PretrainedConfig.get_config_dict(str(path))[0])
        if spec is None:
            return super()._load_model(path, dtype, attn_implementation)
        # The checkpoint's projector keys are not the class's: the class may neither load
        # them nor report them (they are read below), and its MLP is replaced.
        base = cls._model_class()
        # (Same name and module as the stock class, which transformers' checkpoint-key
        # conversions are registered for.)
        quiet = type(base.__name__, (base,), {
            "__module__": base.__module__,
            "_keys_to_ignore_on_load_unexpected": [r"multi_modal_projector\."],
            "_keys_to_ignore_on_load_missing": [r"multi_modal_projector\."]})
        kw: dict[str, Any] = {}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        model = quiet.from_pretrained(str(path), **kw)
        model.__class__ = base  # the stock class from here on (same layout, same methods)
        install_projector(model, build_projector(spec))
        load_projector_weights(model, path)
        return model

    @classmethod
    def load_components(cls, path: str | Path, *, dtype=None, attn_implementation=None):
        from transformers import AutoTokenizer, CLIPImageProcessorPil
        model = cls._load_model(path, dtype, attn_implementation)
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        proc = CLIPImageProcessorPil.from_pretrained(str(path))
        return model, tok, proc

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int], size: str = "s",
                    image_size: int = 112, *, text_model: str = "llama") -> Any:
        from transformers import LlavaConfig
        if size not in TINY_SIZES:
            raise ConfigError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
        if text_model not in TINY_TEXT_MODELS:
            raise ConfigError(f"unknown tiny LLaVA language model {text_model!r}; choose one "
                              f"of {list(TINY_TEXT_MODELS)}")
        s = TINY_SIZES[size]
        text = dict(model_type=text_model, vocab_size=vocab_size, hidden_size=s["hidden"],
                    intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                    max_position_embeddings=2048, bos_token_id=token_ids["<s>"],
                    eos_token_id=token_ids["</s>"], pad_token_id=token_ids["<pad>"],
                    tie_word_embeddings=False)
        vision = dict(model_type="clip_vision_model", hidden_size=s["v_dim"],
                      intermediate_size=2 * s["v_dim"], num_hidden_layers=s["v_layers"],
                      num_attention_heads=max(1, s["v_dim"] // 16), image_size=image_size,
                      patch_size=14, projection_dim=s["v_dim"])
        return LlavaConfig(text_config=text, vision_config=vision,
                           image_token_id=token_ids["<image>"], vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_seq_length=(image_size // 14) ** 2, tie_word_embeddings=False)

    @classmethod
    def build_tiny(cls, out_dir: str | Path | None = None, *, size: str = "s", image_size: int = 112,
                   corpus: Sequence[str] = (), vocab_size: int = 1024, seed: int = 0,
                   text_model: str = "llama", **kwargs: Any) -> "LlavaAdapter":
        """A small random-initialised LLaVA-1.5 with an offline BPE tokenizer.

        ``(image_size/14)²`` image tokens (64 at 112 px). ``text_model="qwen2"`` puts a Qwen2
        language model of the same size behind the projector (the stock LLaVA class takes
        any causal LM config), for the cross-LLM projector comparison.
        """
        from transformers import CLIPImageProcessorPil
        tok = tiny_llama_tokenizer(corpus, vocab_size)
        ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
        cfg = cls.tiny_config(len(tok), ids, size, image_size, text_model=text_model)
        torch.manual_seed(seed)
        model = cls._model_class()(cfg)
        model.eval()
        proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
        adapter = cls(model, tok, proc, **kwargs)
        if out_dir is not None:
            adapter.save_pretrained(out_dir)
        return adapter


def install_projector(model: torch.nn.Module, projector: torch.nn.Module) -> None:
    """Put ``projector`` in place of a LLaVA model's ``multi_modal_projector`` (same device
    and dtype as the model)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner = m.model if getattr(m.model, "multi_modal_projector", None) is not None else m
    ref = next(m.parameters())
    owner.multi_modal_projector = projector.to(device=ref.device, dtype=ref.dtype)


def load_projector_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Read the ``multi_modal_projector.*`` tensors of a local checkpoint's safetensors
    (one file or an index of shards) into the model's projector, strictly."""
    import json
    from safetensors import safe_open
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    proj = m.model.multi_modal_projector
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (root / f).exists():
            raise ConfigError(f"{root / f} not found: a checkpoint with a fam projector must be "
                              "a local directory with its safetensors")
        with safe_open(str(root / f), framework="pt") as st:
            for key in st.keys():
                i = key.find("multi_modal_projector.")
                if i >= 0:
                    state[key[i + len("multi_modal_projector."):]] = st.get_tensor(key)
    ref = next(proj.parameters())
    try:
        proj.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{root}: the projector weights do not match its config.json "
                          f"fam_projector record ({str(e).splitlines()[0]})") from None
