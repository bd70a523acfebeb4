"""Backbone adapters: the only code that knows processors, special tokens and layouts.

Use :func:`load_backbone` for a hub id or a checkpoint directory (the family is read from
its ``config.json``), and :func:`build_tiny` for a small random-initialised model of a real
architecture with an offline tokenizer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.backbones.idefics3 import Idefics3Adapter, SmolVLMAdapter
from fam.backbones.llava import LlavaAdapter
from fam.backbones.llava_next import LlavaNextAdapter
from fam.backbones.options import (PROMPT_FORMATS, SETTINGS_FILE, BackboneSettings, check_pixels,
                                   check_prompt_format, parse_image_resolution,
                                   read_saved_settings)
from fam.backbones.peft_adapters import merge_peft_adapter
from fam.backbones.phi3v import Phi3VAdapter, remote_code_error
from fam.backbones.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from fam.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[BackboneAdapter]] = {
    a.family: a for a in (Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaAdapter, LlavaNextAdapter,
                          Idefics3Adapter, SmolVLMAdapter, Phi3VAdapter)
}
#: Families with a native transformers class: tiny models build offline from a config.
NATIVE_FAMILIES: tuple[str, ...] = tuple(f for f, a in ADAPTERS.items()
                                         if not getattr(a, "requires_remote_code", False))


def adapter_for_model_type(model_type: str) -> type[BackboneAdapter]:
    for a in ADAPTERS.values():
        if model_type in a.model_types:
            return a
    raise ConfigError(f"no adapter for model_type {model_type!r}; supported: "
                      f"{sorted(t for a in ADAPTERS.values() for t in a.model_types)}")


def _model_type(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.exists():
            raise ConfigError(f"{p} has no config.json: not a checkpoint directory")
        return json.loads(cfg.read_text())["model_type"]
    # The raw config dict: AutoConfig would need remote code for remote-code families.
    from transformers import PretrainedConfig
    return PretrainedConfig.get_config_dict(str(path))[0]["model_type"]


#: Options every family's :func:`load_backbone` takes (see :mod:`fam.backbones.options`).
COMMON_OPTIONS: tuple[str, ...] = ("prompt_format", "image_resolution", "max_text_tokens",
                                   "min_pixels", "max_pixels", "padding_side", "dtype",
                                   "attn_implementation")
#: The options a saved model records in ``fam_backbone.json`` and that a load defaults to.
SAVED_OPTIONS: tuple[str, ...] = ("prompt_format", "image_resolution", "max_text_tokens")


def _resolve_options(cls: type[BackboneAdapter], path: str | Path, options: dict[str, Any]
                     ) -> dict[str, Any]:
    """Validate ``options`` for ``cls`` and fill the settings the saved model records."""
    allowed = COMMON_OPTIONS + tuple(cls.extra_load_options)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"load_backbone: unknown option(s) {unknown} for a {cls.family} "
                          f"backbone; valid options: {sorted(allowed)} (and trust_remote_code, "
                          "adapter)")
    out = dict(options)
    if "prompt_format" in out:
        check_prompt_format(out["prompt_format"])
    lo, hi = check_pixels(out.pop("min_pixels", None), out.pop("max_pixels", None))
    if cls.has_pixel_budget:
        out.update(min_pixels=lo, max_pixels=hi)
    elif lo is not None or hi is not None:
        raise ConfigError(f"min_pixels/max_pixels set the Qwen2-VL processor's pixel budget; a "
                          f"{cls.family} processor has none (leave them unset)")
    saved = read_saved_settings(path) if Path(path).is_dir() else {}
    if out.get("prompt_format", saved.get("prompt_format")) != saved.get("prompt_format", "fam"):
        # Another format than the saved one: its own text cap ("auto") unless one is given.
        saved.pop("max_text_tokens", None)
    for key in SAVED_OPTIONS:
        if key not in saved:
            continue
        if key not in out:
            out[key] = saved[key]
        elif key != "max_text_tokens" or out[key] != "auto":
            given = (parse_image_resolution(out[key]) if key == "image_resolution" else out[key])
            if given != saved[key]:
                log.warning("%s=%r differs from the %r that %s was saved with: the model will "
                            "see other inputs than in training", key, out[key], saved[key],
                            path)
    return out


def load_backbone(path: str | Path, *, trust_remote_code: bool = False,
                  adapter: str | Path | None = None, **options: Any) -> BackboneAdapter:
    """Load a backbone adapter from a hub id or a local checkpoint directory.

    Args:
        path: hub id or directory with ``config.json`` (its ``model_type`` picks the adapter).
        trust_remote_code: required for remote-code families (Phi-3.5-V), whose Python code
            ships with the checkpoint and runs locally; ignored by native families.
        adapter: a peft adapter folder (LoRA or DoRA; ``adapter_model.safetensors`` or a
            ``.bin`` read with ``weights_only=True``) trained on ``path``; it is merged into
            the weights (:func:`fam.backbones.peft_adapters.merge_peft_adapter`).
        **options: ``prompt_format`` (``"fam"`` | ``"vlm2vec"``), ``image_resolution``,
            ``max_text_tokens``, ``min_pixels``/``max_pixels`` (Qwen2-VL family),
            ``padding_side``, ``dtype``, ``attn_implementation``, and the family's own
            (:attr:`BackboneAdapter.extra_load_options`, e.g. Phi-3.5-V's ``num_crops``).
            The first three default to what a saved model's ``fam_backbone.json`` records.

    Raises:
        ConfigError: unknown ``model_type`` or option, an invalid option value, a
            remote-code family without opt-in, or an adapter that does not fit.
    """
    cls = adapter_for_model_type(_model_type(path))
    kwargs = _resolve_options(cls, path, options)
    if getattr(cls, "requires_remote_code", False):
        if not trust_remote_code:
            raise remote_code_error(path)
        kwargs["trust_remote_code"] = True
    backbone = cls.from_pretrained(path, **kwargs)
    if adapter is not None:
        backbone.model = merge_peft_adapter(backbone.model, adapter)
        backbone.model.eval()
    return backbone


def build_tiny(family: str = "qwen2_vl", out_dir: str | Path | None = None, **kwargs: Any,
               ) -> BackboneAdapter:
    """Build (and optionally save) a tiny random-initialised backbone of ``family``."""
    if family not in ADAPTERS:
        raise ConfigError(f"unknown backbone family {family!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[family].build_tiny(out_dir, **kwargs)


__all__ = ["ADAPTERS", "NATIVE_FAMILIES", "PROMPT_FORMATS", "SETTINGS_FILE", "BackboneAdapter",
           "BackboneSettings", "EncodedBatch", "build_tiny", "merge_peft_adapter",
           "load_backbone", "Idefics3Adapter", "LlavaAdapter", "LlavaNextAdapter", "Phi3VAdapter",
           "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "SmolVLMAdapter"]
