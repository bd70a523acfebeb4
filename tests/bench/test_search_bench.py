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


def test_bench_search_multivector_small(tiny_dirs, tmp_path, capsys):
    """Every figure is measured: bytes per item follow the cap, and with every token as a
    candidate the index's search finds exactly the exact MaxSim top-k (recall 1)."""
    from fam.cli import main
    out = tmp_path / "mv.json"
    assert main(["bench", "search", "--multivector", "--model", str(tiny_dirs["qwen2_vl"]),
                 "--work", str(tmp_path / "w"), "--n-eval-images", "12", "--repeats", "1",
                 "-k", "5", "--max-tokens", "0", "4", "--candidate-tokens", "2", "100000",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["items"] >= 12 and r["build_s"] > 0 and r["exact_ms_per_query"] > 0
    rows = {(x["max_tokens"], x["pooling"], x["candidate_tokens"]): x for x in r["rows"]}
    assert rows[(0, "-", 100000)]["recall_at_k"] == 1.0
    for pooling in ("cluster", "runs"):
        capped, full = rows[(4, pooling, 2)], rows[(0, "-", 2)]
        assert capped["tokens_per_item"] <= 4 < full["tokens_per_item"]
        assert capped["token_bytes_per_item"] < full["token_bytes_per_item"]
    assert all(0 <= x["recall_at_k"] <= 1 and x["ms_per_query"] > 0 for x in r["rows"])
    assert "recall@5" in capsys.readouterr().out
