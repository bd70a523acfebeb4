"""``fam projector-compare``: caption-only vs patch-aligned projectors, end to end (quick)."""
from __future__ import annotations

import json
import math

import pytest

from fam.experiments.projector_compare import run_projector_compare


@pytest.mark.slow
def test_quick_comparison_completes_and_writes_table(tmp_path):
    res = run_projector_compare(tmp_path / "cmp", quick=True, progress=False)
    md = (tmp_path / "cmp" / "projector_results.md").read_text()
    assert "| Align(V,W) patch mIoU |" in md and "patch-aligned" in md
    saved = json.loads((tmp_path / "cmp" / "projector_results.json").read_text())
    assert set(saved["summary"]) == {"caption", "patch"}
    for arm in ("caption", "patch"):
        for key, st in saved["summary"][arm].items():
            assert st["mean"] is not None and math.isfinite(st["mean"]), (arm, key)
    assert (tmp_path / "cmp" / "entropy_compare.png").exists()
    assert res["timings_s"]["total"] > 0  # ~50 s on a quiet 2-core machine (no wall-time gate)
