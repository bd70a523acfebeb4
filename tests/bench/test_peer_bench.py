"""`fam bench peer`: fam and sentence-transformers on the same folder and items; ratios only
when both sides' results agree; exit status from the targets."""
from __future__ import annotations

import pytest
import torch

from fam.bench.peer import (EMBEDDING_TOLERANCE, TARGETS, _summarise, format_report,
                            write_items)


def _runs(fam_ips=20.0, st_ips=10.0, fam_t=1.0, st_t=2.0, fam_m=90, st_m=100, loss=(4.0, 4.0),
          params=(8, 8)):
    runs = {}
    for side, ips, t, m, l, p in (("fam", fam_ips, fam_t, fam_m, loss[0], params[0]),
                                  ("st", st_ips, st_t, st_m, loss[1], params[1])):
        runs[(side, "text")] = [{"items_per_s": ips, "cpu_seconds": 256 / ips, "n": 256}]
        runs[(side, "train")] = [{"step_time": t, "step_cpu_time": t, "peak_bytes": m,
                                  "losses": [l, l - 1],
                                  "trainable_parameters": p, "memory_method": "cpu"}]
    return runs


def _settings():
    return {"threads": 1, "device": "cpu", "repeats": 1, "load_before": None,
            "load_after": None, "batch_size": 32, "pairs": 64, "chunk": 16}


def test_ratios_and_targets_when_results_agree():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    res = _summarise(_runs(), {("fam", "text"): e, ("st", "text"): e + 1e-7},
                     ("text", "train"), _settings())
    assert res["ratios"] == pytest.approx({"encode_text": 2.0, "train_step_time": 0.5,
                                           "train_peak_memory": 0.9})
    assert res["met"] and not res["refused"]
    report = format_report(res, "test")
    assert "all targets met" in report and "text 0.50x, train step 0.50x" in report
    slow = _summarise(_runs(fam_ips=12.0), {("fam", "text"): e, ("st", "text"): e},
                      ("text", "train"), _settings())
    assert not slow["met"] and not slow["targets"]["encode_text"]["met"]
    assert slow["targets"]["encode_text"]["target"] == f">= {TARGETS['encode_items_per_s']}"


@pytest.mark.parametrize("case", ["embeddings", "loss", "lora"])
def test_no_ratio_when_the_sides_disagree(case):
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    other = e + (10 * EMBEDDING_TOLERANCE if case == "embeddings" else 0.0)
    runs = _runs(loss=(4.0, 4.01) if case == "loss" else (4.0, 4.0),
                 params=(8, 16) if case == "lora" else (8, 8))
    res = _summarise(runs, {("fam", "text"): e, ("st", "text"): other}, ("text", "train"),
                     _settings())
    assert res["refused"] and res["ratios"] == {} and not res["met"]
    report = format_report(res, "test")
    assert "NO RATIO" in report and "refused" in report


def test_items_pair_captions_with_their_images(tmp_path):
    files = write_items(tmp_path, 6)
    text = files["text"].read_text().splitlines()
    image = files["image"].read_text().splitlines()
    mixed = files["mixed"].read_text().splitlines()
    assert len(text) == len(image) == len(mixed) == 6
    assert all('"image"' in x for x in image) and not any('"image"' in x for x in text)
    assert len(files["pairs"].read_text().splitlines()) == 6


@pytest.mark.slow
def test_peer_bench_runs_both_sides_with_equal_results(tmp_path):
    pytest.importorskip("sentence_transformers")
    from fam.bench.peer import build_default, run_bench
    folder = build_default(tmp_path, "xs", layers=2, image_size=112)
    res = run_bench(folder, tmp_path / "data", n=8, batch_size=4, pairs=8, chunk=4, steps=2,
                    repeats=1, tasks=("mixed", "train"))
    assert not res["refused"], res["refused"]
    assert res["agree"]["mixed_max_abs_diff"] <= EMBEDDING_TOLERANCE
    assert res["train"]["fam"]["first_loss"] == pytest.approx(res["train"]["st"]["first_loss"],
                                                              rel=1e-5)
    assert set(res["ratios"]) == {"encode_mixed", "train_step_time", "train_peak_memory"}
