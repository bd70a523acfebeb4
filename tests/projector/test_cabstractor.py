"""C-Abstractor projector: shapes, pooling of features and of region coverage, gradients."""
import numpy as np
import pytest
import torch

from fam.projector.geometry import select_patches
from fam.projector.cabstractor import CAbstractor, LayerNorm2d, ResBlock2d, pool_coverage


def test_output_shape_and_token_count():
    p = CAbstractor(in_dim=16, out_dim=24, grid=(8, 8), pooled=(4, 4), depth=1)
    assert p.num_tokens == 16
    assert p(torch.randn(3, 64, 16)).shape == (3, 16, 24)
    # non-square grids and pooled grids
    q = CAbstractor(in_dim=8, out_dim=8, grid=(6, 4), pooled=(3, 2), depth=1, mlp_depth=1)
    assert q(torch.randn(1, 24, 8)).shape == (1, 6, 8)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="pooled grid"):
        CAbstractor(8, 8, grid=(4, 4), pooled=(8, 8))
    p = CAbstractor(8, 8, grid=(4, 4), pooled=(2, 2))
    with pytest.raises(ValueError, match="expects 4x4 = 16 patch tokens, got 9"):
        p(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="does not hold"):
        pool_coverage(np.zeros((2, 15)), (4, 4), (2, 2))


def test_depth_zero_is_pooling_then_readout_exactly():
    # depth 0: tokens + pos_emb, average-pooled 2x2 blocks, then the readout MLP
    torch.manual_seed(0)
    p = CAbstractor(in_dim=4, out_dim=5, grid=(4, 4), pooled=(2, 2), depth=0, mlp_depth=1)
    p = p.double()
    x = torch.randn(2, 16, 4, dtype=torch.float64)
    g = (x + p.pos_emb).view(2, 4, 4, 4)                 # (B, H, W, C), raster
    ref = torch.stack([g[:, r * 2:(r + 1) * 2, c * 2:(c + 1) * 2].mean(dim=(1, 2))
                       for r in range(2) for c in range(2)], dim=1)  # (B, 4, C)
    ref = p.readout(ref)
    # float64 (eps 1.1e-16): pooling by avg_pool vs slicing only reorders 4-term sums
    torch.testing.assert_close(p(x), ref, rtol=0, atol=1e-12)


def test_locality_pooled_token_sees_only_its_neighbourhood():
    # depth 1: one 3x3 conv before the pooling and one after → a change in the top-left
    # patch can reach pooled cells within the receptive field, never the far corner
    torch.manual_seed(0)
    p = CAbstractor(in_dim=4, out_dim=4, grid=(8, 8), pooled=(4, 4), depth=1).double().eval()
    x = torch.randn(1, 64, 4, dtype=torch.float64)
    y0 = p(x)
    x2 = x.clone()
    x2[0, 0] += 5.0
    diff = (p(x2) - y0).abs().sum(-1).view(4, 4)
    assert diff[0, 0] > 0
    assert diff[3, 3] == 0 and diff[2:, 2:].sum() == 0


def test_gradients_reach_every_parameter():
    p = CAbstractor(in_dim=8, out_dim=8, grid=(4, 4), pooled=(2, 2), depth=2)
    p(torch.randn(2, 16, 8)).square().mean().backward()
    missing = [n for n, t in p.named_parameters() if t.grad is None or not t.grad.abs().sum()]
    assert missing == []


def test_blocks():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    ln = LayerNorm2d(6).double()
    y = ln(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 5, 5, dtype=torch.float64),
                               # float64: a per-pixel channel mean of LayerNorm output is 0 up to rounding
                               rtol=0, atol=1e-12)
    b = ResBlock2d(6, 10).double()
    assert b(x).shape == (2, 10, 5, 5)
    assert isinstance(ResBlock2d(6, 6).skip, torch.nn.Identity)


def test_pool_coverage_is_the_block_mean_and_selects_on_the_pooled_grid():
    # 4x4 grid → 2x2: a region covering the top-left 2x2 block fully and one cell of the
    # top-right block half
    cov = np.zeros((1, 4, 4), np.float32)
    cov[0, :2, :2] = 1.0
    cov[0, 0, 2] = 0.5
    pooled = pool_coverage(cov, (4, 4), (2, 2))
    np.testing.assert_allclose(pooled, [[1.0, 0.125, 0.0, 0.0]])
    sel = select_patches(pooled, 0.5, flat=True)
    assert sel.tolist() == [[True, False, False, False]]
    # a tiny region gets the arg-max fallback on the pooled grid
    tiny = np.zeros((1, 16), np.float32)
    tiny[0, 15] = 0.3
    assert select_patches(pool_coverage(tiny, (4, 4), (2, 2)), 0.5, flat=True).tolist() == \
        [[False, False, False, True]]


def test_pool_coverage_of_block_constant_maps_returns_the_block_values():
    # coverage constant on each 2x2 block pools to exactly that value in raster order
    grid, pooled = (6, 6), (3, 3)
    cov = np.kron(np.random.default_rng(0).random((3, 3)), np.ones((2, 2)))[None]
    pc = pool_coverage(cov.reshape(1, -1), grid, pooled)[0]
    # pool_coverage works in float32: block means of equal values round at 6e-8
    np.testing.assert_allclose(pc.reshape(3, 3), cov[0, ::2, ::2], rtol=1e-6)
