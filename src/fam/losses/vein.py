"""Vision Embedding Inversion (VEIN), FAM stage 2 (method.md §3).

At a layer ``l`` of the LVLM, a fraction γ of the image-token states ``H^l`` is masked;
a one-layer Transformer decoder must reconstruct them from the embedding-token state
``e^l`` (as a query) and the **unmasked** image tokens (as memory). If ``e^l`` carries the
visual detail, reconstruction is easy; the loss thus pushes visual information into the
embedding. ``L_rec = mean over masked j of 1 − cos(Ĥ^l[j], H^l[j])``.

The decoder is a training-time auxiliary: it is never part of the exported embedding
model. Everything here is pure tensor code; which layers, tokens and samples are used is
decided by the caller (the backbone adapter gives the masks, :func:`vein_eligible` the
sample rule).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fam.utils.layers import resolve_layer

logger = logging.getLogger(__name__)

__all__ = ["VeinDecoder", "VeinHead", "vein_eligible", "vein_mask_positions", "sinusoidal_positions"]

_VQA_TASKS = {"vqa"}


def vein_eligible(has_image: bool, meta_task: str, override: bool | None = None) -> bool:
    """Whether a query/target side gets the VEIN loss (method.md §3 **[choice]**).

    Rule: the side contains an image and its task is not VQA-type (for VQA the answer
    text, not the image content, is what the embedding must encode). A per-dataset
    ``override`` wins over the rule.

    Args:
        has_image: the sample side has at least one image.
        meta_task: MMEB meta-task, e.g. ``"classification"``, ``"vqa"``, ``"retrieval"``,
            ``"grounding"`` (case-insensitive).
        override: True/False forces the answer; None applies the rule.

    Returns:
        True when the side should be reconstructed.
    """
    if override is not None:
        return bool(override)
    return bool(has_image) and meta_task.strip().lower() not in _VQA_TASKS


def sinusoidal_positions(n: int, d: int, device=None, dtype=torch.float32) -> Tensor:
    """Fixed sinusoidal position encodings (Vaswani et al. 2017, §3.5).

    Args:
        n: number of positions.
        d: width; odd widths get one extra sine channel, truncated.

    Returns:
        ``(n, d)`` tensor, ``pe[p, 2i] = sin(p/10000^{2i/d})``, ``pe[p, 2i+1] = cos(...)``.
    """
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]  # (n, 1)
    half = (d + 1) // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) * 2 / d)
    ang = pos * freq[None]  # (n, half)
    pe = torch.stack([ang.sin(), ang.cos()], dim=-1).reshape(n, 2 * half)[:, :d]
    return pe.to(dtype)


def vein_mask_positions(valid: Tensor, gamma: float, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Draw the masked image-token positions, per sample (method.md §3).

    Sample ``b`` with ``n_b`` valid tokens gets ``k_b = max(1, ⌊γ·n_b⌋)`` masked positions,
    uniformly at random among its valid ones; ``k_b`` is capped at ``n_b − 1`` so that at
    least one token is left as decoder memory. Padding is never chosen.

    Args:
        valid: ``(B, N)`` bool, True for real image tokens; every row needs >= 2.
        gamma: mask ratio γ in (0, 1).
        generator: RNG for reproducible masks (its device is used to draw the noise).

    Returns:
        ``(masked, idx, k)``: ``masked (B, N)`` bool; ``idx (B, K_max)`` the masked
        positions (entries ``>= k_b`` of a row are filler, ignore them); ``k (B,)`` long.

    Raises:
        ValueError: if gamma is out of range or a row has fewer than 2 valid tokens.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"VEIN mask ratio gamma must be in (0, 1); got {gamma}.")
    b, n = valid.shape
    n_valid = valid.sum(dim=1)  # (B,)
    too_few = (n_valid < 2).nonzero().flatten()
    if too_few.numel():
        raise ValueError(
            f"VEIN: samples {too_few.tolist()} have fewer than 2 image tokens "
            f"({n_valid[too_few].tolist()}); reconstruction needs >= 1 masked and >= 1 visible "
            "token. Exclude them with sample_mask (vein_eligible) or fix the image mask.")
    # +1e-9: γ·n computed in float64 must not fall just below an integer (0.29·100).
    k = (n_valid.double() * gamma + 1e-9).floor().long().clamp(min=1)
    k = torch.minimum(k, n_valid - 1)
    gen_device = generator.device if generator is not None else valid.device
    noise = torch.rand(b, n, generator=generator, device=gen_device).to(valid.device)
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last, never among the first k
    order = noise.argsort(dim=1)  # (B, N): a random permutation of the valid positions first
    k_max = int(k.max())
    idx = order[:, :k_max]  # (B, K_max)
    slot_valid = torch.arange(k_max, device=valid.device)[None] < k[:, None]  # (B, K_max)
    masked = torch.zeros(b, n, dtype=torch.bool, device=valid.device)
    masked.scatter_(1, idx, slot_valid)
    return masked, idx, k


def _num_heads(d: int, requested: int | None) -> int:
    if requested is not None:
        if d % requested:
            raise ValueError(f"VEIN: num_heads={requested} does not divide hidden size {d}.")
        return requested
    # Official code: 8 heads. Widths not divisible by 8 (tiny test models) use the largest
    # divisor of d that is <= 8.
    return max(h for h in range(1, 9) if d % h == 0)


class VeinDecoder(nn.Module):
    """One VEIN decoder: reconstructs masked image-token states of one layer (method.md §3).

    Architecture: a learnable mask token ``m`` (d), fixed sinusoidal position encodings
    over the image-token index, and one standard ``nn.TransformerDecoderLayer``
    (self-attention, cross-attention, FFN of width 2d, post-LayerNorm as in the original
    Transformer and PyTorch's default **[choice]**). Queries are
    ``[e ; m + pos_j for masked j]`` (the embedding state carries no position encoding:
    it is not an image position); memory is the unmasked image tokens ``+ pos``, with the
    masked and padding positions excluded by the key padding mask (and zeroed, so they
    cannot leak in). The prediction for masked ``j`` is the output at its query slot.

    Inputs are cast to the decoder's parameter dtype (keep the decoder in float32 and
    use autocast for mixed precision).

    Args:
        hidden_size: d, the LVLM hidden size.
        gamma: mask ratio γ (0.3, paper's best; > 0.8 hurts).
        num_heads: attention heads; None = 8 (official code), or the largest divisor of
            d that is <= 8 when 8 does not divide d.
        detach_target: detach the image-token states (targets and memory; official code,
            default True): the reconstruction gradient then reaches the LVLM only through
            the embedding token. False lets it reach the visual tokens too.
        dropout: dropout inside the decoder layer (0.0 **[choice]**: the random masking
            already regularises, and it keeps the loss deterministic given the mask).
    """

    def __init__(self, hidden_size: int, gamma: float = 0.3, num_heads: int | None = None,
                 detach_target: bool = True, dropout: float = 0.0):
        super().__init__()
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"VEIN gamma must be in (0, 1); got {gamma}.")
        self.hidden_size = hidden_size
        self.gamma = gamma
        self.detach_target = detach_target
        self.mask_token = nn.Parameter(torch.randn(hidden_size) * 0.02)  # MAE-style init
        self.layer = nn.TransformerDecoderLayer(
            d_model=hidden_size, nhead=_num_heads(hidden_size, num_heads),
            dim_feedforward=2 * hidden_size, dropout=dropout, batch_first=True, norm_first=False)

    def forward(self, tokens: Tensor, emb: Tensor, image_mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mask, decode and score one layer.

        Args:
            tokens: ``(B, N, d)`` image-token states ``H^l``.
            emb: ``(B, d)`` embedding-token state ``e^l``.
            image_mask: ``(B, N)``, 1 for real image tokens (None: all real).
            generator: RNG for the mask positions.

        Returns:
            dict with ``loss`` (scalar: per-sample mean over masked tokens of
            ``1 − cos``, then mean over samples), ``per_sample`` ``(B,)``, ``masked``
            ``(B, N)`` bool and ``pred`` ``(B, K_max, d)``.
        """
        b, n, d = tokens.shape
        if d != self.hidden_size or emb.shape != (b, d):
            raise ValueError(f"VeinDecoder(hidden_size={self.hidden_size}): expected tokens (B, N, d) "
                             f"and emb (B, d); got {tuple(tokens.shape)} and {tuple(emb.shape)}.")
        valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if image_mask is None \
            else image_mask.to(device=tokens.device, dtype=torch.bool)
        masked, idx, k = vein_mask_positions(valid, self.gamma, generator)
        k_max = idx.shape[1]
        slot_valid = torch.arange(k_max, device=tokens.device)[None] < k[:, None]  # (B, K_max)

        dtype = self.mask_token.dtype
        x = tokens.to(dtype)
        if self.detach_target:
            # Official code: the image-token states are detached, so L_rec reaches the
            # LVLM only through the embedding token e^l (method.md §3). Detaching x detaches
            # both the reconstruction targets and the unmasked memory tokens.
            x = x.detach()
        pos = sinusoidal_positions(n, d, device=tokens.device, dtype=dtype)  # (N, d)
        memory = x.masked_fill(masked[..., None], 0.0) + pos  # (B, N, d)
        memory_pad = masked | ~valid  # True = not attended
        queries = torch.cat([emb.to(dtype)[:, None], self.mask_token + pos[idx]], dim=1)  # (B, 1+K, d)
        query_pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=tokens.device), ~slot_valid], 1)
        out = self.layer(queries, memory, tgt_key_padding_mask=query_pad,
                         memory_key_padding_mask=memory_pad)  # (B, 1+K, d)
        pred = out[:, 1:]  # (B, K_max, d)

        target = x.gather(1, idx[..., None].expand(b, k_max, d))  # (B, K_max, d)
        if pred.dtype in (torch.float16, torch.bfloat16):  # float64 stays float64
            pred, target = pred.float(), target.float()
        cos = F.cosine_similarity(pred, target, dim=-1)  # (B, K_max)
        per_sample = ((1.0 - cos) * slot_valid).sum(dim=1) / k
        return {"loss": per_sample.mean(), "per_sample": per_sample, "masked": masked, "pred": pred}


class VeinHead(nn.Module):
    """VEIN on several layers: one :class:`VeinDecoder` per layer (method.md §3).

    ``L_rec`` is the **mean** over the configured layers **[choice]** (the official code
    supports a single layer; the mean keeps λ's scale independent of how many layers).

    Args:
        hidden_size: d.
        layers: layer indices, e.g. ``[-3, -2, -1]`` (paper default for Qwen2-VL-2B) or
            ``[-1]`` (larger backbones). Negative indices are resolved against
            ``num_layers`` at construction.
        num_layers: length of the per-layer sequence the indices refer to, e.g.
            ``len(outputs.hidden_states)`` of a transformers model (embeddings + each
            layer), so that ``-1`` is the final layer.
        gamma, num_heads, detach_target, dropout: see :class:`VeinDecoder`.
    """

    def __init__(self, hidden_size: int, layers: Sequence[int], num_layers: int, gamma: float = 0.3,
                 num_heads: int | None = None, detach_target: bool = True, dropout: float = 0.0):
        super().__init__()
        if not layers:
            raise ValueError("VeinHead: layers is empty; give at least one layer index (e.g. [-1]).")
        self.num_layers = num_layers
        self.layers = [self.resolve_layer(l) for l in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"VeinHead: layers {list(layers)} resolve to duplicates {self.layers} "
                             f"(num_layers={num_layers}).")
        self.decoders = nn.ModuleDict({
            str(l): VeinDecoder(hidden_size, gamma=gamma, num_heads=num_heads,
                                detach_target=detach_target, dropout=dropout)
            for l in self.layers})

    def resolve_layer(self, layer: int) -> int:
        """Map a layer index to ``[0, num_layers)`` with fam's one convention
        (:func:`fam.utils.layers.resolve_layer`; -1 = last, 0 = input embeddings)."""
        return resolve_layer(layer, self.num_layers - 1, allow_input=True)

    def _lookup(self, per_layer: Mapping[int, Tensor], layer: int, what: str) -> Tensor:
        for key, value in per_layer.items():
            if self.resolve_layer(int(key)) == layer:
                return value
        raise KeyError(f"VeinHead: {what} has no entry for layer {layer} (keys: {list(per_layer)}); "
                       f"the caller must return states for layers {self.layers}.")

    def forward(self, hidden_states_per_layer: Mapping[int, Tensor], emb_per_layer: Mapping[int, Tensor],
                image_mask: Tensor | None = None, sample_mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict:
        """VEIN loss over the eligible samples.

        Args:
            hidden_states_per_layer: ``{layer: (B, N, d)}`` image-token states (keys may be
                negative or resolved indices).
            emb_per_layer: ``{layer: (B, d)}`` embedding-token (EOS) states.
            image_mask: ``(B, N)``, 1 for real image tokens (None: all real).
            sample_mask: ``(B,)`` bool, True for samples VEIN applies to
                (:func:`vein_eligible`); None: all.
            generator: RNG for the mask positions (drawn layer after layer).

        Returns:
            dict with ``loss`` (scalar, mean over layers), ``per_layer``
            (``{layer: scalar}``) and ``n_samples`` (int, eligible samples). With no
            eligible sample the loss is ``0 · Σ params``: zero, but connected to every
            decoder parameter, so DDP's reducer still sees a gradient for each of them and
            does not hang waiting for the ranks that did have samples.
        """
        first = self._lookup(hidden_states_per_layer, self.layers[0], "hidden_states_per_layer")
        b = first.shape[0]
        sel = torch.ones(b, dtype=torch.bool, device=first.device) if sample_mask is None \
            else sample_mask.to(device=first.device, dtype=torch.bool)
        if sel.shape != (b,):
            raise ValueError(f"VeinHead: sample_mask must be (B,) = ({b},); got {tuple(sel.shape)}.")
        rows = sel.nonzero().flatten()
        n_samples = int(rows.numel())
        if n_samples == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {"loss": zero, "per_layer": {l: zero.detach() for l in self.layers}, "n_samples": 0}
        per_layer = {}
        for layer in self.layers:
            h = self._lookup(hidden_states_per_layer, layer, "hidden_states_per_layer")[rows]
            e = self._lookup(emb_per_layer, layer, "emb_per_layer")[rows]
            m = image_mask[rows] if image_mask is not None else None
            per_layer[layer] = self.decoders[str(layer)](h, e, m, generator=generator)["loss"]
        loss = torch.stack(list(per_layer.values())).mean()
        return {"loss": loss, "per_layer": per_layer, "n_samples": n_samples}
