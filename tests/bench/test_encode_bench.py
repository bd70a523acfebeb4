"""`fam bench encode`: both variants run in fresh processes on the same items, equal results."""
from __future__ import annotations

import json

import pytest

from fam.bench.encode import MIN_COSINE, build_default, check, format_report, run_bench


@pytest.mark.slow
def test_bench_encode_runs_and_results_are_equal(tmp_path):
    model, items = build_default(tmp_path, "xs", n=24, layers=3, image_size=112)
    assert len(items.read_text().splitlines()) == 24
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert any("image" in r for r in rows) and any("image" not in r for r in rows)
    res = run_bench(model, items, batch_size=8, repeats=1)
    for v in ("sequential", "control", "pipeline"):
        assert res[v]["n"] == 24 and res[v]["items_per_s"] > 0 and res[v]["peak_bytes"] >= 0
    # The pipeline holds no LM head.
    assert res["pipeline"]["parameters"] < res["sequential"]["parameters"]
    assert res["pipeline"]["parameters"] == res["control"]["parameters"]
    for v in ("control", "pipeline"):
        # float32 forwards, batches differ in composition: see MIN_COSINE's reason
        assert res["equality"][v]["min_cosine"] >= MIN_COSINE
    assert check(res, min_speedup=0.0, max_memory_ratio=1e9) == []
    assert res["ratios"]["items_per_s"] == pytest.approx(
        res["pipeline"]["items_per_s"] / res["sequential"]["items_per_s"])
    # The forward alone on the same batches: the limit the pipeline is measured against.
    assert res["pipeline"]["forward_only_seconds"] > 0
    report = format_report(res, "test")
    assert "forward only" in report
    assert "ratios (pipeline / sequential)" in report.splitlines()[-1]
    assert "ratios (pipeline / control: background preprocessing)" in report
    assert res["ratios_vs_control"]["items_per_s"] == pytest.approx(
        res["pipeline"]["items_per_s"] / res["control"]["items_per_s"])
    # A differing result or an unreachable target is reported (and makes the CLI exit 1).
    bad = {**res, "equality": {**res["equality"], "control": {"max_abs_diff": 0.1,
                                                               "min_cosine": 0.99}}}
    assert any("control embeddings differ" in p for p in check(bad, 0.0, 1e9))
    assert any("target NOT met" in p for p in check(res, min_speedup=1e9))
