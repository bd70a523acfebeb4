"""``fam projector-compare``: the whole study at toy sizes (the --quick path), and its parts."""
from __future__ import annotations

import json
import math

import pytest

from fam.experiments.projector_compare import compare_config, plan_arms, run_projector_compare
from fam.experiments.projector_runs import Arm, caption_only, run_units


def test_arms_of_the_full_study():
    exp = compare_config()
    arms, cross, fam = plan_arms(exp)
    names = {a.name for a in arms}
    assert len(names) == len(arms)
    seeds = len(exp.seeds)
    # the sweep: β = 0 once, every β > 0 with each schedule; the cross-architecture check:
    # projectors × LLMs × {0, β*}; the two overlap in the sweep projector's two arms
    n_sweep = (1 + (len(exp.betas) - 1) * len(exp.schedules)) * seeds
    n_cross = len(exp.projectors) * len(exp.llms) * 2 * seeds
    assert len(cross) == n_cross and len(arms) == n_sweep + n_cross - 2 * seeds
    assert {a.setting for a in fam} == {"mlp-llama-b0", "mlp-llama-b5-ramped"}
    assert all(caption_only(a).name in names for a in arms)
    assert Arm("mlp", "llama", 0.0, "constant", 1).name == "mlp-llama-b0-s1"


def _square(x):
    return x * x


def test_run_units_keeps_job_order_in_a_process_pool():
    assert run_units(_square, [(i,) for i in range(5)], workers=2, threads=1) == \
        [0, 1, 4, 9, 16]
    assert run_units(_square, [(3,)], workers=1, threads=1) == [9]


def test_cli_options_reach_the_config():
    from fam.cli import build_parser
    args = build_parser().parse_args(
        ["projector-compare", "--betas", "0", "2", "--schedules", "constant", "--projectors",
         "cabstractor", "--llms", "qwen2", "--workers", "1", "--seeds", "4"])
    assert args.betas == [0.0, 2.0] and args.schedules == ["constant"]
    assert args.projectors == ["cabstractor"] and args.llms == ["qwen2"]
    assert args.workers == 1 and args.seeds == [4]


@pytest.mark.slow
def test_quick_study_runs_every_phase_and_writes_the_results(tmp_path):
    out = tmp_path / "cmp"
    res = run_projector_compare(out, quick=True, progress=False)
    saved = json.loads((out / "projector_results.json").read_text())
    md = (out / "projector_results.md").read_text()
    # the tower, its entropy before any projector (random vs pretrained)
    t = saved["tower"]
    assert t["tokens"] == 64 and 0 < t["H_pretrained"] <= t["H_max"] + 1e-9
    assert "## 1. The frozen pretrained tower" in md and "4.8" in md
    # every projector arm was analysed: entropies (both forms), mIoU, multi-semantic check
    assert len(saved["runs"]) == 4
    for name, m in saved["runs"].items():
        for key in ("delta_H", "delta_H_c", "miou", "mp_recovery_region", "ms_recall",
                    "caption_nll", "cap_object_f1"):
            assert m[key] is not None and math.isfinite(m[key]), (name, key)
    # the C-Abstractor reads 64 patches and writes 16 tokens: ΔH on the pooled grid
    cab = saved["runs"]["cabstractor-llama-b5-ramped-s0"]
    assert cab["H_before"] <= math.log(16) + 1e-9
    assert (out / "analysis" / "cabstractor-llama-b5-ramped-s0" / "alignment.json").exists()
    # the sweep, the cross-architecture pairs, the SFT pairs with the gate, FAM
    assert set(saved["cross"]) == {"linear-llama", "cabstractor-llama"}
    pair = saved["downstream"]["pairs"]["cabstractor-llama"]["tasks"]
    assert {"vqa_count", "vqa_colour", "vqa_relation", "rec"} <= set(pair)
    assert isinstance(pair["rec"]["accuracy"]["gate"], bool)
    assert set(saved["fam"]["scores"]) >= {"overall", "IND", "OOD"}
    for f in ("entropy_vs_beta.png", "miou_vs_beta.png", "sft_accuracy.png"):
        assert (out / f).stat().st_size > 0
    # a second run reuses every finished run (nothing retrains)
    again = run_projector_compare(out, quick=True, progress=False)
    assert json.loads((out / "projector_results.json").read_text())["runs"] == saved["runs"]
    assert again["timings_s"]["projectors_sft"] < res["timings_s"]["projectors_sft"]
