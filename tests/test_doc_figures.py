"""The benchmark figures in the README's summary table and in the docs' write-ups come from
the JSON the benchmarks wrote (docs/results/*.json): recomputed here, they must appear as
quoted (issue 22: the table once said 1.67× where the text said 1.31×)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _table_row(prefix: str, must: str = "") -> str:
    """The summary-table row that starts with ``prefix`` (in the README, or in docs/ if the
    table moved there)."""
    rows = [line for doc in DOCS for line in doc.read_text().splitlines()
            if line.startswith(prefix) and must in line]
    assert len(rows) == 1, f"expected one table row starting {prefix!r} with {must!r}: {rows}"
    return rows[0]


def _text_with(needle: str) -> str:
    hits = [doc.read_text() for doc in DOCS if needle in doc.read_text()]
    assert hits, f"no README/docs page contains {needle!r}"
    return hits[0]


def _range(xs: list[float], unit: str) -> str:
    return f"{min(xs):.1f}–{max(xs):.1f}{unit}"


def test_mac_rows_quote_mac_json_official_form_first():
    seen = set()
    for run in _load("mac.json")["runs"]:
        for r in run["rows"]:
            shape = f"({r['B']}, {r['N']}, {r['T']}, {r['d']})"
            row = _table_row("| `fam bench mac`", shape)
            # every run's ratios, official form's before the fully masked form's
            want = [f"{r['official_memory_ratio']:.1f}×", f"{r['official_speed_ratio']:.1f}×",
                    f"{r['naive_memory_ratio']:.1f}×, {r['naive_speed_ratio']:.1f}×",
                    f"load {run['load_avg_before'][0]:.1f}"]
            if shape not in seen:  # the headline run of the shape: its times and memory too
                want += [f"**{r['official_memory_ratio']:.1f}× less peak memory" if not seen
                         else f"{r['official_memory_ratio']:.1f}× less peak memory",
                         f"{r['exact_time_s'] * 1e3:.1f} ms", f"{r['official_time_s'] * 1e3:.1f} ms"]
            seen.add(shape)
            for w in want:
                assert w in row, (w, row)
            assert row.index("official") < row.index("fully masked")
            # the forms computed the same loss (the bench's own parity check)
            assert r["official_loss_rel_diff"] <= 1e-4 and r["naive_loss_rel_diff"] <= 1e-4


def test_encode_row_and_write_up_quote_the_same_runs():
    hist = _load("encode_history.json")
    quiet = next(r for r in hist["runs"] if r["name"] == "quiet")
    s, p = quiet["sequential"], quiet["pipeline"]
    ratios = {"items_per_s": p["items_per_s"] / s["items_per_s"],
              "cpu_per_item": p["cpu_ms_per_item"] / s["cpu_ms_per_item"],
              "peak_memory": p["peak_mib"] / s["peak_mib"]}
    for k, v in ratios.items():  # the printed ratio is the ratio of the printed medians
        assert f"{v:.2f}" == f"{quiet['ratios_printed'][k]:.2f}", k
    row = _table_row("| `fam bench encode`")
    for want in (f"**{ratios['items_per_s']:.2f}× items/s**", f"{ratios['cpu_per_item']:.2f}× CPU",
                 f"**{ratios['peak_memory']:.2f}× peak memory**"):
        assert want in row, (want, row)
    assert "1.67" not in row  # the loaded run is not the headline
    body = _text_with("ratios (pipeline / sequential): items/s")
    assert (f"ratios (pipeline / sequential): items/s {ratios['items_per_s']:.2f}x, CPU time "
            f"per item {ratios['cpu_per_item']:.2f}x, peak memory "
            f"{ratios['peak_memory']:.2f}x") in body
    # the run with the control variant: its ratios, as bench encode wrote them
    ctrl = _load("encode.json")
    for key, label in (("ratios_vs_control", "vs the plain length-sorted last-layer loop"),):
        assert f"{ctrl[key]['items_per_s']:.2f}× items/s" in row and label in row


def test_serve_row_and_write_up_quote_the_same_runs():
    runs = _load("serve.json")["runs"]
    for r in runs:
        ratio = r["batched"]["throughput_rps"] / r["one_at_a_time"]["throughput_rps"]
        # the printed ratio (2 decimals) is the ratio of the printed rates (1 decimal each)
        assert abs(ratio - r["speedup_printed"]) <= 0.01, r
        assert r["batched"]["errors"] == r["one_at_a_time"]["errors"] == 0
    body = _text_with("fam serve load test on 127.0.0.1: 32 concurrent clients")
    for r in runs:
        assert f"-> {r['speedup_printed']:.2f}x" in body
    text_mixed = [r["speedup_printed"] for r in runs if r["inputs"] in ("text", "mixed")]
    image = [r["speedup_printed"] for r in runs if r["inputs"] == "image"]
    row = _table_row("| `fam bench serve`")
    assert f"**{_range(text_mixed, 'x')}**" in row and f"{_range(image, 'x')} for image-only" in row
    assert f"**{_range(text_mixed, 'x')}**" in body
    # the alternated run (fam bench serve --repeats 2, its own JSON)
    alt = _load("serve_alternated.json")
    assert [r["speedup"] for r in alt["rounds"]] and alt["inputs"] == "mixed"
    assert (f"{alt['speedup']:.1f}x (rounds {alt['speedup_min']:.1f}–{alt['speedup_max']:.1f}x)"
            in row and f"load {alt['load_avg_before'][0]:.1f}" in row)
    alt_body = _text_with("docs/results/serve_alternated.json")
    assert (f"{alt['speedup']:.2f}x one request at a time, median (rounds: "
            f"{alt['speedup_min']:.2f}x–{alt['speedup_max']:.2f}x)") in alt_body


def test_gradcache_row_quotes_gradcache_json():
    res = _load("gradcache.json")
    g, small, full = res["gradcache"], res["small"], res["full"]
    row = _table_row("| `fam bench gradcache`")
    mib = lambda x: f"{x / 2 ** 20:.1f}"  # noqa: E731
    for want in (f"**{g['peak_bytes'] / small['peak_bytes']:.2f}×**",
                 f"({mib(g['peak_bytes'])} vs {mib(small['peak_bytes'])} MiB",
                 f"{mib(full['peak_bytes'])} MiB", f"load {res['load_avg_before'][0]:.1f}"):
        assert want in row, (want, row)


def test_startup_row_quotes_startup_json():
    runs = {r["index_items"]: r for r in _load("startup.json")["runs"]}
    demo, tiny = runs[1023], runs[8]
    c, t = demo["commands"], tiny["commands"]
    row = _table_row("| `fam bench startup`")
    for want in (f"**{c['search_text']['median_s']:.2f} s** text",
                 f"**{c['search_image']['median_s']:.2f} s** image",
                 f"tiny index {t['search_text']['median_s']:.2f} s / "
                 f"{t['search_image']['median_s']:.2f} s",
                 f"{c['search_text_cold']['median_s']:.1f} s / "
                 f"{c['search_image_cold']['median_s']:.1f} s wall",
                 f"{c['search_text_cold']['cpu_s']:.1f} / "
                 f"{c['search_image_cold']['cpu_s']:.1f} CPU s",
                 f"{c['model_import']['median_s']:.1f} s wall, "
                 f"{c['model_import']['cpu_s']:.1f} CPU s",
                 f"`fam --help` {c['help']['median_s']:.2f} s",
                 f"load {demo['load_avg_before'][0]:.1f}",
                 f"load {tiny['load_avg_before'][0]:.1f}"):
        assert want in row, (want, row)
    for r in (demo, tiny):  # "met": every target of both runs
        assert r["all_ok"] and r["commands"]["search_text"]["target_s"] == 2.5


@pytest.mark.parametrize("name", ["mac.json", "gradcache.json", "serve.json", "encode_history.json", "encode.json",
                                  "serve_alternated.json", "startup.json"])
def test_results_json_say_where_they_came_from(name):
    res = _load(name)
    assert res.get("command") or res.get("label")
    for run in res.get("runs", [res]) if name != "serve.json" else []:
        if "load_avg_before" in run or name != "encode_history.json":
            # timings: the machine's load beside them
            assert run["load_avg_before"] and run["load_avg_after"]


def test_multivector_study_table_is_the_reports():
    """The README's study table (issue 19) is summary_table of the committed report, row for
    row, and its one-sentence answer quotes the report's paired differences."""
    from fam.experiments.multivector_study import summary_table
    report = _load("multivector_study/ablation.json")
    table = summary_table(report)
    assert len(table) > 2
    readme = (ROOT / "README.md").read_text()
    for row in table:
        assert row in readme, row
    paired = {(p["config"], p["reference"]): p["metrics"]["overall"] for p in report["paired"]}
    late = paired[("mac_only · maxsim", "mac_only")]
    assert f"{late['mean']:+.1f} [{late['ci95'][0]:+.1f}, {late['ci95'][1]:+.1f}]" in readme
