"""The memory planner (fam.plan) against published shapes and measured peaks."""
from __future__ import annotations

import pytest

from fam.bench.plan import KNOWN_SHAPES, PlanConfig, estimate, largest_chunk, resolve_shape, shape_from_checkpoint


def test_known_shapes_give_the_published_parameter_counts():
    # the planner's analytic count vs the published 3-significant-digit figure
    assert estimate(KNOWN_SHAPES["Qwen2-VL-2B"], PlanConfig())["params"] == pytest.approx(2.21e9, rel=0.02)
    # the planner's analytic count vs the published 3-significant-digit figure
    assert estimate(KNOWN_SHAPES["Qwen2-VL-7B"], PlanConfig())["params"] == pytest.approx(8.29e9, rel=0.02)
    assert resolve_shape("qwen2-vl-2b") is KNOWN_SHAPES["Qwen2-VL-2B"]


def test_gradcache_and_checkpointing_shrink_activations_and_the_chunk_fits():
    shape = KNOWN_SHAPES["Qwen2-VL-2B"]
    full = estimate(shape, PlanConfig(batch=256))
    gc = estimate(shape, PlanConfig(batch=256, chunk=16))
    ckpt = estimate(shape, PlanConfig(batch=256, chunk=16, gradient_checkpointing=True))
    assert full["activations"] == pytest.approx(16 * gc["activations"])
    assert ckpt["total"] < gc["total"] < full["total"]
    c = largest_chunk(shape, PlanConfig(batch=256), 24 * 2 ** 30)
    assert 0 < c < 256
    assert estimate(shape, PlanConfig(batch=256, chunk=c))["total"] <= 24 * 2 ** 30
    assert estimate(shape, PlanConfig(batch=256, chunk=c + 1))["total"] > 24 * 2 ** 30
    assert largest_chunk(shape, PlanConfig(batch=256), 1 * 2 ** 30) == 0  # weights alone don't fit


def test_reads_a_checkpoint_config(tiny_dirs):
    s = shape_from_checkpoint(tiny_dirs["qwen2_vl"])
    assert (s.hidden, s.layers) == (64, 2)


@pytest.mark.slow
def test_estimate_matches_measured_peaks_on_a_tiny_model(tmp_path):
    """Planner 'step' memory vs the measured RSS growth of a training step (fam.bench.gradcache
    workers, fresh subprocesses): within ±50% each, and the ranking right."""
    from fam.backbones import build_tiny
    from fam.bench.gradcache import CORPUS, _run_in_subprocess
    build_tiny("qwen2_vl", tmp_path / "s", size="s", corpus=CORPUS, vocab_size=400, seed=0)
    shape = shape_from_checkpoint(tmp_path / "s")
    configs = {"B8": (8, 0), "B32": (32, 0), "B64-gc8": (64, 8)}
    measured, planned = {}, {}
    for name, (b, chunk) in configs.items():
        r = _run_in_subprocess(b, chunk, "s", 112, 12, "cpu", 1)
        text = round(((r["query_tokens"] - r["image_tokens"] - 2) + r["target_tokens"]) / 2)
        cfg = PlanConfig(batch=b, chunk=chunk, image_size=112, text_tokens=text, lora_rank=8,
                         lora_dropout=0.05, weight_precision="fp32", precision="fp32")
        measured[name], planned[name] = r["peak_bytes"], estimate(shape, cfg)["step"]
    ratios = {k: planned[k] / measured[k] for k in configs}
    assert all(0.5 <= x <= 1.5 for x in ratios.values()), (ratios, measured, planned)
    assert measured["B32"] > measured["B8"] and planned["B32"] > planned["B8"]
    assert measured["B32"] > measured["B64-gc8"] and planned["B32"] > planned["B64-gc8"]
