"""Vision Embedding Inversion (VEIN), FAM stage 2 (method.md §3, which also lists the official
code fact by fact and every difference).

At a layer ``l`` of the LVLM, a fraction γ of the image-token states ``H^l`` is masked; a
one-layer Transformer decoder must reconstruct them, with the embedding-token state ``e^l``
as its first query. What else the decoder may read is the variant (``memory``):

- ``"unmasked"`` (the paper's and the official code's VEIN, the reproduction default): the
  **unmasked** image tokens are the decoder's memory. It tests the paper's claim that
  reconstructing masked visual features "from the embedding" pushes visual detail into
  ``e^l``. Measured weakness: the decoder can rebuild the masked 30 % from the 70 % it still
  sees, so ``L_rec`` need not depend on ``e^l`` at all — and with detached targets ``e^l`` is
  the loss's only path into the backbone.
- ``"embedding"`` (inversion in the literal sense): the memory is ``e^l`` itself (plus, with
  ``visible_ratio > 0``, that small fraction of the image tokens); every masked token must be
  rebuilt from ``e^l`` and its position query. It tests whether *forcing* ``e^l`` to carry
  the visual content helps the embedding; ``L_rec`` depends on ``e^l`` by construction.

``L_rec`` = mean over the masked tokens of ``1 − cos(Ĥ^l[j], T^l[j])`` (the paper's formula;
the official code's ``.mean()`` over all masked tokens of the batch), where the target
``T = H`` or, as in the official code, ``H + PE`` (``target_pos``). Over several layers the
mean of the layers' losses. Under DDP the mean is over the **global** batch
(:func:`global_mean`): one process on the concatenated batch gives the same loss and
gradient.

**Diagnostic.** With ``shuffle_check`` the decoder is run a second time (no gradient, same
masks and dropout draws) with ``e`` shuffled across the batch (each sample gets another's):
``loss_shuffled``. If it equals ``loss``, the decoder ignores ``e`` and VEIN teaches the
model nothing (:func:`vein_verdict`). :func:`fam.train.gradcache.grad_norms` measures the
gradient each loss term sends into the backbone.

The decoder is a training-time auxiliary: it is never part of the exported embedding
model. Everything here is tensor code; which layers, tokens and samples are used is decided
by the caller (the backbone adapter gives the masks, :func:`vein_eligible` the sample rule).

Length: the decoder with its two variants, the multi-layer head, the global-batch mean and
the diagnostic are one unit (method.md §3); splitting them would scatter the
one definition of L_rec.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fam import distributed as dist_utils
from fam.utils.layers import resolve_layer

logger = logging.getLogger(__name__)

__all__ = ["VeinDecoder", "VeinHead", "vein_eligible", "vein_mask_positions",
           "sinusoidal_positions", "default_vein_layers", "global_mean", "global_sums",
           "vein_verdict", "VEIN_MEMORY", "MASK_INITS", "SAME_RTOL"]

_VQA_TASKS = {"vqa"}

#: ``vein.memory`` values and what each tests (see the module docstring).
VEIN_MEMORY = {
    "unmasked": "paper/official VEIN: the decoder reads the unmasked image tokens and e",
    "embedding": "inversion: the decoder reads e (and visible_ratio of the tokens) only",
}
#: ``vein.mask_init`` values: the learnable mask token's initialisation.
MASK_INITS = {
    "official": "N(0, 1) per channel (torch.randn, the official code)",
    "mae": "N(0, 0.02²) per channel (MAE's mask token)",
}
#: Total parameter count above which the paper uses only the last layer (its 2B model,
#: Qwen2-VL-2B ≈ 2.2B, uses the last three; Phi-3.5-V 4.2B and Qwen2-VL-7B the last one).
LARGE_BACKBONE_PARAMS = 3_000_000_000


def vein_eligible(has_image: bool, meta_task: str, override: bool | None = None) -> bool:
    """Whether a query/target side gets the VEIN loss (method.md §3 **[choice]**).

    Rule: the side contains an image and its task is not VQA-type (for VQA the answer
    text, not the image content, is what the embedding must encode). A per-dataset
    ``override`` wins over the rule. (The official code uses a per-dataset table of
    "pure vision" sides instead; see method.md §3.1.)

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


def default_vein_layers(num_params: int, num_layers: int) -> list[int]:
    """The paper's VEIN layers for a backbone: the last three for its 2B model, the last
    one for larger backbones (FAM Table 5 and §4; the official code applies one layer,
    ``vein_layer_to_apply = -1``).

    Args:
        num_params: total parameters of the backbone.
        num_layers: decoder layers of its language model (a model with fewer than three
            gets all of them).

    Returns:
        Negative layer indices, e.g. ``[-3, -2, -1]`` or ``[-1]``.
    """
    if num_params > LARGE_BACKBONE_PARAMS:
        return [-1]
    return list(range(-min(3, max(1, num_layers)), 0))


def sinusoidal_positions(n: int, d: int, device=None, dtype=torch.float32) -> Tensor:
    """Fixed sinusoidal position encodings (Vaswani et al. 2017, §3.5; the official code's
    ``PositionalEncoding``).

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
    return _draw(valid, k, generator)


def _draw(valid: Tensor, k: Tensor, generator: torch.Generator | None
          ) -> tuple[Tensor, Tensor, Tensor]:
    """``k[b]`` uniformly random positions among row ``b``'s valid ones (see above)."""
    b, n = valid.shape
    gen_device = generator.device if generator is not None else valid.device
    noise = torch.rand(b, n, generator=generator, device=gen_device).to(valid.device)
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last, never among the first k
    order = noise.argsort(dim=1)  # (B, N): a random permutation of the valid positions first
    k_max = int(k.max()) if k.numel() else 0
    idx = order[:, :k_max]  # (B, K_max)
    slot_valid = torch.arange(k_max, device=valid.device)[None] < k[:, None]  # (B, K_max)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=valid.device)
    chosen.scatter_(1, idx, slot_valid)
    return chosen, idx, k


def _positions_of(masked: Tensor) -> tuple[Tensor, Tensor]:
    """``(idx, k)`` of a given ``(B, N)`` mask: each row's True positions first, ascending."""
    k = masked.sum(dim=1)
    order = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)
    return order[:, :max(int(k.max()) if k.numel() else 0, 1)], k


def _num_heads(d: int, requested: int | None) -> int:
    if requested is not None:
        if d % requested:
            raise ValueError(f"VEIN: num_heads={requested} does not divide hidden size {d}.")
        return requested
    # Official code: 8 heads. Widths not divisible by 8 (tiny test models) use the largest
    # divisor of d that is <= 8.
    return max(h for h in range(1, 9) if d % h == 0)


@contextlib.contextmanager
def _replayed_rng(state: tuple[Tensor, Tensor | None] | None, device: torch.device):
    """Run a block with the RNG state ``state`` (CPU, CUDA) and restore the current one
    afterwards: the block sees the same random draws as the block that started at
    ``state`` and the caller's stream is left untouched. ``None``: a plain block."""
    if state is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield


class VeinDecoder(nn.Module):
    """One VEIN decoder: reconstructs masked image-token states of one layer (method.md §3).

    Architecture (official code, ``EmbeddingGuidedVisualReconstructor`` strategy 1): a
    learnable mask token ``m`` (d), fixed sinusoidal position encodings over the image-token
    index, and one standard ``nn.TransformerDecoderLayer`` (self-attention, cross-attention,
    FFN of width 2d, post-LayerNorm, ReLU). Queries are ``[e ; m + pos_j for masked j]`` (the
    embedding state carries no position encoding); the prediction for masked ``j`` is the
    output at its query slot. Memory (``memory``):

    - ``"unmasked"``: the unmasked image tokens ``+ pos`` (the masked and padding positions
      are excluded by the key padding mask, and zeroed so they cannot leak in).
    - ``"embedding"``: ``[e ; v + pos for v in a random visible_ratio of the tokens]`` —
      with ``visible_ratio = 0`` the decoder reads ``e`` alone.

    Inputs are cast to the decoder's parameter dtype (keep the decoder in float32 and
    use autocast for mixed precision; the official code stores it in bf16).

    Args:
        hidden_size: d, the LVLM hidden size.
        gamma: mask ratio γ (0.3, paper's best; > 0.8 hurts; official default 0.1, its
            Phi-3.5-V script 0.2).
        num_heads: attention heads; None = 8 (official code), or the largest divisor of
            d that is <= 8 when 8 does not divide d.
        detach_target: detach the image-token states (targets and memory; the official code
            always does): the reconstruction gradient then reaches the LVLM only through the
            embedding token. False lets it reach the visual tokens too.
        dropout: dropout inside the decoder layer (0.0 **[choice]**: the random masking
            already regularises and it keeps the loss deterministic given the mask; the
            official code uses 0.1).
        memory: ``"unmasked"`` (paper) or ``"embedding"`` (inversion), see
            :data:`VEIN_MEMORY`.
        target_pos: reconstruct ``H + PE`` (official code, ``vein_add_pos_to_target=True``)
            instead of ``H``.
        mask_init: ``"official"`` (N(0, 1)) or ``"mae"`` (N(0, 0.02²)), see :data:`MASK_INITS`.
        visible_ratio: with ``memory="embedding"``, the fraction of each sample's image
            tokens (among the unmasked ones) given to the decoder as memory besides ``e``;
            at most ``1 − γ``. Ignored with ``"unmasked"``.
    """

    def __init__(self, hidden_size: int, gamma: float = 0.3, num_heads: int | None = None,
                 detach_target: bool = True, dropout: float = 0.0, memory: str = "unmasked",
                 target_pos: bool = True, mask_init: str = "official", visible_ratio: float = 0.0):
        super().__init__()
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"VEIN gamma must be in (0, 1); got {gamma}.")
        if memory not in VEIN_MEMORY:
            raise ValueError(f"VEIN memory must be one of {sorted(VEIN_MEMORY)}; got {memory!r}.")
        if mask_init not in MASK_INITS:
            raise ValueError(f"VEIN mask_init must be one of {sorted(MASK_INITS)}; "
                             f"got {mask_init!r}.")
        if not 0.0 <= visible_ratio <= 1.0 - gamma:
            raise ValueError(f"VEIN visible_ratio must be in [0, 1 - gamma] = [0, {1 - gamma:g}]; "
                             f"got {visible_ratio}.")
        self.hidden_size = hidden_size
        self.gamma = gamma
        self.detach_target = detach_target
        self.memory = memory
        self.target_pos = target_pos
        self.visible_ratio = visible_ratio if memory == "embedding" else 0.0
        std = 1.0 if mask_init == "official" else 0.02
        self.mask_token = nn.Parameter(torch.randn(hidden_size) * std)
        self.layer = nn.TransformerDecoderLayer(
            d_model=hidden_size, nhead=_num_heads(hidden_size, num_heads),
            dim_feedforward=2 * hidden_size, dropout=dropout, batch_first=True, norm_first=False)

    def _decode(self, x: Tensor, emb: Tensor, pos: Tensor, masked: Tensor, idx: Tensor,
                slot_valid: Tensor, valid: Tensor, visible: Tensor | None) -> Tensor:
        """Predictions ``(B, K_max, d)`` for the masked slots, given ``e`` = ``emb``."""
        b = x.shape[0]
        no_pad = torch.zeros(b, 1, dtype=torch.bool, device=x.device)
        e = emb.to(x.dtype)[:, None]  # (B, 1, d)
        queries = torch.cat([e, self.mask_token + pos[idx]], dim=1)  # (B, 1+K, d)
        query_pad = torch.cat([no_pad, ~slot_valid], dim=1)
        if self.memory == "unmasked":
            memory = x.masked_fill(masked[..., None], 0.0) + pos  # (B, N, d)
            memory_pad = masked | ~valid  # True = not attended
        elif self.visible_ratio == 0:
            memory, memory_pad = e, None  # e alone: every masked token is rebuilt from it
        else:
            tokens = x.masked_fill(~visible[..., None], 0.0) + pos
            memory = torch.cat([e, tokens], dim=1)  # (B, 1+N, d)
            memory_pad = torch.cat([no_pad, ~visible], dim=1)
        out = self.layer(queries, memory, tgt_key_padding_mask=query_pad,
                         memory_key_padding_mask=memory_pad)  # (B, 1+K, d)
        return out[:, 1:]

    def forward(self, tokens: Tensor, emb: Tensor, image_mask: Tensor | None = None,
                generator: torch.Generator | None = None, masked: Tensor | None = None,
                shuffle_check: bool = False) -> dict[str, Tensor]:
        """Mask, decode and score one layer.

        Args:
            tokens: ``(B, N, d)`` image-token states ``H^l``.
            emb: ``(B, d)`` embedding-token state ``e^l``.
            image_mask: ``(B, N)``, 1 for real image tokens (None: all real).
            generator: RNG for the mask (and visible) positions.
            masked: ``(B, N)`` bool, given masked positions instead of drawing them (tests,
                replays); must lie within ``image_mask`` and leave >= 1 token per row.
            shuffle_check: also compute ``loss_shuffled`` (see Returns).

        Returns:
            dict with ``loss`` (scalar: mean over all masked tokens of ``1 − cos``),
            ``sum`` (scalar, the sum of those terms) and ``count`` (int, masked tokens),
            ``per_sample`` ``(B,)`` (each sample's mean), ``masked`` ``(B, N)`` bool,
            ``pred`` ``(B, K_max, d)``; with ``shuffle_check`` also ``sum_shuffled`` /
            ``loss_shuffled`` (detached): the same with ``e`` rolled by one sample (every
            sample gets another's), same masks, same dropout draws (with B = 1, nothing to
            shuffle: the sample's own loss).
        """
        b, n, d = tokens.shape
        if d != self.hidden_size or emb.shape != (b, d):
            raise ValueError(f"VeinDecoder(hidden_size={self.hidden_size}): expected tokens (B, N, d) "
                             f"and emb (B, d); got {tuple(tokens.shape)} and {tuple(emb.shape)}.")
        valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if image_mask is None \
            else image_mask.to(device=tokens.device, dtype=torch.bool)
        if masked is None:
            # Module-level lookup (not a bound import): tests substitute the draw.
            masked, idx, k = vein_mask_positions(valid, self.gamma, generator)
        else:
            masked = masked.to(device=tokens.device, dtype=torch.bool)
            left = (valid & ~masked).sum(1)
            if (masked & ~valid).any() or (masked.sum(1) < 1).any() or (left < 1).any():
                raise ValueError("VeinDecoder: a given mask must pick >= 1 valid token per row "
                                 "and leave >= 1 valid token unmasked.")
            idx, k = _positions_of(masked)
        visible = None
        if self.memory == "embedding" and self.visible_ratio > 0:
            k_vis = (valid.sum(1).double() * self.visible_ratio + 1e-9).floor().long()
            free = valid & ~masked
            visible = _draw(free, torch.minimum(k_vis, free.sum(1)), generator)[0]
        k_max = idx.shape[1]
        slot_valid = torch.arange(k_max, device=tokens.device)[None] < k[:, None]  # (B, K_max)

        dtype = self.mask_token.dtype
        x = tokens.to(dtype)
        if self.detach_target:
            # Official code: the image-token states are detached, so L_rec reaches the
            # LVLM only through the embedding token e^l (method.md §3). Detaching x detaches
            # both the reconstruction targets and the memory tokens.
            x = x.detach()
        pos = sinusoidal_positions(n, d, device=tokens.device, dtype=dtype)  # (N, d)
        target = x.gather(1, idx[..., None].expand(b, k_max, d))  # (B, K_max, d)
        if self.target_pos:
            target = target + pos[idx]  # official code: add_pos_to_gt, target = V + PE

        # Dropout draws are replayed for the shuffled pass, so that the two losses differ
        # only through e.
        replay = shuffle_check and self.training and any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in self.layer.modules())
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(tokens.device)
               if tokens.device.type == "cuda" else None) if replay else None
        pred = self._decode(x, emb, pos, masked, idx, slot_valid, valid, visible)
        terms = self._terms(pred, target, slot_valid)  # (B, K_max), 0 at filler slots
        total = terms.sum()
        count = int(k.sum())
        out = {"loss": total / count, "sum": total, "count": count,
               "per_sample": terms.sum(dim=1) / k, "masked": masked, "pred": pred}
        if shuffle_check:
            # (With B = 1 the roll is the identity: the sample's own loss. The pass still runs,
            # so every rank runs the decoder equally often — FSDP gathers it in each forward.)
            with torch.no_grad(), _replayed_rng(rng, tokens.device):
                shuffled = emb.detach().roll(1, dims=0)
                p2 = self._decode(x.detach(), shuffled, pos, masked, idx, slot_valid, valid,
                                  visible)
                s2 = self._terms(p2, target.detach(), slot_valid).sum()
            out["sum_shuffled"], out["loss_shuffled"] = s2, s2 / count
        return out

    @staticmethod
    def _terms(pred: Tensor, target: Tensor, slot_valid: Tensor) -> Tensor:
        # Half precision is compared in float32; float64 stays float64.
        if pred.dtype in (torch.float16, torch.bfloat16):
            pred, target = pred.float(), target.float()
        cos = F.cosine_similarity(pred, target, dim=-1)  # (B, K_max)
        return (1.0 - cos) * slot_valid


class VeinHead(nn.Module):
    """VEIN on several layers: one :class:`VeinDecoder` per layer (method.md §3).

    ``L_rec`` is the **mean** over the configured layers **[choice]** (the official code
    supports a single layer; the mean keeps λ's scale independent of how many layers).
    Each layer's loss is the mean over its masked tokens; every layer masks the same number
    of tokens per sample (``k_b`` depends only on ``n_b``), so the head's ``sum`` /
    ``count`` form one mean that can be reduced across chunks and ranks.

    Args:
        hidden_size: d.
        layers: layer indices, e.g. ``[-3, -2, -1]`` (paper default for Qwen2-VL-2B) or
            ``[-1]`` (larger backbones; see :func:`default_vein_layers`). Negative indices
            are resolved against ``num_layers`` at construction.
        num_layers: length of the per-layer sequence the indices refer to, e.g.
            ``len(outputs.hidden_states)`` of a transformers model (embeddings + each
            layer), so that ``-1`` is the final layer.
        gamma, num_heads, detach_target, dropout, memory, target_pos, mask_init,
        visible_ratio: see :class:`VeinDecoder`.
    """

    def __init__(self, hidden_size: int, layers: Sequence[int], num_layers: int, gamma: float = 0.3,
                 num_heads: int | None = None, detach_target: bool = True, dropout: float = 0.0,
                 memory: str = "unmasked", target_pos: bool = True, mask_init: str = "official",
                 visible_ratio: float = 0.0):
        super().__init__()
        if not layers:
            raise ValueError("VeinHead: layers is empty; give at least one layer index (e.g. [-1]).")
        self.num_layers = num_layers
        self.layers = [self.resolve_layer(l) for l in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"VeinHead: layers {list(layers)} resolve to duplicates {self.layers} "
                             f"(num_layers={num_layers}).")
        self.memory = memory
        self.decoders = nn.ModuleDict({
            str(l): VeinDecoder(hidden_size, gamma=gamma, num_heads=num_heads,
                                detach_target=detach_target, dropout=dropout, memory=memory,
                                target_pos=target_pos, mask_init=mask_init,
                                visible_ratio=visible_ratio)
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
                generator: torch.Generator | None = None, masks: Mapping[int, Tensor] | None = None,
                shuffle_check: bool = False) -> dict:
        """VEIN loss over the eligible samples.

        Args:
            hidden_states_per_layer: ``{layer: (B, N, d)}`` image-token states (keys may be
                negative or resolved indices).
            emb_per_layer: ``{layer: (B, d)}`` embedding-token (EOS) states.
            image_mask: ``(B, N)``, 1 for real image tokens (None: all real).
            sample_mask: ``(B,)`` bool, True for samples VEIN applies to
                (:func:`vein_eligible`); None: all.
            generator: RNG for the mask positions (drawn layer after layer).
            masks: ``{layer: (B, N) bool}`` given masked positions (rows of all B samples;
                the eligible ones are used) instead of drawing them.
            shuffle_check: also compute the shuffled-``e`` diagnostic.

        Returns:
            dict with ``loss`` (scalar, mean over layers of each layer's mean over masked
            tokens), ``sum`` (scalar) and ``count`` (int) with ``loss = sum / count``,
            ``per_layer`` (``{layer: scalar}``) and ``n_samples`` (int, eligible samples);
            with ``shuffle_check`` also ``sum_shuffled`` and ``loss_shuffled`` (detached; see
            :meth:`VeinDecoder.forward`). With no eligible sample the loss and sum are zero
            times a dummy pass of every decoder: zero, but connected to every decoder
            parameter, so DDP's reducer still sees a gradient for each of them and does not
            hang waiting for the ranks that did have samples, and FSDP's all-gathers match.
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
            # Every decoder still runs (on a dummy two-token sample, weight 0), so the result
            # is zero but connected to every decoder parameter — DDP's reducer sees a gradient
            # for each — and every rank runs each decoder equally often (FSDP all-gathers its
            # weights in each forward).
            d = first.shape[-1]
            dummy = first.new_zeros((1, 2, d)).detach()
            given = torch.tensor([[True, False]], device=first.device)
            zero = sum(dec(dummy, dummy[:, 0], masked=given, shuffle_check=shuffle_check)["sum"]
                       for dec in self.decoders.values()) * 0.0
            out = {"loss": zero, "sum": zero, "count": 0,
                   "per_layer": {l: zero.detach() for l in self.layers}, "n_samples": 0}
            if shuffle_check:
                out["sum_shuffled"] = out["loss_shuffled"] = zero.detach()
            return out
        per_layer, sums, shuffled, counts = {}, [], [], set()
        for layer in self.layers:
            h = self._lookup(hidden_states_per_layer, layer, "hidden_states_per_layer")[rows]
            e = self._lookup(emb_per_layer, layer, "emb_per_layer")[rows]
            m = image_mask[rows] if image_mask is not None else None
            given = self._lookup(masks, layer, "masks")[rows] if masks is not None else None
            r = self.decoders[str(layer)](h, e, m, generator=generator, masked=given,
                                          shuffle_check=shuffle_check)
            per_layer[layer] = r["loss"]
            sums.append(r["sum"])
            counts.add(r["count"])
            if "sum_shuffled" in r:
                shuffled.append(r["sum_shuffled"])
        if len(counts) != 1:  # k_b depends only on n_b, unless given masks differ per layer
            raise ValueError(f"VeinHead: layers masked different numbers of tokens "
                             f"{sorted(counts)}; give masks with the same count per sample on "
                             "every layer.")
        count = counts.pop()
        total = torch.stack(sums).sum() / len(self.layers)
        out = {"loss": total / count, "sum": total, "count": count, "per_layer": per_layer,
               "n_samples": n_samples}
        if shuffle_check:
            out["sum_shuffled"] = torch.stack(shuffled).sum() / len(self.layers)
            out["loss_shuffled"] = out["sum_shuffled"] / count
        return out


def _all_reduce(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum of ``values`` over ranks (float64; identity for one process)."""
    if dist_utils.world_size() == 1:
        return list(values)
    vec = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        vec = vec.to(device if device is not None and device.type == "cuda" else "cuda")
    torch.distributed.all_reduce(vec)
    return vec.tolist()


def global_sums(local_count: int, sums: Mapping[str, Tensor | float] | None = None
                ) -> tuple[int, dict[str, float]]:
    """The global count ``N = Σ_r count_r`` and the global sums of some per-term totals.

    Every rank must call it at the same point with the same keys (one all-reduce).

    Args:
        local_count: terms on this rank (e.g. masked tokens).
        sums: name → this rank's sum of a quantity over those terms (detached).

    Returns:
        ``(N, {name: Σ_r sum_r})``.
    """
    keys = sorted(sums or {})
    vals = [float(local_count)] + [float(sums[k]) for k in keys]  # type: ignore[index]
    dev = next((v.device for v in (sums or {}).values() if torch.is_tensor(v)), None)
    red = _all_reduce(vals, dev)
    return int(round(red[0])), dict(zip(keys, red[1:]))


def global_mean(local_sum: Tensor, local_count: int, weight: float = 1.0
                ) -> tuple[Tensor, Tensor, int]:
    """``weight ·`` the mean of per-token terms over the **global** batch, DDP-ready.

    Each rank holds the sum of its terms and their count. The global mean is
    ``S / N`` with ``S = Σ_r sum_r``, ``N = Σ_r count_r``. Its gradient is
    ``Σ_r ∂sum_r / N``, whereas DDP *averages* the ranks' gradients; so the term to
    back-propagate on rank ``r`` is ``W · sum_r / N`` (the convention of
    :mod:`fam.distributed`). A rank without terms contributes a zero (the caller passes a
    zero still connected to its parameters). One process gets ``sum / count``.

    (The official code instead back-propagates each rank's own mean, and its trainer divides
    the contrastive loss by ``W``: relative to the task loss its L_rec weighs ``W·λ`` and a
    rank with fewer VEIN samples counts as much as one with more; see method.md §3.1.)

    Every rank must call this at the same point (one all-reduce of two numbers).

    Args:
        local_sum: scalar, sum of this rank's terms (with graph).
        local_count: number of terms on this rank.
        weight: λ, multiplies the training term (not the reported value).

    Returns:
        ``(train_term, value, global_count)``: ``train_term`` to add to the loss (with
        graph), ``value`` the global mean (detached, the same on every rank),
        ``global_count`` N.
    """
    n, total = global_sums(local_count, {"sum": local_sum.detach()})
    denom = max(n, 1)
    value = torch.tensor(total["sum"] / denom, dtype=local_sum.dtype, device=local_sum.device)
    return weight * dist_utils.world_size() * local_sum / denom, value, n


#: Relative gap below which own and shuffled L_rec count as equal (:func:`vein_verdict`).
SAME_RTOL = 0.01


def vein_verdict(rec_loss: float | None, rec_loss_shuffled: float | None,
                 rtol: float = SAME_RTOL, memory: str = "unmasked") -> str | None:
    """A sentence when VEIN's loss does not depend on the embedding, else None.

    ``L_rec`` with each sample's own ``e`` and with ``e`` shuffled across the batch are
    "equal" when they differ by less than ``rtol`` relative to ``L_rec`` (1 %: the issue's
    measurement was 0.016076 vs 0.016077). Then the decoder rebuilds the masked tokens
    without ``e`` and the reconstruction loss sends (almost) nothing into the model.

    Args:
        rec_loss: L_rec with own ``e``.
        rec_loss_shuffled: L_rec with shuffled ``e`` (same masks).
        rtol: relative tolerance.
        memory: the variant: for ``unmasked`` (the paper's VEIN) the sentence is a diagnostic
            (what the ablation found; logged as information), for ``embedding`` a warning.

    Returns:
        The warning sentence, or None when ``e`` matters (or a value is missing/NaN).
    """
    if rec_loss is None or rec_loss_shuffled is None:
        return None
    if not (math.isfinite(rec_loss) and math.isfinite(rec_loss_shuffled)):
        return None
    gap = rec_loss_shuffled - rec_loss
    if abs(gap) < rtol * max(abs(rec_loss), 1e-12):
        # The paper's VEIN: what the ablation measured (README, "Ablation"), whose advice
        # is to keep it; the inversion variant exists to make e matter, so there it is news.
        why = (": as the ablation measured for the paper's VEIN (the default; README, "
               "Ablation)" if memory == "unmasked" else
               ": the inversion variant is meant to depend on e (README, Ablation)")
        return (f"VEIN teaches the model nothing: L_rec with each sample's own embedding "
                f"({rec_loss:.6g}) equals L_rec with the embeddings shuffled across the batch "
                f"({rec_loss_shuffled:.6g}, gap {gap:+.2g}); the decoder ignores e{why}")
    return None
