"""CLIP and SigLIP losses against plain per-element references (float64)."""
import math

import pytest
import torch

from fam.losses.tower import (CLIP_INIT_LOG_SCALE, clip_loss, siglip_loss, tower_loss)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_loss_matches_the_definition():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    s = torch.tensor(1.3, dtype=torch.float64)
    out = clip_loss(img, txt, s)
    i, t = _unit(img), _unit(txt)
    ref = 0.0
    for a in range(5):   # image → text rows and text → image columns, written out
        row = [math.exp(1.3) * float(i[a] @ t[b]) for b in range(5)]
        col = [math.exp(1.3) * float(i[b] @ t[a]) for b in range(5)]
        ref += -(row[a] - math.log(sum(math.exp(v) for v in row)))
        ref += -(col[a] - math.log(sum(math.exp(v) for v in col)))
    # the loss is computed in float32 (upcast of half inputs): tolerance of float32 sums
    assert float(out["loss"]) == pytest.approx(ref / 10, rel=1e-5)
    # the scale is exp of a float32 parameter: 1.3 rounds at 6e-8 relative
    assert float(out["scale"]) == pytest.approx(math.exp(1.3), rel=1e-6)


def test_clip_scale_is_clipped_at_100():
    x = torch.eye(3)
    out = clip_loss(x, x, torch.tensor(10.0))
    assert float(out["scale"]) == pytest.approx(100.0)


def test_siglip_loss_matches_the_definition():
    torch.manual_seed(1)
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    s, b = torch.tensor(0.7), torch.tensor(-2.0)
    out = siglip_loss(img, txt, s, b)
    i, t = _unit(img.double()), _unit(txt.double())
    ref = 0.0
    for a in range(4):
        for c in range(4):
            z = math.exp(0.7) * float(i[a] @ t[c]) - 2.0
            y = 1.0 if a == c else -1.0
            ref += math.log1p(math.exp(-y * z))
    # loss in float32 vs a float64 hand sum of 16 terms: ~100 float32 ulps
    assert float(out["loss"]) == pytest.approx(ref / 4, rel=1e-5)


def test_perfect_pairs_give_full_accuracy_and_low_loss():
    e = torch.eye(6)
    c = clip_loss(e, e, torch.tensor(CLIP_INIT_LOG_SCALE))
    assert float(c["acc_i2t"]) == 1.0 and float(c["acc_t2i"]) == 1.0
    shuffled = clip_loss(e, e[torch.tensor([1, 2, 3, 4, 5, 0])], torch.tensor(CLIP_INIT_LOG_SCALE))
    assert float(shuffled["acc_i2t"]) == 0.0
    assert float(shuffled["loss"]) > float(c["loss"])


def test_ties_never_count_as_hits():
    same = torch.ones(4, 3)          # every image equals every text
    out = clip_loss(same, same, torch.tensor(0.0))
    assert float(out["acc_i2t"]) == 0.0 and float(out["acc_t2i"]) == 0.0


def test_gradients_flow_to_embeddings_and_temperature():
    img = torch.randn(4, 5, requires_grad=True)
    txt = torch.randn(4, 5, requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True)
    siglip_loss(img, txt, s, b)["loss"].backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (img, txt, s, b))


def test_bad_inputs():
    with pytest.raises(ValueError, match="both be"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="at least 2"):
        clip_loss(torch.randn(1, 4), torch.randn(1, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="bias"):
        tower_loss("siglip", torch.randn(2, 4), torch.randn(2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="expected 'clip' or 'siglip'"):
        tower_loss("mse", torch.randn(2, 4), torch.randn(2, 4), torch.tensor(0.0))
