"""LoRA / DoRA on the language model (peft): wrap, merge, save and load the adapter alone.

The HF model lives in one place, ``adapter.model`` (the backbone adapter is a module and
the embedding model holds the adapter), so each operation below replaces that one
attribute and every holder sees the change.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fam.config import LoraConfig
from fam.errors import ConfigError
from fam.model.embedding import EmbeddingModel

log = logging.getLogger(__name__)

__all__ = ["apply_lora", "merge_lora", "save_lora", "load_lora"]


def apply_lora(model: EmbeddingModel, cfg: LoraConfig) -> None:
    """Wrap the backbone with a fresh peft LoRA on the language model's linear layers.

    Everything else is frozen; the adapter keeps working (it unwraps peft transparently).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapter = model.adapter

    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=adapter.lora_target_modules(), use_dora=cfg.use_dora,
                          bias="none")
    adapter.model = get_peft_model(adapter.model, pcfg)
    n_train = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in adapter.model.parameters())
    log.info("LoRA r=%d alpha=%d: %d trainable of %d parameters (%.2f%%)", cfg.r, cfg.alpha,
             n_train, n_all, 100.0 * n_train / max(n_all, 1))


def merge_lora(model: EmbeddingModel) -> None:
    """Merge a peft LoRA into the base weights and drop the wrapper (FAM between stages)."""
    adapter = model.adapter
    if hasattr(adapter.model, "merge_and_unload"):
        adapter.model = adapter.model.merge_and_unload()


def save_lora(model: EmbeddingModel, out_dir: str | Path) -> Path:
    """Save only the LoRA/DoRA adapter (peft format: adapter_config.json + safetensors).

    A few MB instead of the whole model; :func:`load_lora` puts it back on the same base
    checkpoint. Written into a temporary directory and renamed into place.
    """
    from fam.utils.checkpoint import atomic_dir

    peft_model = model.adapter.model
    if not hasattr(peft_model, "peft_config"):
        raise ConfigError("save_lora: the model carries no LoRA adapter (was it merged?)")
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
    return Path(out_dir)


def load_lora(model: EmbeddingModel, adapter_dir: str | Path, trainable: bool = False) -> None:
    """Wrap the model's backbone with a saved peft adapter (e.g. from :func:`save_lora`)."""
    from peft import PeftModel

    adapter = model.adapter
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise ConfigError(f"{adapter_dir} has no adapter_config.json: not a peft adapter "
                          "directory")
    adapter.model = PeftModel.from_pretrained(adapter.model, str(adapter_dir),
                                              is_trainable=trainable)
