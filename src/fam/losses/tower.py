"""Image-text contrastive losses for pretraining a vision tower (CLIP, SigLIP).

LLaVA freezes a CLIP tower that was pretrained contrastively on image-text pairs; the
tiny tower of the Scenes study is pretrained the same way before it is frozen.

* **CLIP** (Radford et al. 2021): ``logits = exp(s) · î tᵀ`` over the batch, symmetric
  cross-entropy ``(CE(logits, arange) + CE(logitsᵀ, arange)) / 2``; the learnable log
  scale ``s`` starts at ``ln(1/0.07)`` and the scale is clipped at 100.
* **SigLIP** (Zhai et al. 2023): every pair is a binary problem, ``logits = exp(s) · î tᵀ
  + b``; label +1 on the diagonal, −1 elsewhere; loss ``−Σ log σ(label · logits) / B``
  (summed over the B² pairs, averaged over images); init ``s = ln 10``, ``b = −10``.

Both take L2-normalised or raw embeddings (they normalise inside) and return named terms;
accuracies are in-batch top-1 retrieval in both directions (detached).

Example:
    >>> img, txt = torch.randn(4, 8), torch.randn(4, 8)
    >>> out = clip_loss(img, txt, torch.tensor(2.659))
    >>> sorted(out)
    ['acc_i2t', 'acc_t2i', 'loss', 'scale']
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLIP_INIT_LOG_SCALE", "CLIP_MAX_SCALE", "SIGLIP_INIT_BIAS", "SIGLIP_INIT_LOG_SCALE",
           "clip_loss", "siglip_loss", "tower_loss"]

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_SCALE = 100.0
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def _check(image: Tensor, text: Tensor) -> None:
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"image and text embeddings must both be (B, d), got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] < 2:
        raise ValueError("a contrastive loss needs at least 2 pairs in the batch")


def _accuracies(sim: Tensor) -> dict[str, Tensor]:
    s = sim.detach()
    # ties never favour the positive: a row counts only if the diagonal is strictly best
    diag = s.diagonal()
    i2t = ((s > diag[:, None]).sum(1) == 0) & ((s == diag[:, None]).sum(1) == 1)
    t2i = ((s > diag[None, :]).sum(0) == 0) & ((s == diag[None, :]).sum(0) == 1)
    return {"acc_i2t": i2t.float().mean(), "acc_t2i": t2i.float().mean()}


def clip_loss(image: Tensor, text: Tensor, log_scale: Tensor) -> dict[str, Tensor]:
    """Symmetric InfoNCE of CLIP.

    Args:
        image: ``(B, d)`` image embeddings (pair ``i`` is image ``i`` with text ``i``).
        text: ``(B, d)`` text embeddings.
        log_scale: 0-d learnable log of the logit scale (clipped at ln 100 inside).

    Returns:
        ``loss`` (0-d), ``scale`` (detached), ``acc_i2t``, ``acc_t2i``.
    """
    _check(image, text)
    i = F.normalize(image.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    scale = log_scale.float().clamp(max=math.log(CLIP_MAX_SCALE)).exp()
    logits = scale * i @ t.T                                          # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return {"loss": loss, "scale": scale.detach(), **_accuracies(logits)}


def siglip_loss(image: Tensor, text: Tensor, log_scale: Tensor, bias: Tensor,
                ) -> dict[str, Tensor]:
    """Pairwise sigmoid loss of SigLIP.

    Args:
        image: ``(B, d)`` image embeddings.
        text: ``(B, d)`` text embeddings.
        log_scale: 0-d learnable log temperature ``s`` (scale ``exp(s)``).
        bias: 0-d learnable bias ``b``.

    Returns:
        ``loss`` (0-d), ``scale`` (detached), ``acc_i2t``, ``acc_t2i``.
    """
    _check(image, text)
    i = F.normalize(image.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    scale = log_scale.float().exp()
    logits = scale * i @ t.T + bias.float()
    labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1   # +1 diag, −1 off
    loss = -F.logsigmoid(labels * logits).sum() / logits.shape[0]
    return {"loss": loss, "scale": scale.detach(), **_accuracies(logits)}


def tower_loss(kind: str, image: Tensor, text: Tensor, log_scale: Tensor,
               bias: Tensor | None = None) -> dict[str, Tensor]:
    """Dispatch: ``kind`` is ``"clip"`` or ``"siglip"`` (which needs ``bias``)."""
    if kind == "clip":
        return clip_loss(image, text, log_scale)
    if kind == "siglip":
        if bias is None:
            raise ValueError("siglip_loss needs the learnable bias")
        return siglip_loss(image, text, log_scale, bias)
    raise ValueError(f"tower loss {kind!r}: expected 'clip' or 'siglip'")
