"""MaxSim (fam.losses.maxsim) equals a plain loop, in values and gradients (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam.losses.contrastive import info_nce
from fam.losses.maxsim import late_interaction_nce, maxsim, maxsim_reference


def _tokens(b, n, d, seed, min_real=1):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.randint(min_real, n + 1, (b,), generator=g)
    mask = torch.arange(n)[None] < lengths[:, None]
    return x, mask


@pytest.mark.parametrize("similarity", ["maxsim", "meanmaxsim"])
@pytest.mark.parametrize("chunk", [1, 50, 1 << 25])  # one document per chunk .. one chunk
def test_maxsim_equals_the_loop_in_values_and_gradients(similarity, chunk):
    q, qm = _tokens(3, 5, 4, 0)
    d, dm = _tokens(7, 6, 4, 1)
    dm[2] = False  # a document without real tokens scores 0
    qm[1, 1:] = False
    q1, d1 = q.clone().requires_grad_(), d.clone().requires_grad_()
    q2, d2 = q.clone().requires_grad_(), d.clone().requires_grad_()
    got = maxsim(q1, qm, d1, dm, similarity=similarity, chunk_elements=chunk)
    want = maxsim_reference(q2, qm, d2, dm, similarity=similarity)
    # float64 maths in a different summation order: equal to ~1e-15
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[:, 2] == 0)
    w = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (got * w).sum().backward()
    (want * w).sum().backward()
    # float64, summation order only
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-12, atol=1e-12)
    # float64, summation order only
    torch.testing.assert_close(d1.grad, d2.grad, rtol=1e-12, atol=1e-12)
    # padding tokens receive no gradient
    assert torch.all(d1.grad[~dm] == 0) and torch.all(q1.grad[~qm] == 0)


def test_padding_never_wins_the_max_over_negative_similarities():
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    d = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)  # a zero padding token
    score = maxsim(q, torch.ones(1, 1, dtype=torch.bool), d, torch.tensor([[True, False]]))
    assert float(score) == -1.0


def test_meanmaxsim_divides_by_real_query_tokens():
    q, qm = _tokens(4, 6, 3, 3)
    d, dm = _tokens(5, 4, 3, 4)
    ratio = maxsim(q, qm, d, dm) / maxsim(q, qm, d, dm, similarity="meanmaxsim")
    torch.testing.assert_close(ratio, qm.sum(1, keepdim=True).double().expand(-1, 5))


def test_single_token_late_interaction_equals_info_nce():
    """With one token per item MaxSim is the dot product: the loss is info_nce's."""
    g = torch.Generator().manual_seed(5)
    q, t, n = (F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
               for _ in range(3))
    rows = torch.tensor([True, False, True, True, False, True])
    ids = torch.tensor([1, 2, 1, 4, 5, 6])
    nids = torch.tensor([7, -1, 8, 2, -1, 9])
    one = torch.ones(6, 1, dtype=torch.bool)
    got = late_interaction_nce(q[:, None], one, t[:, None], one, 0.05, n[:, None], one, rows,
                               target_ids=ids, negative_ids=nids)
    want = info_nce(q, t, 0.05, n, rows, target_ids=ids, negative_ids=nids)
    # float64: one-token MaxSim is the dot product
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=0)
    assert float(got["accuracy"]) == float(want["accuracy"])


def test_bad_shapes_are_refused():
    q, qm = _tokens(2, 3, 4, 0)
    with pytest.raises(ValueError, match="same D"):
        maxsim(q, qm, torch.zeros(2, 3, 5), qm)
    with pytest.raises(ValueError, match="masks"):
        maxsim(q, qm[:, :2], q, qm)
    with pytest.raises(ValueError, match="similarity"):
        maxsim(q, qm, q, qm, similarity="cosine")
