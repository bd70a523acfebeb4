"""Matrix entropy (method.md §5): closed-form cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fam.analysis.entropy import (
    delta_entropy,
    entropy_report,
    matrix_entropy,
    mean_matrix_entropy,
)


def test_identical_rows_have_zero_entropy():
    z = torch.randn(1, 16).repeat(10, 1)
    # eigenvalues in float64 (eps 1.1e-16): a rank-1 Gram's zeros come out ~1e-15, 1e-9 is rounding headroom
    assert matrix_entropy(z) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n,d", [(8, 8), (5, 32)])
def test_orthonormal_rows_have_ln_n(n, d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    # float64 eigendecomposition of an exactly orthonormal set: rounding ~1e-15
    assert matrix_entropy(q[:n]) == pytest.approx(math.log(n), abs=1e-9)


def test_more_rows_than_dims_caps_at_ln_d():
    # N > d: the d×d Gram path; isotropic-ish directions approach ln d from below
    z = torch.randn(4000, 4, dtype=torch.float64)
    h = matrix_entropy(z)
    assert h <= math.log(4) + 1e-9 and h > math.log(4) - 0.01
    # the N×N path gives the same value
    zh = torch.nn.functional.normalize(z[:300], dim=1)
    lam = torch.linalg.eigvalsh(zh @ zh.T / 300).clamp_min(0)
    lam = lam[lam > 0]
    # same float64 eigenvalues by the N×N path: only rounding differs (~1e-15)
    assert matrix_entropy(z[:300]) == pytest.approx(float(-(lam * lam.log()).sum()), abs=1e-9)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.8])
def test_two_clusters(c):
    # half the rows along u, half along v with cos(u, v) = c: eigenvalues (1 ± c) / 2
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([c, math.sqrt(1 - c * c), 0.0])
    z = np.stack([u] * 6 + [v] * 6)
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    lam = lam[lam > 0]
    # exact two-eigenvalue formula vs float64 eigvalsh: rounding only
    assert matrix_entropy(z) == pytest.approx(float(-(lam * np.log(lam)).sum()), abs=1e-9)
    if c == 0:
        assert matrix_entropy(z) == pytest.approx(math.log(2))


def test_row_scaling_invariance_and_dtype():
    z = torch.randn(20, 12)
    scale = torch.rand(20, 1) * 100 + 0.01
    # float32 rows scaled by up to 100x: normalisation rounds at 6e-8 relative per entry
    assert matrix_entropy(z * scale) == pytest.approx(matrix_entropy(z), abs=1e-6)
    # bf16 rounds each entry at 2^-9 relative; the entropy, smooth in the normalised Gram,
    # moves far less than one ε = 2^-8 (measured ≤ 2.1e-4 over 20 seeds): allow ε
    assert matrix_entropy(z.to(torch.bfloat16)) == pytest.approx(matrix_entropy(z), abs=2.0 ** -8)


def test_delta_and_batch_helpers():
    torch.manual_seed(0)
    before = torch.randn(3, 10, 16)
    after = before[..., :2] @ torch.randn(2, 8)     # rank-2: compressed
    dh = [delta_entropy(b, a) for b, a in zip(before, after)]
    assert all(x > 0 for x in dh)
    rep = entropy_report(before, after)
    assert rep["delta_H"] == pytest.approx(float(np.mean(dh)))
    assert rep["H_after"] <= math.log(2) + 1e-6
    # masks drop padding; lists of varying lengths work
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 4:] = False
    assert mean_matrix_entropy(before, mask) == pytest.approx(
        mean_matrix_entropy([before[0], before[1, :4], before[2]]))
    rep = entropy_report(before, after, text=before, text_mask=mask)
    assert "H_text" in rep


def test_centring_removes_a_shared_component_exactly():
    # z_i = c·e_0 + e_i (i = 1..n): uncentred, a large shared c makes the rows nearly
    # parallel (H → 0); centred, the rows form a regular simplex in n − 1 dimensions, whose
    # normalised Gram has n − 1 equal eigenvalues 1/(n − 1): H = ln(n − 1) exactly
    n = 6
    eye = torch.eye(n + 1, dtype=torch.float64)
    z = 1e4 * eye[0] + eye[1:]
    assert matrix_entropy(z) < 1e-3
    # float64 centring of a 1e4 offset: cancellation leaves ~1e-12 absolute
    assert matrix_entropy(z, center=True) == pytest.approx(math.log(n - 1), abs=1e-9)
    # centring is a no-op on a zero-mean sequence
    q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0][:4]
    q = torch.cat([q, -q])
    # float64: centring a zero-mean set subtracts rounding-level means only
    assert matrix_entropy(q, center=True) == pytest.approx(matrix_entropy(q), abs=1e-9)
