"""The multi-vector reading of the embedding model's forward (late interaction, ColBERT/ColPali).

One forward of :class:`fam.model.EmbeddingModel` gives the pooled vector *and* the last
layer's token states; :class:`MultiVectorHead` reads the second: the tokens chosen by the
adapter's masks (``tokens``), an optional learned projection to a small dimension
(ColPali: 128, ``Linear`` without bias) and L2 normalisation per token. MaxSim over those
vectors is :func:`fam.losses.maxsim.maxsim`.

``tokens`` (which positions are vectors; the masks come from the backbone adapter):

- ``"content"``: image tokens and text-content tokens (no special, padding or, when the item
  says where its content is, instruction tokens);
- ``"image"``: image tokens only (colpali-engine's ``mask_non_image_embeddings``);
- ``"text"``: text-content tokens only;
- ``"all"``: every real token (special and instruction tokens included; padding never).

A trained head is saved beside the model (``fam_multivector.json`` and, with a projection,
``multivector.safetensors``); :func:`load_multivector` reads it back, and a model without it
reads its token states as they are (zero-shot late interaction).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fam.errors import ConfigError
from fam.model.embedding import EmbeddingOutput
from fam.utils.io import atomic_write_json

__all__ = ["MultiVectorHead", "TwoReadings", "TOKEN_SETS", "load_multivector", "save_multivector",
           "compact_tokens", "HEAD_CONFIG", "HEAD_WEIGHTS"]

#: ``tokens`` values (config/stages.py: MultiVectorConfig keeps the same tuple; a test checks).
TOKEN_SETS = ("content", "image", "text", "all")
HEAD_CONFIG = "fam_multivector.json"
HEAD_WEIGHTS = "multivector.safetensors"


class MultiVectorHead(nn.Module):
    """Token vectors from an :class:`~fam.model.EmbeddingOutput`.

    Args:
        hidden_size: the backbone's width.
        dim: projection width (0: no projection, the token states themselves).
        tokens: which positions are vectors (module docstring).
        similarity: ``"maxsim"`` or ``"meanmaxsim"``: how the vectors are meant to be scored
            (recorded with the head; training, evaluation, index and export read it).
    """

    def __init__(self, hidden_size: int, dim: int = 0, tokens: str = "content",
                 similarity: str = "meanmaxsim"):
        super().__init__()
        if tokens not in TOKEN_SETS:
            raise ConfigError(f"multivector tokens must be one of {TOKEN_SETS}, got {tokens!r}")
        self.hidden_size, self.dim, self.tokens, self.similarity = hidden_size, dim, tokens, similarity
        self.proj = nn.Linear(hidden_size, dim, bias=False) if dim else None

    @property
    def out_dim(self) -> int:
        return self.dim or self.hidden_size

    def token_mask(self, out: EmbeddingOutput) -> torch.Tensor:
        """(B, L) bool, the positions read as vectors."""
        return self.counted(out.attention_mask, out.image_mask, out.text_mask)

    def counted(self, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, the positions read as vectors, from an encoded batch's masks (so a
        batch says which of its tokens are vectors without a forward)."""
        real = attention_mask.bool()
        if self.tokens == "all":
            return real
        mask = {"image": image_mask, "text": text_mask,
                "content": image_mask | text_mask}[self.tokens]
        return mask.bool() & real

    def forward(self, out: EmbeddingOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (B, L, D), mask (B, L))``: unit vectors at every position (half precision
        upcast to float32); ``mask`` says which of them count."""
        h = out.last_hidden_state
        if self.proj is not None:
            h = self.proj(h.to(self.proj.weight.dtype))
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        return F.normalize(h, dim=-1), self.token_mask(out)

    def settings(self) -> dict:
        return {"hidden_size": self.hidden_size, "dim": self.dim, "tokens": self.tokens,
                "similarity": self.similarity}


def compact_tokens(vectors: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's counted vectors, ``[(n_i, D), ...]`` in sequence order."""
    return [vectors[i][mask[i]] for i in range(vectors.shape[0])]


def save_multivector(head: MultiVectorHead, model_dir: str | Path) -> None:
    """Write the head's settings (and projection) into a model folder."""
    model_dir = Path(model_dir)
    if head.proj is not None:
        from safetensors.torch import save_file
        save_file({"proj.weight": head.proj.weight.detach().float().cpu().contiguous()},
                  str(model_dir / HEAD_WEIGHTS))
    atomic_write_json(model_dir / HEAD_CONFIG, head.settings())


def load_multivector(model_dir: str | Path | None, hidden_size: int, *, tokens: str | None = None,
                     similarity: str | None = None) -> MultiVectorHead:
    """The model folder's trained head, or the plain reading of its token states.

    Args:
        model_dir: a model folder (None, a hub id or a folder without a head: no projection).
        hidden_size: the backbone's width (checked against a saved head).
        tokens, similarity: override the saved settings (None: the saved ones, or
            ``"content"`` / ``"meanmaxsim"`` without a head).
    """
    cfg_path = Path(model_dir) / HEAD_CONFIG if model_dir is not None else None
    if cfg_path is None or not cfg_path.is_file():
        return MultiVectorHead(hidden_size, 0, tokens or "content", similarity or "meanmaxsim")
    try:
        cfg = json.loads(cfg_path.read_text())
        dim, saved_hidden = int(cfg["dim"]), int(cfg["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg_path}: unreadable multi-vector head ({e}); re-export the model "
                          "or delete the file to read plain token states") from None
    if saved_hidden != hidden_size:
        raise ConfigError(f"{cfg_path}: the head was trained on width {saved_hidden}, the model "
                          f"has {hidden_size}; it belongs to another model")
    head = MultiVectorHead(hidden_size, dim, tokens or cfg.get("tokens", "content"),
                           similarity or cfg.get("similarity", "meanmaxsim"))
    if dim:
        from safetensors.torch import load_file
        w = Path(model_dir) / HEAD_WEIGHTS
        if not w.is_file():
            raise ConfigError(f"{w} is missing: {cfg_path} says the head projects to {dim} dims")
        head.proj.weight.data.copy_(load_file(str(w))["proj.weight"])
    return head.eval()


class TwoReadings:
    """An encoder giving both readings of one forward (what ``fam eval --scoring`` and the
    multi-vector index use).

    Args:
        model: the embedding model.
        head: its :class:`MultiVectorHead` (:func:`load_multivector`).
    """

    def __init__(self, model, head: MultiVectorHead):
        self.model, self.head = model, head
        self.adapter = model.adapter  # evaluate() records the adapter's input settings

    @property
    def similarity(self) -> str:
        return self.head.similarity

    def encode_all(self, items, batch_size: int = 32, progress: bool = False,
                   desc: str = "encode", images=None) -> torch.Tensor:
        """Pooled vectors only (as :meth:`fam.model.EmbeddingModel.encode_all`)."""
        return self.model.encode_all(items, batch_size=batch_size, progress=progress, desc=desc,
                                     images=images)

    def encode_multi_all(self, items, batch_size: int = 32, progress: bool = False,
                         desc: str = "encode", images=None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(pooled (n, d), [token vectors (n_i, D), ...])`` from one forward per batch."""
        from fam.model.encode import EncodePipeline
        return EncodePipeline(self.model, batch_size=batch_size, progress=progress, desc=desc,
                              multivector=self.head).encode_multi(items, images)
