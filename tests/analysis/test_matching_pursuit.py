"""Matching pursuit (method.md §5): exact recovery, monotone energy, chunking parity."""
from __future__ import annotations

import pytest
import torch

from fam.analysis.matching_pursuit import label_recovery, matching_pursuit


def test_recovers_sparse_combination_of_orthonormal_atoms_exactly():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    dictionary = q.T[:20] * torch.linspace(0.5, 3.0, 20, dtype=torch.float64)[:, None]
    # non-unit rows: normalize_dict must undo the scale
    atoms_hat = q.T[:20]
    v = torch.stack([3 * atoms_hat[1] + 2 * atoms_hat[5] + 1 * atoms_hat[9],
                     0.5 * atoms_hat[0] + 4 * atoms_hat[19]])
    res = matching_pursuit(v, dictionary, k_max=4, dtype=torch.float64)
    assert res.atoms[0, :3].tolist() == [1, 5, 9]
    torch.testing.assert_close(res.coefs[0, :3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert res.atoms[1, :2].tolist() == [19, 0]
    torch.testing.assert_close(res.explained_energy[0, 3], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(res.explained_energy[1, 2], torch.tensor(1.0, dtype=torch.float64))
    # energy after 1 step = 9 / 14 for the first vector
    assert res.explained_energy[0, 1].item() == pytest.approx(9 / 14)
    assert res.explained_energy[:, 0].abs().sum() == 0
    assert res.residual[0].norm() < 1e-10


def test_recovers_sparse_combination_of_random_high_dim_atoms():
    torch.manual_seed(1)
    dictionary = torch.randn(500, 4096)            # nearly orthogonal in high d
    dn = torch.nn.functional.normalize(dictionary, dim=1)
    support = torch.tensor([[7, 123, 42], [499, 0, 250]])
    coefs = torch.tensor([[3.0, 2.0, 1.0], [2.5, 1.5, 1.0]])
    v = torch.einsum("mk,mkd->md", coefs, dn[support])
    res = matching_pursuit(v, dictionary, k_max=3)
    assert res.atoms.tolist() == support.tolist()
    # random atoms in d=4096 have cross-cosines ~1/64; with coefficients summing to 6 a greedy
    # coefficient picks up a few hundredths from the others
    torch.testing.assert_close(res.coefs, coefs, atol=0.1, rtol=0)
    assert (res.explained_energy[:, -1] > 0.99).all()


def test_energy_monotone_and_selection_modes():
    torch.manual_seed(2)
    dictionary = torch.randn(300, 16)
    v = torch.randn(50, 16)
    for sel in ("positive", "abs"):
        res = matching_pursuit(v, dictionary, k_max=10, selection=sel)
        diffs = res.explained_energy.diff(dim=1)
        assert (diffs >= -1e-6).all()
        assert (res.explained_energy <= 1 + 1e-6).all()
    pos = matching_pursuit(v, dictionary, k_max=1, selection="positive")
    ab = matching_pursuit(v, dictionary, k_max=1, selection="abs")
    assert (pos.coefs > 0).all()            # best signed correlation is positive here
    assert (ab.explained_energy[:, 1] >= pos.explained_energy[:, 1] - 1e-6).all()
    # "abs" is sign-blind: -v picks the same atoms as v
    neg = matching_pursuit(-v, dictionary, k_max=1, selection="abs")
    assert torch.equal(neg.atoms, ab.atoms)


def test_chunked_equals_unchunked_and_allowed_mask():
    torch.manual_seed(3)
    dictionary = torch.randn(1000, 24, dtype=torch.float64)
    v = torch.randn(17, 24, dtype=torch.float64)
    full = matching_pursuit(v, dictionary, k_max=6, chunk_size=None, dtype=torch.float64)
    for cs in (7, 128, 999):
        ch = matching_pursuit(v, dictionary, k_max=6, chunk_size=cs, dtype=torch.float64)
        assert torch.equal(ch.atoms, full.atoms)
        torch.testing.assert_close(ch.coefs, full.coefs)
        torch.testing.assert_close(ch.explained_energy, full.explained_energy)
    allowed = torch.ones(1000, dtype=torch.bool)
    allowed[full.atoms[:, 0]] = False
    res = matching_pursuit(v, dictionary, k_max=2, allowed=allowed, chunk_size=100,
                           dtype=torch.float64)
    assert allowed[res.atoms].all()
    # zero rows (unused vocabulary slots) are never picked and do not produce NaN
    d0 = dictionary.clone()
    d0[::2] = 0
    res = matching_pursuit(v, d0, k_max=3, dtype=torch.float64)
    assert (res.atoms % 2 == 1).all() and not res.coefs.isnan().any()


def test_unnormalised_dictionary_projection():
    dictionary = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    v = torch.tensor([[4.0, 1.0]])
    res = matching_pursuit(v, dictionary, k_max=2, normalize_dict=False)
    # raw inner products: 8 vs 0.5 → atom 0, coef 4/2 = 2 (v = 2·a0 + 2·a1)
    assert res.atoms.tolist() == [[0, 1]]
    torch.testing.assert_close(res.coefs, torch.tensor([[2.0, 2.0]]))


def test_label_recovery():
    atoms = torch.tensor([[5, 9, 1], [3, 4, 2], [7, 8, 6]])
    labels = [[9], [2, 4], [10]]
    assert label_recovery(atoms, labels, k=1) == 0.0
    assert label_recovery(atoms, labels, k=2) == pytest.approx(2 / 3)
    assert label_recovery(atoms, labels, k=2, require="all") == pytest.approx(1 / 3)
    assert label_recovery(atoms, labels, k=3, require="all") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        label_recovery(atoms, labels, k=4)
