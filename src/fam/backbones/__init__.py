"""Backbone adapters: the only code that knows processors, special tokens and layouts.

Use :func:`load_backbone` for a hub id or a checkpoint directory (the family is read from
its ``config.json``), and :func:`build_tiny` for a small random-initialised model of a real
architecture with an offline tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.backbones.checks import check_finite, check_weights, load_error, read_config, resolve_model
from fam.backbones.idefics3 import Idefics3Adapter, SmolVLMAdapter
from fam.backbones.llava import LlavaAdapter
from fam.backbones.llava_next import LlavaNextAdapter
from fam.backbones.phi3v import Phi3VAdapter, remote_code_error
from fam.backbones.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from fam.errors import ConfigError, FamError

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
    # The raw config dict: AutoConfig would need remote code for remote-code families.
    return read_config(path)["model_type"]


def load_backbone(path: str | Path, *, trust_remote_code: bool = False, **kwargs: Any,
                  ) -> BackboneAdapter:
    """Load a backbone adapter from a hub id or a local checkpoint directory.

    A local checkpoint is checked before it is loaded (``config.json`` valid and complete,
    weights readable and holding every parameter the config describes) and after (every
    weight finite, the tokenizer not empty); see :mod:`fam.backbones.checks`.

    Args:
        path: hub id or directory with ``config.json`` (its ``model_type`` picks the adapter).
        trust_remote_code: required for remote-code families (Phi-3.5-V), whose Python code
            ships with the checkpoint and runs locally; ignored by native families.
        **kwargs: forwarded to the adapter's ``from_pretrained``.

    Raises:
        ConfigError: unknown ``model_type``, or a remote-code family without opt-in.
        DataError: a missing folder, an invalid or incomplete ``config.json``, missing,
            truncated or non-finite weights, missing tokenizer files (names the file).
    """
    cls = adapter_for_model_type(_model_type(path))
    remote = getattr(cls, "requires_remote_code", False)
    if remote:
        if not trust_remote_code:
            raise remote_code_error(path)
        kwargs["trust_remote_code"] = True
    src = resolve_model(path)
    if isinstance(src, Path) and not remote:
        check_weights(src, cls._model_class)
    try:
        adapter = cls.from_pretrained(path, **kwargs)
    except FamError:
        raise
    except (OSError, ValueError, KeyError) as e:  # what transformers/safetensors raise
        raise load_error(path, e) from None
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "state_dict" not in str(e):
            raise
        raise load_error(path, e) from None
    check_finite(adapter.model, path)
    return adapter


def build_tiny(family: str = "qwen2_vl", out_dir: str | Path | None = None, **kwargs: Any,
               ) -> BackboneAdapter:
    """Build (and optionally save) a tiny random-initialised backbone of ``family``."""
    if family not in ADAPTERS:
        raise ConfigError(f"unknown backbone family {family!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[family].build_tiny(out_dir, **kwargs)


__all__ = ["ADAPTERS", "NATIVE_FAMILIES", "BackboneAdapter", "EncodedBatch", "build_tiny",
           "load_backbone", "Idefics3Adapter", "LlavaAdapter", "LlavaNextAdapter", "Phi3VAdapter",
           "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "SmolVLMAdapter"]
