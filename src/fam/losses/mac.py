"""Multi-granularity Aligned Contrastive loss, FAM stage 1 (method.md §2).

Three InfoNCE terms on image-caption pairs, with ``g(u, v) = cos(u, v)/τ``:

* coarse:          ``s_c^{ij}   = g(e_img^i, e_txt^j)``
* coarse-to-fine:  ``s_I2T^{ij} = mean_t g(e_img^i, H_txt^j[t])``,
  ``s_T2I^{ij} = mean_n g(e_txt^i, H_img^j[n])``
* fine:            ``s_f^{ij}   = mean_{n,t} g(H_img^i[n], H_txt^j[t])``

``L_align = w_c·CE(s_c) + w_c2f·L_c2f + w_f·CE(s_f)`` with
``L_c2f = ½(CE(s_I2T) + CE(s_T2I))`` (paper) or the sum (official code).

**Exact and cheap.** A mean of cosines of unit vectors is a dot product of means, so with
``v̄_i = masked-mean_n Ĥ_img^i[n]`` and ``t̄_j = masked-mean_t Ĥ_txt^j[t]`` (means of
L2-normalised tokens, *not* re-normalised):

    s_f^{ij}·τ = v̄_i · t̄_j,   s_T2I^{ij}·τ = ê_txt^i · v̄_j,   s_I2T^{ij}·τ = ê_img^i · t̄_j.

All three are ``B×B`` products of ``(B, d)`` matrices: O(B(N+T)d + B²d) time and O(Bd)
memory, instead of the official code's ``(B·N)×(B·T)`` similarity tensor (25 GB in bf16
at B = 512 with Phi-3.5-V). ``tests/losses/test_mac.py`` proves value and gradient
equality with a naive reference that materialises that tensor.

Because the loss only depends on the four ``(B, d)`` representations
``(e_img, e_txt, v̄, t̄)``, GradCache and DDP work on those: :func:`mac_pool` reduces the
token states per chunk/rank and :func:`mac_loss_from_pooled` gathers the small tensors
with :func:`fam.distributed.gather_with_grad`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fam.distributed import gather_with_grad
from fam.errors import ConfigError
from fam.losses.contrastive import normalize_for_scores

logger = logging.getLogger(__name__)

__all__ = ["mac_loss", "mac_loss_from_pooled", "mac_pool", "masked_mean_normalized"]

_NORM_EPS = 1e-12  # same clamp as F.normalize, so v̄ equals the mean of F.normalize(tokens)


class _WeightedSumNormalized(torch.autograd.Function):
    """``y_b = Σ_n c_{bn} · x_{bn}/max(‖x_{bn}‖, eps)`` with a hand-written backward.

    Autograd of the composed ops (norm, division, bmm) keeps two or three ``(B, N, d)``
    temporaries alive in the backward pass; here the only ``(B, N, d)`` buffer allocated is
    the returned gradient itself, which is what makes MAC's memory O(input) (see
    ``fam.bench.mac``). Gradient, for unclamped norms (x̂ = x/‖x‖, G = ∂L/∂y_b):
    ``∂L/∂x_n = c_n/‖x_n‖ · (G − (x̂_n·G) x̂_n)``; where the norm was clamped to eps the
    map is linear, ``c_n/eps · G``, exactly as autograd through ``F.normalize`` gives.
    """

    @staticmethod
    def forward(ctx, tokens: Tensor, coef: Tensor) -> Tensor:  # noqa: D102
        # tokens (B, N, d); coef (B, N) in the accumulation dtype (float32 for half inputs).
        raw = torch.linalg.vector_norm(tokens, dim=-1, dtype=coef.dtype)  # (B, N)
        norms = raw.clamp_min(_NORM_EPS)
        w = (coef / norms).to(tokens.dtype)
        ctx.save_for_backward(tokens, coef, norms, raw >= _NORM_EPS)
        return torch.bmm(w.unsqueeze(1), tokens).squeeze(1)  # (B, 1, N) @ (B, N, d) -> (B, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: D102
        tokens, coef, norms, unclamped = ctx.saved_tensors
        grad = grad.to(tokens.dtype)  # (B, d)
        dot = torch.bmm(tokens, grad.unsqueeze(-1)).squeeze(-1).to(coef.dtype)  # x_n·G, (B, N)
        a = coef / norms  # coefficient of G
        b = torch.where(unclamped, coef * dot / norms.pow(3), torch.zeros_like(dot))  # of x_n
        out = tokens * (-b).to(tokens.dtype).unsqueeze(-1)  # the one (B, N, d) allocation
        out.addcmul_(a.to(tokens.dtype).unsqueeze(-1), grad.unsqueeze(1))  # fused, in place
        return out, None


def masked_mean_normalized(tokens: Tensor, mask: Tensor | None = None, name: str = "tokens") -> Tensor:
    """Masked mean of the L2-normalised tokens, ``mean_{n: mask[n]} tokens[n]/‖tokens[n]‖``.

    Computed as a weighted sum ``Σ_n w_n·tokens[n]`` with ``w_n = mask_n/(‖tokens[n]‖·count)``
    so that no normalised ``(B, N, d)`` copy is materialised, and with a hand-written
    backward whose only ``(B, N, d)`` allocation is the gradient itself. The result is
    **not** re-normalised (method.md §2). Not twice differentiable.

    Args:
        tokens: ``(B, N, d)`` token states.
        mask: ``(B, N)``, 1/True for real tokens; None means all tokens are real.
        name: the argument's name, used in error messages.

    Returns:
        ``(B, d)`` tensor in the tokens' dtype, float32 when they are float16/bfloat16
        (the weighted sum itself runs in the tokens' dtype, as a bmm with float32
        accumulation on GPU, so no float32 copy of the states is made).

    Raises:
        ValueError: on a bad shape or a row whose mask has no real token.
    """
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be (B, N, d); got shape {tuple(tokens.shape)}.")
    b, n, _ = tokens.shape
    is_half = tokens.dtype in (torch.float16, torch.bfloat16)
    # Norms and weights in float32 even for half inputs: 1/‖h‖ is where precision matters.
    acc_dtype = torch.float32 if is_half else tokens.dtype
    if mask is None:
        coef = torch.full((b, n), 1.0 / n, dtype=acc_dtype, device=tokens.device)
    else:
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"mask of {name} must be (B, N) = {(b, n)}; got {tuple(mask.shape)}.")
        m = mask.to(device=tokens.device, dtype=acc_dtype)
        count = m.sum(dim=1)  # (B,)
        empty = (count == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"{name}: rows {empty.tolist()} have no real token (mask all zero); the mean "
                "over their tokens is undefined. Drop these samples or fix the token mask "
                "(e.g. a caption truncated to nothing or an image without image tokens).")
        coef = m / count[:, None]
    pooled = _WeightedSumNormalized.apply(tokens, coef)
    return pooled.float() if is_half else pooled


def mac_pool(
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None = None,
    txt_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pool token states into the two ``(B, d)`` means MAC needs.

    Args:
        img_tokens: ``(B, N, d)`` image-token states ``H_img``.
        txt_tokens: ``(B, T, d)`` caption-token states ``H_txt``.
        img_mask: ``(B, N)``, 1 = real image token; None = all real.
        txt_mask: ``(B, T)``, 1 = real caption token; None = all real.

    Returns:
        ``(v_bar, t_bar)``, each ``(B, d)``: masked means of the normalised tokens.
    """
    v_bar = masked_mean_normalized(img_tokens, img_mask, name="img_tokens")
    t_bar = masked_mean_normalized(txt_tokens, txt_mask, name="txt_tokens")
    return v_bar, t_bar


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    if len(weights) != 3:
        raise ConfigError(f"mac weights must be (w_coarse, w_c2f, w_fine); got {tuple(weights)}.")
    w = tuple(float(x) for x in weights)
    if any(x < 0 for x in w):
        raise ConfigError(f"mac weights must be >= 0; got {w}.")
    return w  # type: ignore[return-value]


def mac_loss_from_pooled(
    img_emb: Tensor,
    txt_emb: Tensor,
    v_bar: Tensor,
    t_bar: Tensor,
    temperature: float = 0.02,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    c2f_reduction: str = "mean",
    gather: bool = True,
) -> dict[str, Tensor]:
    """MAC loss from the embeddings and the pooled token means (method.md §2, exact form).

    Under DDP (``gather=True``) the four ``(B, d)`` inputs are gathered with
    :func:`fam.distributed.gather_with_grad` and every rank computes the global loss; after
    DDP's gradient average this equals the single-process gradient (see
    :mod:`fam.distributed`).

    A term whose weight is 0 is still computed for logging, but under ``torch.no_grad``:
    it contributes neither to ``loss`` nor to the autograd graph.

    Args:
        img_emb: ``(B, d)`` image embeddings ``e_img`` (normalised inside).
        txt_emb: ``(B, d)`` caption embeddings ``e_txt`` (normalised inside).
        v_bar: ``(B, d)`` from :func:`mac_pool` (image tokens).
        t_bar: ``(B, d)`` from :func:`mac_pool` (caption tokens).
        temperature: τ (0.02, FAM default).
        weights: ``(w_coarse, w_c2f, w_fine)``, default 1 each (paper).
        c2f_reduction: ``"mean"`` = ½(I2T + T2I) (paper) or ``"sum"`` (official code).
        gather: gather across ranks when distributed.

    Returns:
        dict with scalar tensors ``loss`` (weighted total), ``coarse_loss``, ``c2f_loss``
        (already reduced with ``c2f_reduction``) and ``fine_loss``.
    """
    if c2f_reduction not in ("mean", "sum"):
        raise ConfigError(f"c2f_reduction must be 'mean' (paper) or 'sum' (official code); "
                          f"got {c2f_reduction!r}.")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}.")
    w_c, w_c2f, w_f = _check_weights(weights)
    shapes = {n: tuple(x.shape) for n, x in
              (("img_emb", img_emb), ("txt_emb", txt_emb), ("v_bar", v_bar), ("t_bar", t_bar))}
    if len(set(shapes.values())) != 1 or img_emb.dim() != 2:
        raise ValueError(f"mac_loss: all four representations must be (B, d); got {shapes}.")

    e_i = normalize_for_scores(img_emb)
    e_t = normalize_for_scores(txt_emb)
    v = v_bar.float() if v_bar.dtype in (torch.float16, torch.bfloat16) else v_bar
    t = t_bar.float() if t_bar.dtype in (torch.float16, torch.bfloat16) else t_bar
    if gather:
        e_i, e_t, v, t = (gather_with_grad(x) for x in (e_i, e_t, v, t))
    labels = torch.arange(e_i.shape[0], device=e_i.device)

    def ce(a: Tensor, b: Tensor) -> Tensor:
        return F.cross_entropy(a @ b.T / temperature, labels)  # (Bg, Bg) scores

    with torch.set_grad_enabled(torch.is_grad_enabled() and w_c > 0):
        coarse = ce(e_i, e_t)  # g(e_img^i, e_txt^j)
    with torch.set_grad_enabled(torch.is_grad_enabled() and w_c2f > 0):
        i2t = ce(e_i, t)  # s_I2T·τ = ê_img^i · t̄_j
        t2i = ce(e_t, v)  # s_T2I·τ = ê_txt^i · v̄_j
        c2f = i2t + t2i if c2f_reduction == "sum" else 0.5 * (i2t + t2i)
    with torch.set_grad_enabled(torch.is_grad_enabled() and w_f > 0):
        fine = ce(v, t)  # s_f·τ = v̄_i · t̄_j

    terms = [(w, x) for w, x in ((w_c, coarse), (w_c2f, c2f), (w_f, fine)) if w > 0]
    if terms:
        loss = sum(w * x for w, x in terms)
    else:  # all weights 0: a zero that is still attached to the inputs' graph
        loss = (e_i.sum() + e_t.sum() + v.sum() + t.sum()) * 0.0
    return {"loss": loss, "coarse_loss": coarse, "c2f_loss": c2f, "fine_loss": fine}


def mac_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None = None,
    txt_mask: Tensor | None = None,
    temperature: float = 0.02,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    c2f_reduction: str = "mean",
    gather: bool = True,
) -> dict[str, Tensor]:
    """Multi-granularity Aligned Contrastive loss (FAM stage 1, method.md §2).

    Exact closed form of the coarse, coarse-to-fine and fine InfoNCE terms; see the
    module docstring. Equivalent to :func:`mac_pool` followed by
    :func:`mac_loss_from_pooled`.

    Args:
        img_emb: ``(B, d)`` image EOS embeddings.
        txt_emb: ``(B, d)`` caption EOS embeddings.
        img_tokens: ``(B, N, d)`` image-token states.
        txt_tokens: ``(B, T, d)`` caption-token states.
        img_mask: ``(B, N)``, 1 = real token (None: all real).
        txt_mask: ``(B, T)``, 1 = real token (None: all real).
        temperature: τ (0.02).
        weights: ``(w_coarse, w_c2f, w_fine)``.
        c2f_reduction: ``"mean"`` (paper) or ``"sum"`` (official code).
        gather: gather the ``(B, d)`` representations across ranks when distributed.

    Returns:
        dict with scalar tensors ``loss``, ``coarse_loss``, ``c2f_loss``, ``fine_loss``.

    Raises:
        ValueError: on mismatched shapes or a mask row without any real token.

    Example:
        >>> B, N, T, d = 4, 6, 5, 8
        >>> out = mac_loss(torch.randn(B, d), torch.randn(B, d),
        ...                torch.randn(B, N, d), torch.randn(B, T, d))
        >>> sorted(out)
        ['c2f_loss', 'coarse_loss', 'fine_loss', 'loss']
    """
    if img_tokens.dim() != 3 or txt_tokens.dim() != 3 or img_tokens.shape[0] != txt_tokens.shape[0] \
            or img_tokens.shape[2] != txt_tokens.shape[2]:
        raise ValueError(f"mac_loss: img_tokens (B, N, d) and txt_tokens (B, T, d) must agree in B "
                         f"and d; got {tuple(img_tokens.shape)} and {tuple(txt_tokens.shape)}.")
    v_bar, t_bar = mac_pool(img_tokens, txt_tokens, img_mask, txt_mask)
    return mac_loss_from_pooled(img_emb, txt_emb, v_bar, t_bar, temperature=temperature,
                                weights=weights, c2f_reduction=c2f_reduction, gather=gather)
