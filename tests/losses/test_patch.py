"""Patch-aligned training loss (method.md §4): hand-computed values, pooling, β schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fam.losses.patch import (
    beta_schedule,
    label_embedding,
    patch_alignment_loss,
    projector_loss,
    region_embeddings,
)


def _tokens():
    # one image, N = 4 tokens, d = 2
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def test_region_embeddings_mean_and_coverage_hand_checked():
    x = _tokens()
    sets = torch.tensor([[True, True, False, False], [False, False, True, True]])
    z = region_embeddings(x, sets)
    torch.testing.assert_close(z, torch.tensor([[0.5, 0.5], [0.0, 0.5]], dtype=torch.float64))
    cov = torch.tensor([[0.75, 0.25, 0.9, 0.0], [0.0, 0.0, 0.5, 1.0]])
    z = region_embeddings(x, sets, cov, pooling="coverage")
    # weights restricted to S_k: (0.75, 0.25) and (0.5, 1.0)/1.5
    torch.testing.assert_close(z, torch.tensor([[0.75, 0.25], [-1 / 3, 1 / 3]],
                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="coverage"):
        region_embeddings(x, sets, pooling="coverage")
    with pytest.raises(ValueError, match="token"):
        region_embeddings(x, sets, pooling="token")


def test_region_embeddings_batched_uses_each_regions_image():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    sets = torch.rand(6, 5) > 0.4
    sets[:, 0] = True
    idx = torch.tensor([2, 0, 0, 1, 2, 2])
    z = region_embeddings(x, sets, region_image_index=idx)
    ref = torch.stack([x[i][s].mean(0) for i, s in zip(idx.tolist(), sets)])
    torch.testing.assert_close(z, ref)
    with pytest.raises(ValueError, match="region_image_index"):
        region_embeddings(x, sets)


def test_label_embedding_is_mean_of_rows_without_grad():
    emb = torch.nn.Embedding(10, 3).weight  # requires grad
    t = label_embedding([[1, 2], [7], [3, 3, 4]], emb)
    assert not t.requires_grad and t.shape == (3, 3)
    torch.testing.assert_close(t[0], (emb[1] + emb[2]).detach() / 2)
    torch.testing.assert_close(t[1], emb[7].detach())
    torch.testing.assert_close(t[2], (2 * emb[3] + emb[4]).detach() / 3)
    with pytest.raises(ValueError, match="label 1"):
        label_embedding([[1], []], emb)
    with pytest.raises(ValueError, match="outside"):
        label_embedding([[10]], emb)


def test_loss_hand_computed_mean_and_token_pooling():
    x = _tokens()
    sets = torch.tensor([[True, True, False, False], [False, False, True, False]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = patch_alignment_loss(x, sets, t, pooling="mean")
    # z_0 = (.5, .5): cos with (1,0) = 1/√2; z_1 = (1, 1): cos with (0,1) = 1/√2
    c = 1 / math.sqrt(2)
    assert out["loss"].item() == pytest.approx(1 - c)
    assert out["mean_cos"].item() == pytest.approx(c)
    assert int(out["n_regions"]) == 2 and int(out["n_images"]) == 1

    out = patch_alignment_loss(x, sets, t, pooling="token")
    # region 0: cos((1,0),(1,0)) = 1, cos((0,1),(1,0)) = 0 → mean 1 − cos = 0.5
    # region 1: cos((1,1),(0,1)) = 1/√2 → 1 − 1/√2
    assert out["loss"].item() == pytest.approx(((0.5) + (1 - c)) / 2)
    assert out["mean_cos"].item() == pytest.approx((0.5 + c) / 2)


def test_loss_is_per_image_then_mean_over_images_with_regions():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    t = torch.randn(4, 8, dtype=torch.float64)
    sets = torch.zeros(4, 6, dtype=torch.bool)
    sets[0, :2] = sets[1, 3:] = sets[2, 1:4] = True   # regions 0, 1 in image 0; 2 in image 2
    # region 3 (image 1) has an empty set (cropped away): dropped, image 1 has no region
    idx = torch.tensor([0, 0, 2, 1])
    out = patch_alignment_loss(x, sets, t, idx)
    l = [1 - F.cosine_similarity(x[i][s].mean(0), t[k], dim=0)
         for k, (i, s) in enumerate(zip(idx.tolist(), sets)) if s.any()]
    ref = ((l[0] + l[1]) / 2 + l[2]) / 2   # not (l0 + l1 + l2) / 3
    torch.testing.assert_close(out["loss"], ref)
    assert int(out["n_regions"]) == 3 and int(out["n_images"]) == 2


def test_coverage_pooling_loss_and_gradient_flow():
    x = _tokens().clone().requires_grad_(True)
    sets = torch.tensor([[True, True, False, False]])
    cov = torch.tensor([[0.75, 0.25, 0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    out = patch_alignment_loss(x, sets, t, pooling="coverage", coverage=cov)
    # z = (0.75, 0.25): cos with (0,1) = 0.25/√(0.625)
    assert out["loss"].item() == pytest.approx(1 - 0.25 / math.sqrt(0.625))
    out["loss"].backward()
    assert x.grad[:2].abs().sum() > 0 and x.grad[2:].abs().sum() == 0


def test_no_regions_gives_zero_loss_connected_to_graph():
    x = torch.randn(2, 4, 3, requires_grad=True)
    out = patch_alignment_loss(x, torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0, 3),
                               torch.zeros(0, dtype=torch.long))
    assert out["loss"].item() == 0.0 and int(out["n_images"]) == 0
    out["loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() == 0


def test_beta_schedule_ramp():
    assert beta_schedule(0, 100) == 0.0
    assert beta_schedule(50, 100) == pytest.approx(2.5)
    assert beta_schedule(100, 100) == pytest.approx(5.0)
    assert beta_schedule(250, 100) == pytest.approx(5.0)   # constant after the ramp
    assert beta_schedule(10, 100, beta_max=1.0, ramp_steps=20) == pytest.approx(0.5)
    assert beta_schedule(30, 100, beta_max=1.0, ramp_steps=20) == pytest.approx(1.0)
    assert beta_schedule(0, 100, ramp_steps=0) == 5.0
    with pytest.raises(ValueError):
        beta_schedule(-1, 100)
    with pytest.raises(ValueError):
        beta_schedule(0, 0)


def _projector_grads(beta: float | None):
    torch.manual_seed(0)
    proj = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 5))
    feats = torch.randn(2, 4, 6)
    tokens = proj(feats)                                   # (B, N, d) projector output
    caption = (tokens.sin().sum(-1) ** 2).mean()           # stand-in for the LM caption loss
    if beta is None:
        loss = caption
    else:
        sets = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
        patch = patch_alignment_loss(tokens, sets, torch.randn(3, 5),
                                     torch.tensor([0, 0, 1]))["loss"]
        loss = projector_loss(caption, patch, beta)
    loss.backward()
    return [p.grad.clone() for p in proj.parameters()]


def test_beta_zero_reproduces_caption_only_gradients_exactly():
    ref = _projector_grads(None)
    for g, r in zip(_projector_grads(0.0), ref):
        assert torch.equal(g, r)
    assert any(not torch.equal(g, r) for g, r in zip(_projector_grads(5.0), ref))


def test_projector_loss_weighting():
    c, p = torch.tensor(2.0), torch.tensor(0.5)
    assert projector_loss(c, p, 4.0).item() == pytest.approx(4.0)
    assert projector_loss(c, torch.tensor(float("nan")), 0.0).item() == 2.0


def test_token_pooling_batched_matches_naive():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    t = torch.randn(5, 5, dtype=torch.float64)
    sets = torch.rand(5, 7) > 0.5
    sets[:, 3] = True
    idx = torch.tensor([1, 1, 0, 2, 0])
    out = patch_alignment_loss(x, sets, t, idx, pooling="token")
    per = [(1 - F.cosine_similarity(x[i][s], t[k][None], dim=-1)).mean()
           for k, (i, s) in enumerate(zip(idx.tolist(), sets))]
    ref = ((per[2] + per[4]) / 2 + (per[0] + per[1]) / 2 + per[3]) / 3
    torch.testing.assert_close(out["loss"], ref)
