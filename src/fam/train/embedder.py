"""The embedding model of a contrastive stage (MAC alignment, adaptation): what trains."""
from __future__ import annotations

import logging

from torch import nn

from fam.backbones import load_backbone
from fam.config import BackboneConfig, LoraConfig, RunConfig
from fam.errors import ConfigError
from fam.model import EmbeddingModel, apply_lora

log = logging.getLogger(__name__)

__all__ = ["prepare_embedder", "enable_gradient_checkpointing"]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute transformer-layer activations in backward (``run.gradient_checkpointing``).

    Uses transformers' non-reentrant checkpointing, which needs no input gradients (works
    with LoRA on frozen embeddings) and replays the RNG state, so dropout and therefore
    gradients are unchanged. Only active in ``train()`` mode (transformers' rule).

    Args:
        model: an :class:`fam.model.EmbeddingModel` (or anything with ``.adapter``).
    """
    hf = model.adapter.hf_model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("gradient checkpointing on (%s)", type(hf).__name__)


def prepare_embedder(model: str, run: RunConfig, *, max_text_tokens: int | str | None,
                     full_finetune: bool, freeze_vision: bool, lora: LoraConfig,
                     backbone: BackboneConfig | None = None) -> EmbeddingModel:
    """Load a backbone and choose what trains: a fresh LoRA, or the weights (full FT).

    With full fine-tuning the vision tower stays frozen when ``freeze_vision`` (the adapter
    knows which parameters are vision parameters). ``backbone`` sets the prompt format,
    image pre-resize and pixel budget (unset: what ``model`` was saved with); the exported
    model records them.
    """
    adapter = load_backbone(model, max_text_tokens=max_text_tokens,
                            attn_implementation=run.attn_implementation or None,
                            **(backbone.load_options() if backbone is not None else {}))
    emb = EmbeddingModel(adapter)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    if full_finetune:
        for name, p in adapter.model.named_parameters():
            if not (freeze_vision and adapter.is_vision_param(name)):
                p.requires_grad_(True)
    elif lora.enabled:
        apply_lora(emb, lora)
    else:
        raise ConfigError("nothing to train: set lora.enabled=true or full_finetune=true")
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(emb)
    return emb
