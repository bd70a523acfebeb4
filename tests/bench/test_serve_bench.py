"""`fam bench serve`: modes alternate ABBA over rounds, the median ratio and its spread are
reported, and errors or a missed target fail the run (load generation itself is tested live
in tests/serve/test_serve_live.py)."""
from __future__ import annotations

from pathlib import Path

import fam.bench.serve as serve


def _fake_load(calls, rps):
    def run_load(model, max_batch, clients, requests, inputs, timeout=300.0, threads=None):
        calls.append(max_batch)
        return {"requests": requests, "ok": requests, "errors": 0, "error_examples": [],
                "throughput_rps": rps[len(calls) - 1], "p50_ms": 1.0, "p99_ms": 2.0,
                "mean_batch": 1.0, "largest_batch": max_batch, "graceful_shutdown": True,
                "max_batch": max_batch}
    return run_load


def test_modes_alternate_and_the_median_ratio_and_spread_are_reported(monkeypatch):
    calls: list[int] = []
    # rounds: batched 300 / single 100 = 3x; single 50 / batched 200 = 4x; batched 100 / 50 = 2x
    monkeypatch.setattr(serve, "run_load", _fake_load(calls, [300, 100, 50, 200, 100, 50]))
    r = serve.run_bench(Path("m"), Path("w"), clients=4, requests=8, repeats=3)
    assert calls == [32, 1, 1, 32, 32, 1]  # ABBA...
    assert [x["speedup"] for x in r["rounds"]] == [3.0, 4.0, 2.0]
    assert (r["speedup"], r["speedup_min"], r["speedup_max"]) == (3.0, 2.0, 4.0)
    assert r["batched"]["throughput_rps"] == 300  # the median round's figures
    text = serve.format_report(r)
    assert "3.00x one request at a time, median (rounds: 2.00x–4.00x)" in text
    assert "reference: the same server serving one request at a time" in text
    assert serve.check(r) == []
    assert serve.check(r, min_speedup=3.5) == ["target NOT met: batching / one at a time "
                                               "3.00x < 3.50x"]
    r["rounds"][1]["one_at_a_time"]["errors"] = 2
    assert serve.check(r)[0].startswith("round 2, one_at_a_time: 2 error(s)")
