"""InfoNCE with in-batch and hard negatives (method.md §1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam.losses.contrastive import info_nce


def _reference(q, t, negs=None, tau=0.02):
    """Plain loop: row i's candidates are all targets then all *existing* negatives."""
    q, t = F.normalize(q, dim=-1), F.normalize(t, dim=-1)
    cols = t if negs is None else torch.cat([t, F.normalize(negs, dim=-1)])
    losses = [F.cross_entropy((q[i] @ cols.T / tau)[None], torch.tensor([i])) for i in range(len(q))]
    return torch.stack(losses).mean()


def _data(b=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def test_in_batch_matches_reference_and_normalises_inside():
    q, t, _ = _data()
    out = info_nce(q, t)
    torch.testing.assert_close(out["loss"], _reference(q, t))
    # Scaling the inputs does not change anything: they are normalised inside.
    torch.testing.assert_close(info_nce(3 * q, 0.5 * t)["loss"], out["loss"])
    assert out["accuracy"].shape == () and not out["accuracy"].requires_grad


def test_hard_negatives_are_columns_for_all_queries_and_masked_rows_drop_out():
    q, t, n = _data()
    mask = torch.tensor([True, False, True, True, False, True])
    out = info_nce(q, t, hard_negatives=n, hard_negative_mask=mask, temperature=0.05)
    ref = _reference(q, t, n[mask], tau=0.05)  # missing negatives dropped outright
    torch.testing.assert_close(out["loss"], ref)
    gq, gt, gn = torch.autograd.grad(out["loss"], (q, t, n))
    rq, rt, rn = torch.autograd.grad(ref, (q, t, n))
    torch.testing.assert_close((gq, gt, gn), (rq, rt, rn))
    assert torch.all(gn[~mask] == 0) and torch.all(gn[mask].abs().sum(-1) > 0)
    # No mask means every negative exists.
    torch.testing.assert_close(info_nce(q, t, hard_negatives=n)["loss"], _reference(q, t, n))


def test_multiple_negatives_per_query():
    q, t, n = _data()
    n2 = torch.stack([n, n.flip(0)], dim=1)  # (B, 2, d)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[2, 1] = False
    out = info_nce(q, t, hard_negatives=n2, hard_negative_mask=mask)
    kept = n2.reshape(12, 8)[mask.reshape(12)]
    torch.testing.assert_close(out["loss"], _reference(q, t, kept))


def test_accuracy_and_easy_case():
    t = torch.eye(4)
    out = info_nce(t.clone(), t)
    assert out["accuracy"].item() == 1.0 and out["loss"].item() < 1e-6
    # Ties do not count as correct.
    out = info_nce(torch.ones(3, 2), torch.ones(3, 2))
    assert out["accuracy"].item() == 0.0


# bfloat16 keeps 8 significant bits: machine epsilon 2^-8 (= 3.9e-3); rounding a float32
# input to bf16 moves it by at most 2^-9 relative.
BF16_EPS = 2.0 ** -8
# The loss: scores are computed in float32 from the rounded inputs, so the loss moves by a
# fraction of one ε (measured 1e-4 to 6e-4 relative over 8 seeds): allow one ε.
BF16_LOSS_RTOL = BF16_EPS
# Gradients come back in bf16 (each element rounded at 2^-9) and the 1/τ = 50 temperature
# scales each score's rounding before the softmax: a few ε norm-wise (measured ≤ 2.2 ε
# over 8 seeds). 8 ε leaves ~4× headroom; a wrong formula gives an O(1) error.
BF16_GRAD_RTOL = 8 * BF16_EPS


def test_bf16_scores_in_float32_forward_and_gradients():
    q, t, n = _data(b=16, d=32, dtype=torch.float32)
    ref = info_nce(q, t, hard_negatives=n)["loss"]
    low_in = [x.detach().bfloat16().requires_grad_() for x in (q, t, n)]
    out = info_nce(low_in[0], low_in[1], hard_negatives=low_in[2])
    assert out["loss"].dtype == torch.float32
    assert abs(float(out["loss"].detach()) - float(ref.detach())) <= \
        BF16_LOSS_RTOL * abs(float(ref.detach()))
    for g_low, g_ref in zip(torch.autograd.grad(out["loss"], low_in),
                            torch.autograd.grad(ref, (q, t, n))):
        assert g_low.dtype == torch.bfloat16
        assert float((g_low.float() - g_ref).norm() / g_ref.norm()) <= BF16_GRAD_RTOL


def test_errors():
    q, t, n = _data()
    with pytest.raises(ValueError, match="query and target"):
        info_nce(q, t[:3])
    with pytest.raises(ValueError, match="hard_negative_mask given without"):
        info_nce(q, t, hard_negative_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="hard_negatives must be"):
        info_nce(q, t, hard_negatives=n[:2])


def test_duplicate_targets_are_not_negatives():
    """A column identical to the row's positive is masked out (false negative)."""
    torch.manual_seed(0)
    q, t, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    t[2] = t[0]  # rows 0 and 2 share their target (e.g. the same class name)
    n[1] = t[0]  # row 1's hard negative is that same item
    tid = torch.tensor([10, 11, 10, 12])
    nid = torch.tensor([20, 10, 21, 22])
    out = info_nce(q, t, 0.1, n, None, target_ids=tid, negative_ids=nid)
    # reference: per row, drop the duplicate columns by hand
    qn, cols = F.normalize(q, dim=-1), F.normalize(torch.cat([t, n]), dim=-1)
    s = qn @ cols.T / 0.1
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[0, 2] = keep[0, 5] = False  # row 0: row 2's target and row 1's negative equal its positive
    keep[2, 0] = keep[2, 5] = False
    ref = torch.stack([F.cross_entropy(s[i][keep[i]][None], torch.tensor([int(keep[i, :i].sum())]))
                       for i in range(4)]).mean()
    torch.testing.assert_close(out["loss"], ref)
    # without ids the duplicates count as negatives and the loss is larger
    assert info_nce(q, t, 0.1, n)["loss"] > out["loss"]
    with pytest.raises(ValueError, match="negative_ids"):
        info_nce(q, t, 0.1, n, target_ids=tid)


def test_embedding_geometry_gauges():
    """Orthogonal rows: no anisotropy, full effective rank after centring; rows in one
    narrow cone: anisotropy near 1; queries equal to their targets: pos_cos 1."""
    from fam.losses.contrastive import effective_rank, embedding_geometry
    eye = torch.eye(4)
    g = embedding_geometry(eye, eye)
    assert float(g["pos_cos"]) == 1.0 and float(g["neg_cos"]) == 0.0
    assert float(g["q_anisotropy"]) == 0.0 and float(g["t_anisotropy"]) == 0.0
    # Centring 4 orthonormal rows leaves 3 equal directions: effective rank 3.
    assert abs(float(g["q_eff_rank"]) - 3.0) < 1e-4  # float32 svd rounding
    cone = torch.ones(8, 16) + 1e-3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert float(embedding_geometry(cone, eye.repeat(2, 4))["q_anisotropy"]) > 0.999
    line = torch.arange(1.0, 9.0)[:, None] * torch.ones(1, 16)
    assert abs(float(effective_rank(line)) - 1.0) < 1e-4  # every row on one line
    assert not embedding_geometry(eye.requires_grad_(), eye)["pos_cos"].requires_grad
