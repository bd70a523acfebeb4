"""fam bench search on a small generated Scenes set: the figures it prints are measured."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss")


def test_bench_search_small(tiny_dirs, tmp_path, capsys):
    from fam.cli import main
    out = tmp_path / "r.json"
    assert main(["bench", "search", "--model", str(tiny_dirs["qwen2_vl"]), "--work",
                 str(tmp_path / "w"), "--n-eval-images", "24", "--repeats", "1", "-k", "5",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["items"] >= 24 and r["queries"] >= 24 and r["k"] == 5
    assert r["flat_identical_topk"] == r["exact_identical_topk"] == r["queries"]
    assert 0.95 <= r["hnsw_recall_at_k"] <= 1.0
    assert all(v["batch"] > 0 and v["single"] > 0 for v in r["qps"].values())
    text = capsys.readouterr().out
    assert "identical to the float64 reference" in text and "HNSW recall@5" in text
