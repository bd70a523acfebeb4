"""MAC (method.md §2): the exact cheap form equals a naive reference, value and gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam.losses.mac import mac_loss, mac_loss_from_pooled, mac_pool


def _mac_loss_reference(img_emb, txt_emb, img_tokens, txt_tokens, img_mask, txt_mask,
                        temperature=0.02, weights=(1.0, 1.0, 1.0), c2f_reduction="mean"):
    """Naive MAC: materialise every token-token cosine, then mask and average.

    Builds the full (B·N)×(B·T) cosine matrix, multiplies in the padding mask and averages
    (the fully masked form; the official code zeroes padding features before the matmul,
    ``fam.bench.mac.mac_loss_official_form``); no algebraic shortcut is used anywhere, so it
    is an independent check of the exact form.
    """
    b, n, d = img_tokens.shape
    t_len = txt_tokens.shape[1]
    h_img = F.normalize(img_tokens, dim=-1).reshape(b * n, d)
    h_txt = F.normalize(txt_tokens, dim=-1).reshape(b * t_len, d)
    e_img, e_txt = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
    mi = img_mask.to(img_tokens.dtype)  # (B, N)
    mt = txt_mask.to(img_tokens.dtype)  # (B, T)
    labels = torch.arange(b)

    cos_ff = (h_img @ h_txt.T).reshape(b, n, b, t_len)  # (B·N)×(B·T) -> (i, n, j, t)
    pair_w = mi[:, :, None, None] * mt[None, None, :, :]
    s_f = (cos_ff * pair_w).sum(dim=(1, 3)) / (mi.sum(1)[:, None] * mt.sum(1)[None, :]) / temperature
    cos_i2t = (e_img @ h_txt.T).reshape(b, b, t_len)  # (i, j, t)
    s_i2t = (cos_i2t * mt[None]).sum(-1) / mt.sum(1)[None, :] / temperature
    cos_t2i = (e_txt @ h_img.T).reshape(b, b, n)  # (i, j, n)
    s_t2i = (cos_t2i * mi[None]).sum(-1) / mi.sum(1)[None, :] / temperature
    s_c = e_img @ e_txt.T / temperature

    coarse = F.cross_entropy(s_c, labels)
    i2t, t2i = F.cross_entropy(s_i2t, labels), F.cross_entropy(s_t2i, labels)
    c2f = i2t + t2i if c2f_reduction == "sum" else 0.5 * (i2t + t2i)
    fine = F.cross_entropy(s_f, labels)
    w_c, w_c2f, w_f = weights
    return {"loss": w_c * coarse + w_c2f * c2f + w_f * fine, "coarse_loss": coarse,
            "c2f_loss": c2f, "fine_loss": fine, "i2t": i2t, "t2i": t2i}


def _inputs(b=5, n=7, t=6, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_emb = torch.randn(b, d, generator=g, dtype=dtype)
    txt_emb = torch.randn(b, d, generator=g, dtype=dtype)
    img_tok = torch.randn(b, n, d, generator=g, dtype=dtype)
    txt_tok = torch.randn(b, t, d, generator=g, dtype=dtype)
    # Varying lengths with padding in both masks; row 0 has a single real token in each.
    img_len = torch.tensor([1] + torch.randint(1, n + 1, (b - 1,), generator=g).tolist())
    txt_len = torch.tensor([1, t] + torch.randint(1, t + 1, (b - 2,), generator=g).tolist())
    img_mask = torch.arange(n)[None] < img_len[:, None]
    txt_mask = (torch.arange(t)[None] < txt_len[:, None]).long()  # int masks are accepted too
    # Padding states are garbage on purpose: they must not influence anything.
    img_tok = torch.where(img_mask[..., None], img_tok, 1e3 * torch.ones_like(img_tok))
    return [x.requires_grad_() for x in (img_emb, txt_emb, img_tok, txt_tok)], img_mask, txt_mask


def _grads(out, xs):
    """Gradients w.r.t. every input; an input the graph does not use gets zeros."""
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]


# float64: the exact form only reorders sums (eps 2^-53 ≈ 1.1e-16; 1e-10 leaves 10^6 ulps of
# accumulated rounding); float32: eps 2^-24 ≈ 6e-8, sums over N·T products, 1e-5 ≈ 170 ulps.
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_matches_naive_value_and_grad(dtype, rtol, atol, reduction):
    xs, im, tm = _inputs(dtype=dtype)
    weights = (0.7, 1.3, 2.0)
    ours = mac_loss(*xs, im, tm, temperature=0.05, weights=weights, c2f_reduction=reduction)
    ref = _mac_loss_reference(*xs, im, tm, temperature=0.05, weights=weights, c2f_reduction=reduction)
    for key in ("loss", "coarse_loss", "c2f_loss", "fine_loss"):
        torch.testing.assert_close(ours[key], ref[key], rtol=rtol, atol=atol)  # see parametrize
    for g_ours, g_ref in zip(_grads(ours["loss"], xs), _grads(ref["loss"], xs)):
        torch.testing.assert_close(g_ours, g_ref, rtol=rtol, atol=atol)  # see parametrize


def test_c2f_sum_is_sum_of_both_directions():
    xs, im, tm = _inputs()
    ref = _mac_loss_reference(*xs, im, tm)
    s = mac_loss(*xs, im, tm, c2f_reduction="sum")["c2f_loss"]
    m = mac_loss(*xs, im, tm, c2f_reduction="mean")["c2f_loss"]
    torch.testing.assert_close(s, ref["i2t"] + ref["t2i"])
    torch.testing.assert_close(m, 0.5 * (ref["i2t"] + ref["t2i"]))


def test_padding_does_not_matter_and_no_mask_means_all_real():
    xs, im, tm = _inputs()
    a = mac_loss(*xs, im, tm)["loss"]
    # Changing the padded states changes nothing.
    img_tok2 = torch.where(im[..., None], xs[2], torch.randn_like(xs[2]))
    b = mac_loss(xs[0], xs[1], img_tok2, xs[3], im, tm)["loss"]
    torch.testing.assert_close(a, b)
    full = mac_loss(*xs)["loss"]
    ones = mac_loss(*xs, torch.ones(im.shape), torch.ones(tm.shape))["loss"]
    torch.testing.assert_close(full, ones)
    # Padding positions get exactly zero gradient.
    g_tok = torch.autograd.grad(a, xs[2])[0]
    assert torch.all(g_tok[~im] == 0)


def test_weights_are_honoured():
    xs, im, tm = _inputs()
    out = mac_loss(*xs, im, tm, weights=(0.5, 2.0, 3.0))
    torch.testing.assert_close(out["loss"], 0.5 * out["coarse_loss"] + 2.0 * out["c2f_loss"]
                               + 3.0 * out["fine_loss"])
    # Fine only: the embeddings get no gradient (they appear only in coarse and c2f).
    out = mac_loss(*xs, im, tm, weights=(0.0, 0.0, 1.0))
    g_img_emb, g_txt_emb, g_img_tok, _ = _grads(out["loss"], xs)
    assert torch.all(g_img_emb == 0) and torch.all(g_txt_emb == 0) and g_img_tok.abs().sum() > 0
    # Coarse only: the token states get no gradient.
    out = mac_loss(*xs, im, tm, weights=(1.0, 0.0, 0.0))
    g = _grads(out["loss"], xs)
    assert torch.all(g[2] == 0) and torch.all(g[3] == 0) and g[0].abs().sum() > 0
    # A zero-weighted term is reported but detached from the graph.
    assert out["fine_loss"].requires_grad is False and out["fine_loss"] > 0
    # Removing the term's gradient: weights (1, 0, 1) give the gradient of coarse + fine.
    ref = _mac_loss_reference(*xs, im, tm)
    want = _grads(ref["coarse_loss"] + ref["fine_loss"], xs)
    got = _grads(mac_loss(*xs, im, tm, weights=(1.0, 0.0, 1.0))["loss"], xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_pooled_path_equals_token_path():
    xs, im, tm = _inputs()
    v_bar, t_bar = mac_pool(xs[2], xs[3], im, tm)
    assert v_bar.shape == (5, 16) and t_bar.shape == (5, 16)
    torch.testing.assert_close(v_bar, (F.normalize(xs[2], dim=-1) * im[..., None]).sum(1)
                               / im.sum(1, keepdim=True))
    a = mac_loss_from_pooled(xs[0], xs[1], v_bar, t_bar)["loss"]
    torch.testing.assert_close(a, mac_loss(*xs, im, tm)["loss"])


def test_empty_mask_row_raises():
    xs, im, tm = _inputs()
    tm = tm.clone()
    tm[3] = 0
    with pytest.raises(ValueError, match=r"txt_tokens: rows \[3\] have no real token"):
        mac_loss(*xs, im, tm)


def test_bad_config_raises():
    xs, im, tm = _inputs()
    with pytest.raises(ValueError, match="c2f_reduction"):
        mac_loss(*xs, im, tm, c2f_reduction="max")
    with pytest.raises(ValueError, match="weights"):
        mac_loss(*xs, im, tm, weights=(1.0, 1.0))


# bfloat16 keeps 8 significant bits: machine epsilon 2^-8 (= 3.9e-3), so rounding a float32
# input to bf16 moves it by at most 2^-9 relative.
BF16_EPS = 2.0 ** -8
# The loss: scores are computed in float32 from the rounded states, so the loss moves by a
# fraction of one ε (measured 3e-5 to 6e-4 relative over 5 seeds): allow one ε.
BF16_LOSS_RTOL = BF16_EPS
# The gradients come back in bf16 (each element rounded at 2^-9) after a backward whose
# bmm products of bf16 states round again, and the 1/τ = 50 temperature scales a score's
# rounding before the softmax: a few ε norm-wise (measured ≤ 1.4 ε over 5 seeds). 8 ε leaves
# ~5× headroom; a wrong formula gives an O(1) error.
BF16_GRAD_RTOL = 8 * BF16_EPS


def _norm_rel_err(got, want):
    return float((got.float() - want).norm() / want.norm())


def test_bf16_forward_and_gradients_close_to_fp32():
    xs, im, tm = _inputs(b=8, n=16, t=8, d=64, dtype=torch.float32)
    ref = mac_loss(*xs, im, tm)["loss"]
    low_xs = [x.detach().bfloat16().requires_grad_() for x in xs]
    low = mac_loss(*low_xs, im, tm)["loss"]
    assert low.dtype == torch.float32
    assert abs(float(low.detach()) - float(ref.detach())) <= BF16_LOSS_RTOL * abs(float(ref.detach()))
    for g_low, g_ref in zip(torch.autograd.grad(low, low_xs), torch.autograd.grad(ref, xs)):
        assert g_low.dtype == torch.bfloat16
        assert _norm_rel_err(g_low, g_ref) <= BF16_GRAD_RTOL


@pytest.mark.parametrize("form", ["mac_loss_official_form", "mac_loss_naive"])
def test_bench_references_match_exact_in_float64(form):
    """Both of ``fam bench mac``'s references compute the same loss and gradients as the
    exact form, so its ratios compare equal work (float64, padding in both masks)."""
    import fam.bench.mac as bench

    xs, im, tm = _inputs()
    ours = mac_loss(*xs, im, tm, weights=(0.7, 1.3, 2.0), c2f_reduction="sum")
    ref = getattr(bench, form)(*xs, im, tm, weights=(0.7, 1.3, 2.0), c2f_reduction="sum")
    for key in ("loss", "coarse_loss", "c2f_loss", "fine_loss"):
        # float64: the forms differ only in summation order (eps 2^-53 ≈ 1.1e-16 per op).
        torch.testing.assert_close(ref[key], ours[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(ref["loss"], xs), _grads(ours["loss"], xs)):
        # float64 summation-order differences, as above.
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bench_official_form_zeroes_padding_features_before_the_matmul():
    """The official form ignores padded token states (they are zeroed, not just unweighted):
    garbage in the padding changes neither its loss nor the other tokens' gradients."""
    from fam.bench.mac import mac_loss_official_form

    xs, im, tm = _inputs()
    txt2 = torch.where(tm.bool()[..., None], xs[3], 1e3 * torch.randn_like(xs[3]))
    a = mac_loss_official_form(*xs, im, tm)["loss"]
    b = mac_loss_official_form(xs[0], xs[1], xs[2], txt2, im, tm)["loss"]
    # float64, same operations on the real tokens; the padded terms are exact zeros.
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_pooling_gradcheck_including_tiny_norms():
    from fam.losses.mac import masked_mean_normalized

    g = torch.Generator().manual_seed(3)
    tok = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    torch.autograd.gradcheck(lambda x: masked_mean_normalized(x, mask), (tok,))
    # A token below the eps clamp (F.normalize's linear branch; finite differences are
    # meaningless there, so compare with autograd through F.normalize instead).
    tok = tok.detach().clone()
    tok[1, 0] = 1e-14
    tok.requires_grad_()
    ref = (F.normalize(tok, dim=-1) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    out = masked_mean_normalized(tok, mask)
    cot = torch.randn_like(out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, tok, cot)[0], torch.autograd.grad(ref, tok, cot)[0])
