"""The projector study's statistics on hand-made run results: paired differences, the
downstream gate against the no-image baseline, and the markdown."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fam.experiments.projector_compare import compare_config, plan_arms
from fam.experiments.projector_report import ALIGN_METRICS, format_results, summarise
from fam.experiments.projector_runs import Arm

N_ITEMS = 20


def _exp():
    return dataclasses.replace(compare_config(quick=True), seeds=[0, 1, 2], betas=[0.0, 5.0],
                               schedules=["ramped"], projectors=["mlp"], sweep_projector="mlp",
                               llms=["llama"], bootstrap=300)


def _rows(tmp_path):
    """Training and evaluation rows: colour majority 'red'; relation balanced yes/no."""
    def row(task, answer):
        return {"image": "images/x.png", "question": "q", "answer": answer, "task": task}
    train = [row("vqa_colour", "red")] * 3 + [row("vqa_colour", "blue")] + \
        [row("vqa_relation", "yes"), row("vqa_relation", "yes"), row("vqa_relation", "no")]
    ev = [row("vqa_colour", "red" if i < 5 else "green") for i in range(N_ITEMS)] + \
        [row("vqa_relation", "yes" if i % 2 else "no") for i in range(N_ITEMS)]
    (tmp_path / "sft_train.json").write_text(json.dumps(train))
    (tmp_path / "sft_eval.json").write_text(json.dumps(ev))


def _unit(arm: Arm) -> dict:
    patch = arm.beta > 0
    # patch arms: mIoU higher by exactly 0.1 (plus a seed term shared by the pair)
    metrics = {k: 1.0 + 0.01 * arm.seed for k, _, _ in ALIGN_METRICS}
    metrics["miou"] = 0.2 + 0.1 * patch + 0.02 * arm.seed
    metrics["caption_nll"] = 1.0 + 0.05 * arm.seed        # no difference at all
    # colour: caption-only 16/20 right, patch 18/20 (the no-image answer 'red' gets 5/20);
    # relation: both answer like the no-image baseline (the floor)
    colour = [i < 16 + 2 * patch for i in range(N_ITEMS)]
    relation = [bool(i % 2) for i in range(N_ITEMS)]
    tasks = {"vqa_colour": {"accuracy": sum(colour) / N_ITEMS, "hits": colour},
             "vqa_relation": {"accuracy": sum(relation) / N_ITEMS, "hits": relation}}
    return {"projector": {"arm": dataclasses.asdict(arm), "metrics": metrics,
                          "caption_f1_items": [0.5] * 4},
            "sft": {"arm": dataclasses.asdict(arm), "tasks": tasks}}


def test_paired_differences_and_the_gate(tmp_path):
    exp = _exp()
    _rows(tmp_path)
    arms, cross, _ = plan_arms(exp)
    units = {a.name: _unit(a) for a in arms}
    tower = {"images": 4, "tokens": 64, "width": 32, "H_max": 3.47, "H_random": 0.9,
             "H_random_c": 2.2, "H_pretrained": 0.8, "H_pretrained_c": 1.9, "steps": 3}
    res = summarise(exp, tmp_path, units, cross, {}, tower)

    sw = res["sweep"]["mlp-llama-b5-ramped"]
    assert sw["vs_caption"]["miou"]["mean"] == pytest.approx(0.1)
    assert sw["vs_caption"]["miou"]["lo"] == pytest.approx(0.1)   # no spread over seeds
    assert sw["vs_caption"]["caption_nll"]["mean"] == pytest.approx(0.0)
    assert sw["summary"]["miou"]["mean"] == pytest.approx(0.32)
    assert res["cross"]["mlp-llama"]["delta"]["miou"]["mean"] == pytest.approx(0.1)

    d = res["downstream"]
    assert d["chance"]["vqa_colour"]["accuracy"] == pytest.approx(5 / N_ITEMS)
    assert d["chance"]["vqa_relation"]["accuracy"] == pytest.approx(0.5)
    colour = d["pairs"]["mlp-llama"]["tasks"]["vqa_colour"]["accuracy"]
    relation = d["pairs"]["mlp-llama"]["tasks"]["vqa_relation"]["accuracy"]
    # colour: caption-only 0.8 against the floor 0.25, clearly above -> compared
    assert colour["gate"] and colour["caption_vs_chance"]["lo"] > 0
    assert colour["delta_t"]["mean"] == pytest.approx(0.1)
    assert colour["delta_boot"]["mean"] == pytest.approx(0.1)
    # relation: exactly the no-image answers -> at the floor, gated out
    assert not relation["gate"] and relation["caption_vs_chance"]["mean"] == pytest.approx(0)

    res.update({"config": dataclasses.asdict(exp), "torch_threads": 1,
                "timings_s": {"total": 1.0, "data": 1.0}})
    md = format_results(res)
    assert "| mlp | llama | vqa_colour | 0.800 ± 0.000 | 0.900 ± 0.000 | ✓ |" in md
    assert "| mlp | llama | vqa_relation | 0.500 ± 0.000 | 0.500 ± 0.000 | ✗ |" in md
