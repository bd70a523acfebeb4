"""Embedding-only loading: a backbone without its language-model head.

An embedding model pools the last hidden state; the LM head (``lm_head``, vocabulary × hidden:
1.1 GB in bf16 for a 7B Qwen2-VL with untied embeddings) is never used. Inside
:func:`embedding_only`, :meth:`BackboneAdapter._load_model` loads the family's *base* model
(``AutoModel``: ``Qwen2VLModel``, ``LlavaModel``, ...) from the same checkpoint instead of
the ``*ForConditionalGeneration`` class, so the head's weights are never read from disk nor
held in memory. The base model sits in a :class:`HeadlessModel`, which mirrors the one
attribute the adapters use (``.model``), so every adapter works unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from fam.errors import ConfigError

_EMBEDDING_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("fam_embedding_only",
                                                                       default=False)


@contextlib.contextmanager
def embedding_only() -> Iterator[None]:
    """Within this block, adapters load checkpoints without their LM head."""
    token = _EMBEDDING_ONLY.set(True)
    try:
        yield
    finally:
        _EMBEDDING_ONLY.reset(token)


def embedding_only_requested() -> bool:
    """Whether the caller is inside :func:`embedding_only`."""
    return _EMBEDDING_ONLY.get()


class HeadlessModel(nn.Module):
    """Stand-in for a ``*ForConditionalGeneration`` model that holds only its base model.

    Args:
        base: the transformers base model (``model.model`` of the generative class).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.model = base
        self.config = base.config

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("this model was loaded for embeddings only (no LM head): generative "
                          "use needs fam.load_backbone(path) instead")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("an embedding-only model cannot be saved as a checkpoint (its LM head "
                          "was never loaded); load it with fam.load_backbone(path) to save it")


class _DropHeadReport(logging.Filter):
    """Drop transformers' load report when its only entries are the skipped LM head."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" not in msg:
            return True
        rows = [ln for ln in msg.splitlines() if "|" in ln and not ln.startswith(("Key", "-"))]
        # e.g. "lm_head.weight", or "language_model.lm_head.weight" after LLaVA's key renaming
        return not rows or not all("lm_head." in r.split("|")[0] for r in rows)


def drop_lm_head(model: nn.Module) -> nn.Module:
    """``model`` without its LM head: a :class:`HeadlessModel` around its base model.

    For a model that had to be loaded whole (e.g. to merge a peft adapter, whose module names
    are the generative class's); the head's memory is freed with the returned model. Models
    without an ``lm_head`` (already headless, remote-code layouts) come back unchanged.
    """
    if isinstance(model, HeadlessModel) or not (hasattr(model, "lm_head") and
                                                hasattr(model, "model")):
        return model
    return HeadlessModel(model.model)


def load_headless(path: str | Path, **kwargs: Any) -> HeadlessModel:
    """Load the base model of the checkpoint at ``path`` (keyword arguments as ``from_pretrained``)."""
    from transformers import AutoModel

    hf_logger = logging.getLogger("transformers.modeling_utils")
    flt = _DropHeadReport()
    hf_logger.addFilter(flt)
    try:
        base = AutoModel.from_pretrained(str(path), **kwargs)
    finally:
        hf_logger.removeFilter(flt)
    base.eval()
    return HeadlessModel(base)
