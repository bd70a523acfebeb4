"""Align(V, W) patch-level mIoU and cosine contrasts (method.md §5) on constructed maps."""
from __future__ import annotations

import math

import pytest
import torch

from fam.analysis.alignment import (
    alignment_report,
    contrast,
    in_mask_cosine,
    minmax_normalize,
    patch_ious,
    patch_miou,
    similarity_map,
)

GT = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)


def test_perfect_map_has_iou_one():
    maps = torch.where(GT, 0.9, -0.2)
    assert patch_miou(maps, GT) == pytest.approx(1.0)


def test_half_overlap_by_hand():
    # region 0 predicts {1, 2} vs GT {0, 1}: IoU = 1/3; region 1 predicts {2, 3} vs
    # {2, 3, 4, 5}: IoU = 2/4. Raw values are shifted/scaled: only min-max matters.
    maps = torch.tensor([[0.1, 0.5, 0.5, 0.1, 0.1, 0.2],
                         [3.0, 3.0, 7.0, 6.0, 4.9, 3.1]])
    ious = patch_ious(maps, GT)
    torch.testing.assert_close(ious, torch.tensor([1 / 3, 0.5]))
    assert patch_miou(maps, GT) == pytest.approx((1 / 3 + 0.5) / 2)
    # threshold on the normalised map: 4.9 is (4.9-3)/4 = 0.475 < 0.5
    assert patch_miou(maps, GT, threshold=0.4) == pytest.approx((1 / 3 + 0.75) / 2)


def test_constant_map_predicts_nothing_and_empty_gt_is_skipped():
    maps = torch.tensor([[0.3] * 6, [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    assert minmax_normalize(maps)[0].abs().sum() == 0
    assert patch_ious(maps, GT)[0] == 0.0
    gt = GT.clone()
    gt[0] = False
    ious = patch_ious(maps, gt)
    assert math.isnan(ious[0]) and ious[1] == 1.0
    assert patch_miou(maps, gt) == 1.0


def test_in_mask_cosine_and_contrast():
    maps = torch.tensor([[0.8, 0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 0.2, 0.5, 0.5, 0.5, 0.5]])
    assert in_mask_cosine(maps, GT) == pytest.approx((0.7 + 0.5) / 2)
    assert contrast(maps, GT) == pytest.approx(((0.7 - 0.1) + (0.5 - 0.1)) / 2)


def test_similarity_map_and_report_on_constructed_tokens():
    d = 4
    e = torch.eye(d)
    # image 0: tokens 0-1 are "cat" (e0), others "grass" (e1); image 1: all "sky" (e2) but
    # tokens 4-5 "dog" (e3)
    x = torch.stack([torch.stack([e[0], e[0], e[1], e[1], e[1], e[1]]),
                     torch.stack([e[2], e[2], e[2], e[2], e[3], e[3]])]) * 3.0
    labels = torch.stack([e[0], e[3]])
    gt = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(similarity_map(x[0], labels[0]), torch.tensor([1., 1, 0, 0, 0, 0]))
    assert similarity_map(x[0], labels).shape == (2, 6)
    rep = alignment_report(x, labels, gt, torch.tensor([0, 1]))
    assert rep["miou"] == pytest.approx(1.0)
    assert rep["in_mask_cos"] == pytest.approx(1.0)
    assert rep["out_mask_cos"] == pytest.approx(0.0)
    assert rep["contrast"] == pytest.approx(1.0)
    assert rep["n_regions"] == 2
    # padded batch: the padding token must not count as "outside" or be predicted
    xp = torch.cat([x, torch.zeros(2, 1, d)], dim=1)
    xp[1, 6] = 10 * e[3]                                 # junk in the pad slot
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 6] = False
    gtp = torch.cat([gt, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    rep_p = alignment_report(xp, labels, gtp, torch.tensor([0, 1]), token_mask=mask)
    assert rep_p == pytest.approx(rep)


def test_plots_write_files(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from fam.analysis.plots import (
        atoms_table,
        plot_entropy_comparison,
        plot_explained_energy,
        plot_similarity_heatmaps,
    )

    img = Image.new("RGB", (56, 42), (120, 80, 40))
    maps = [np.random.rand(3, 4), torch.rand(3, 4), np.zeros((3, 4))]
    paths = [
        plot_similarity_heatmaps(img, maps, ["cat", "dog", "flat"], tmp_path / "h.png", cols=2),
        plot_entropy_comparison({"LLaVA": (4.8, 2.0, 3.0), "patch-aligned": (4.8, 1.0, float("nan"))},
                                tmp_path / "e.png"),
        plot_explained_energy({"caption": torch.linspace(0, 0.6, 11),
                               "patch": torch.rand(5, 11).sort(dim=1).values}, tmp_path / "k.png"),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
    table = atoms_table(torch.tensor([[1, 2], [3, 0]]), {0: "a|b", 1: " hand", 2: "phone",
                                                           3: ""}.__getitem__,
                        row_labels=["r0", "r1"], coefs=torch.tensor([[0.5, 0.25], [1.0, 0.1]]))
    lines = table.splitlines()
    assert lines[0] == "| row | atom 1 | atom 2 |" and len(lines) == 4
    assert "␣hand (0.50)" in lines[2] and "a\\|b (0.10)" in lines[3]


# --------------------------------------------------------------------------- MaxSim maps

def test_grid_coverage_equals_a_per_pixel_count():
    from fam.analysis.alignment import grid_coverage
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 12, 9, generator=g) > 0.6
    cov = grid_coverage(masks, (4, 3))
    for k in range(3):
        for i in range(4):
            for j in range(3):
                cell = [bool(masks[k, y, x]) for y in range(3 * i, 3 * i + 3)
                        for x in range(3 * j, 3 * j + 3)]
                assert float(cov[k, i * 3 + j]) == pytest.approx(sum(cell) / 9)  # float32 mean of 9


def test_token_maps_pointing_and_shuffled_chance():
    from fam.analysis.alignment import (patch_miou, pointing_accuracy, shuffled_miou,
                                        token_maps)
    q, d = torch.eye(4)[:2], torch.eye(4)
    assert torch.equal(token_maps(q, d), torch.eye(4)[:2])
    gt = torch.zeros(6, 16, dtype=torch.bool)
    for k in range(6):
        gt[k, 2 * k:2 * k + 2] = True
    perfect = gt.float()
    assert patch_miou(perfect, gt) == 1.0 and pointing_accuracy(perfect, gt) == 1.0
    assert shuffled_miou(perfect, gt) < 0.5  # placement lost: far below the perfect map
    wrong = torch.roll(perfect, 4, dims=1)
    assert pointing_accuracy(wrong, gt) == 0.0
