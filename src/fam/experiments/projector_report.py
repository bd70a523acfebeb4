"""Statistics, tables and figures of the projector study (``fam projector-compare``).

Every comparison is paired: arms share the seed (projector initialisation and data order)
and the evaluation items. Two 95 % intervals (:mod:`fam.analysis.stats`):

* ``t`` — Student-t over the per-seed differences (the seed is the unit);
* ``boot`` — hierarchical paired bootstrap over seeds, then items (questions, captions,
  MMEB rows), for scores that are means over items.

A difference is called *clear* only when its interval excludes 0. Downstream tasks are
*gated*: a task is compared between projectors only where the caption-only arm after SFT
is clearly above the no-image baseline (:func:`fam.eval.sft.chance_levels`); otherwise
both arms sit at the floor and the difference says nothing about the projector.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fam.analysis.stats import paired_bootstrap_ci, paired_t_ci
from fam.config import CompareConfig
from fam.experiments.projector_runs import Arm, caption_only

__all__ = ["ALIGN_METRICS", "TASKS", "format_results", "measure_tower", "summarise",
           "write_figures"]

#: (key, label, direction: +1 higher is better, -1 lower is better, 0 descriptive)
ALIGN_METRICS: list[tuple[str, str, int]] = [
    ("H_before", "H before P, uncentred (nats)", 0),
    ("H_after", "H after P, uncentred", 0),
    ("delta_H", "ΔH = H(before) − H(after), uncentred (SPEC)", 0),
    ("H_before_c", "H before P, centred", 0),
    ("H_after_c", "H after P, centred", 0),
    ("delta_H_c", "ΔH, centred", 0),
    ("H_text", "H caption embeddings, uncentred", 0),
    ("H_text_c", "H caption embeddings, centred", 0),
    ("miou", "patch mIoU", 1),
    ("in_mask_cos", "in-mask cos(P(X)ᵢ, t_k)", 1),
    ("retrieval_top1", "region→phrase retrieval top-1", 1),
    ("retrieval_top5", "region→phrase retrieval top-5", 1),
    ("mp_recovery_region", "MP label recovery (regions)", 1),
    ("mp_recovery_patch", "MP label recovery (in-mask patches)", 1),
    ("ms_precision", "multi-semantic precision@5", 1),
    ("ms_recall", "multi-semantic recall@5", 1),
    ("ms_recall_colour", "multi-semantic recall@5, colour", 1),
    ("ms_recall_shape", "multi-semantic recall@5, shape", 1),
    ("ms_recall_relation", "multi-semantic recall@5, relation", 1),
    ("caption_nll", "held-out caption loss (nats/token)", -1),
    ("cap_object_f1", "generated captions: object F1", 1),
    ("cap_colour_recall", "generated captions: colour recall", 1),
    ("cap_shape_recall", "generated captions: shape recall", 1),
    ("cap_relation_accuracy", "generated captions: relation accuracy", 1),
    ("cap_bleu4", "generated captions: BLEU-4", 1),
]
#: The short set in the cross-architecture and sweep-delta tables.
KEY_METRICS = ("delta_H", "delta_H_c", "miou", "mp_recovery_region", "ms_recall",
               "retrieval_top1", "caption_nll", "cap_object_f1")
TASKS = ("vqa_count", "vqa_colour", "vqa_relation", "rec")
_LABEL = {k: lab for k, lab, _ in ALIGN_METRICS}


# ----------------------------------------------------------------------------- numbers


def _stats(values: Sequence[float | None]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def _t(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, float]:
    """Paired t interval of ``b − a`` over the seeds where both are finite."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    return paired_t_ci([p[0] for p in pairs], [p[1] for p in pairs])


def _boot(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int,
          ) -> dict[str, float]:
    return paired_bootstrap_ci([np.asarray(x, float) for x in a],
                               [np.asarray(x, float) for x in b], n_boot=n_boot)


def _clear(ci: dict[str, float]) -> bool:
    return math.isfinite(ci.get("lo", float("nan"))) and (ci["lo"] > 0 or ci["hi"] < 0)


def measure_tower(random_model: Path, tower_model: Path, data: Path, n_images: int,
                  ) -> dict[str, Any]:
    """Matrix entropy of the tower's patch features (as fed to the projector) on held-out
    images, at random initialisation and after ``fam train tower``; and the tower stage's
    final in-batch retrieval accuracy."""
    from fam.analysis.entropy import matrix_entropy
    from fam.backbones import load_backbone
    from fam.data.images import load_image
    from fam.projector.hooks import vision_tokens
    from fam.utils.io import read_jsonl
    paths = [data / r["image"] for _, r in read_jsonl(data / "pad.jsonl")
             if r["image"].startswith("images/eval/ev") and "-" not in Path(r["image"]).stem]
    images = [load_image(p) for p in paths[:n_images]]
    out: dict[str, Any] = {"images": len(images)}
    for name, path in (("random", random_model), ("pretrained", tower_model)):
        before, _ = vision_tokens(load_backbone(path), images)
        for sfx, center in (("", False), ("_c", True)):
            out[f"H_{name}{sfx}"] = float(np.mean([matrix_entropy(x, center=center)
                                                   for x in before]))
        out["tokens"], out["width"] = int(before.shape[1]), int(before.shape[2])
    out["H_max"] = math.log(min(out["tokens"], out["width"]))
    info = Path(tower_model).parent / "tower.json"
    if info.exists():
        t = json.loads(info.read_text(encoding="utf-8"))
        out["steps"] = t.get("steps")
        out["final_metrics"] = t.get("final_metrics")
    return out


def _group(arms: Sequence[Arm]) -> dict[str, list[Arm]]:
    g: dict[str, list[Arm]] = defaultdict(list)
    for a in arms:
        g[a.setting].append(a)
    return {k: sorted(v, key=lambda a: a.seed) for k, v in g.items()}


def _sft_items(res: dict[str, Any], task: str, key: str = "hits") -> list[float]:
    return [float(x) for x in res["tasks"][task][key]]


def summarise(exp: CompareConfig, data: Path, units: dict[str, dict[str, Any]],
              cross: Sequence[Arm], fam: dict[str, dict[str, Any]],
              tower: dict[str, Any]) -> dict[str, Any]:
    """Every per-run number and every paired comparison of the study (module docstring)."""
    metrics = {n: u["projector"]["metrics"] for n, u in units.items()}
    arms = {n: Arm(**u["projector"]["arm"]) for n, u in units.items()}
    res: dict[str, Any] = {"tower": tower, "runs": metrics}

    # β sweep: every setting of the sweep projector / first LLM vs its caption-only pair
    sweep_arms = [a for a in arms.values()
                  if a.projector == exp.sweep_projector and a.llm == exp.llms[0]]
    sweep = {}
    for setting, group in _group(sweep_arms).items():
        base = [metrics[caption_only(a).name] for a in group]
        mine = [metrics[a.name] for a in group]
        sweep[setting] = {
            "beta": group[0].beta, "schedule": group[0].schedule,
            "seeds": [a.seed for a in group],
            "summary": {k: _stats([m.get(k) for m in mine]) for k, _, _ in ALIGN_METRICS},
            "vs_caption": {k: _t([m.get(k) for m in base], [m.get(k) for m in mine])
                           for k, _, _ in ALIGN_METRICS}}
    res["sweep"] = dict(sorted(sweep.items(), key=lambda kv: (kv[1]["schedule"] != "none",
                                                              kv[1]["schedule"],
                                                              kv[1]["beta"])))

    # cross-architecture: patch-aligned vs caption-only per projector type and LLM
    cross_res = {}
    patch_arms = [a for a in cross if a.beta > 0]
    for setting, group in _group(patch_arms).items():
        cap = [caption_only(a) for a in group]
        key = f"{group[0].projector}-{group[0].llm}"
        c_m = [metrics[a.name] for a in cap]
        p_m = [metrics[a.name] for a in group]
        cross_res[key] = {
            "projector": group[0].projector, "llm": group[0].llm, "patch_arm": setting,
            "caption": {k: _stats([m.get(k) for m in c_m]) for k, _, _ in ALIGN_METRICS},
            "patch": {k: _stats([m.get(k) for m in p_m]) for k, _, _ in ALIGN_METRICS},
            "delta": {k: _t([m.get(k) for m in c_m], [m.get(k) for m in p_m])
                      for k, _, _ in ALIGN_METRICS},
            "caption_f1_boot": _boot([units[a.name]["projector"]["caption_f1_items"]
                                      for a in cap],
                                     [units[a.name]["projector"]["caption_f1_items"]
                                      for a in group], exp.bootstrap)}
    res["cross"] = cross_res

    if any("sft" in u for u in units.values()):
        res["downstream"] = _downstream(exp, data, units, patch_arms)
    if fam:
        res["fam"] = _fam(exp, fam)
    return res


def _downstream(exp: CompareConfig, data: Path, units: dict[str, dict[str, Any]],
                patch_arms: Sequence[Arm]) -> dict[str, Any]:
    from fam.eval.sft import chance_levels
    chance = chance_levels(data / "sft_train.json", data / "sft_eval.json")
    out: dict[str, Any] = {"chance": {t: {k: v for k, v in c.items()
                                          if k not in ("hits", "ious", "centre_hits")}
                                      for t, c in chance.items()}, "pairs": {}}
    for setting, group in _group(patch_arms).items():
        cap = [caption_only(a) for a in group]
        c_r = [units[a.name]["sft"] for a in cap]
        p_r = [units[a.name]["sft"] for a in group]
        pair: dict[str, Any] = {"projector": group[0].projector, "llm": group[0].llm,
                                "patch_arm": setting, "tasks": {}}
        for task in TASKS:
            if task not in chance or task not in c_r[0]["tasks"]:
                continue
            keys = [("hits", "accuracy")] + ([("centre_hits", "centre_accuracy"),
                                               ("ious", "mean_iou")] if task == "rec" else [])
            entry: dict[str, Any] = {}
            for items, score in keys:
                ca = [float(r["tasks"][task][score]) for r in c_r]
                pa = [float(r["tasks"][task][score]) for r in p_r]
                floor = [chance[task][items]] * len(c_r)
                entry[score] = {
                    "caption": _stats(ca), "patch": _stats(pa),
                    "chance": float(np.mean(chance[task][items])),
                    "caption_vs_chance": _boot(floor, [_sft_items(r, task, items) for r in c_r],
                                               exp.bootstrap),
                    "delta_boot": _boot([_sft_items(r, task, items) for r in c_r],
                                        [_sft_items(r, task, items) for r in p_r],
                                        exp.bootstrap),
                    "delta_t": _t(ca, pa)}
                entry[score]["gate"] = entry[score]["caption_vs_chance"]["lo"] > 0
            pair["tasks"][task] = entry
        out["pairs"][f"{group[0].projector}-{group[0].llm}"] = pair
    return out


def _fam(exp: CompareConfig, fam: dict[str, dict[str, Any]]) -> dict[str, Any]:
    arms = [Arm(**r["arm"]) for r in fam.values()]
    patch = sorted([a for a in arms if a.beta > 0], key=lambda a: a.seed)
    cap = [caption_only(a) for a in patch]
    scores = ("overall", "IND", "OOD", "classification", "vqa", "retrieval", "grounding")

    def score(name: str, key: str) -> float | None:
        m = fam[name]["mmeb"]
        v = m.get(key, m.get("meta_task", {}).get(key))
        return None if v is None else float(v)

    def credits(name: str) -> list[float]:
        return [c for d in fam[name]["mmeb"]["datasets"].values() for c in d["credits"]]

    out: dict[str, Any] = {"patch_arm": patch[0].setting if patch else None, "scores": {}}
    for key in scores:
        c = [score(a.name, key) for a in cap]
        p = [score(a.name, key) for a in patch]
        out["scores"][key] = {"caption": _stats(c), "patch": _stats(p), "delta_t": _t(c, p)}
    out["rows_boot"] = _boot([[100 * x for x in credits(a.name)] for a in cap],
                             [[100 * x for x in credits(a.name)] for a in patch], exp.bootstrap)
    out["chance"] = fam[cap[0].name]["mmeb"].get("chance", {}).get("overall") if cap else None
    return out


# ----------------------------------------------------------------------------- markdown


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _ms(s: dict[str, float], nd: int = 3) -> str:
    if not s or not math.isfinite(s.get("mean", float("nan"))):
        return "n/a"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}" if s["n"] > 1 else f"{s['mean']:.{nd}f}"


def _ci(c: dict[str, float], nd: int = 3) -> str:
    if not c or not math.isfinite(c.get("mean", float("nan"))):
        return "n/a"
    if not math.isfinite(c.get("lo", float("nan"))):
        return f"{c['mean']:+.{nd}f}"
    mark = " **✓**" if _clear(c) else ""
    return f"{c['mean']:+.{nd}f} [{c['lo']:+.{nd}f}, {c['hi']:+.{nd}f}]{mark}"


def _tower_md(res: dict[str, Any]) -> list[str]:
    t = res["tower"]
    fm = t.get("final_metrics") or {}
    h_text = [m.get("H_text") for m in res["runs"].values()]
    h_text_c = [m.get("H_text_c") for m in res["runs"].values()]
    ret = (f"; final in-batch retrieval i2t {_f(fm.get('acc_i2t'), 2)} / t2i "
           f"{_f(fm.get('acc_t2i'), 2)}" if fm else "")
    return [
        "## 1. The frozen pretrained tower", "",
        f"Patch features as fed to the projector ({t['tokens']} tokens × {t['width']} dims, "
        f"mean over {t['images']} held-out images; maximum ln {min(t['tokens'], t['width'])} = "
        f"{t['H_max']:.2f}). `fam train tower`: {t.get('steps')} steps{ret}.", "",
        "| tower | H uncentred | H centred |", "|---|---|---|",
        f"| random initialisation | {_f(t['H_random'])} | {_f(t['H_random_c'])} |",
        f"| pretrained (frozen in every later stage) | {_f(t['H_pretrained'])} | "
        f"{_f(t['H_pretrained_c'])} |",
        f"| this LLM's caption embeddings (text reference) | {_ms(_stats(h_text))} | "
        f"{_ms(_stats(h_text_c))} |",
        "| paper: CLIP ViT-L/14-336 (max ln 576 = 6.36) | 4.8 | — |",
        "| paper: text embeddings | 2.0–3.6 | — |", ""]


def _sweep_md(res: dict[str, Any], exp: dict[str, Any]) -> list[str]:
    cols = ("H_before", "H_after", "delta_H", "delta_H_c", "miou", "mp_recovery_region",
            "ms_recall", "retrieval_top1", "caption_nll", "cap_object_f1")
    lines = [f"## 2. β sweep ({exp['sweep_projector']} projector, {exp['llms'][0]} LLM)", "",
             "Mean ± std over seeds.", "",
             "| β | schedule | " + " | ".join(_LABEL[c] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for s in res["sweep"].values():
        lines.append(f"| {s['beta']:g} | {s['schedule']} | " +
                     " | ".join(_ms(s["summary"][c]) for c in cols) + " |")
    lines += ["", "Paired difference to the caption-only arm (β = 0) of the same seed, "
              "95 % t interval over seeds (✓: excludes 0):", "",
              "| β | schedule | " + " | ".join(_LABEL[c] for c in KEY_METRICS) + " |",
              "|---|---|" + "---|" * len(KEY_METRICS)]
    for s in res["sweep"].values():
        if s["beta"] > 0:
            lines.append(f"| {s['beta']:g} | {s['schedule']} | " +
                         " | ".join(_ci(s["vs_caption"][c]) for c in KEY_METRICS) + " |")
    return lines + [""]


def _cross_md(res: dict[str, Any]) -> list[str]:
    lines = ["## 3. Cross-architecture: patch-aligned − caption-only", "",
             "Per projector type and language model, paired by seed; 95 % t interval over "
             "seeds (✓: excludes 0). Values of both arms are in `projector_results.json`.", "",
             "| projector | LLM | " + " | ".join(_LABEL[c] for c in KEY_METRICS) + " |",
             "|---|---|" + "---|" * len(KEY_METRICS)]
    for c in res["cross"].values():
        lines.append(f"| {c['projector']} | {c['llm']} | " +
                     " | ".join(_ci(c["delta"][k]) for k in KEY_METRICS) + " |")
    lines += ["", "| projector | LLM | ΔH caption-only | ΔH patch-aligned | ΔH_c caption-only "
              "| ΔH_c patch-aligned | mIoU caption-only | mIoU patch-aligned |",
              "|---|---|---|---|---|---|---|---|"]
    for c in res["cross"].values():
        lines.append(f"| {c['projector']} | {c['llm']} | " + " | ".join(
            _ms(c[arm][k]) for k in ("delta_H", "delta_H_c", "miou")
            for arm in ("caption", "patch")) + " |")
    return lines + [""]


def _downstream_md(res: dict[str, Any]) -> list[str]:
    d = res["downstream"]
    ch = d["chance"]
    lines = ["## 4. After the same SFT: VQA and REC", "",
             "No-image baseline: the most frequent training answer (VQA), the one box that "
             "hits most training boxes (REC): " + ", ".join(
                 f"{t} {_f(ch[t]['accuracy'])}" for t in TASKS if t in ch) +
             (f" (REC centre accuracy {_f(ch['rec'].get('centre_accuracy'))})"
              if "rec" in ch else "") + ".",
             "Gate: the caption-only arm is compared only where it is clearly above that "
             "baseline (bootstrap interval over seeds × questions above 0); ✗ marks a task "
             "at the floor, whose projector difference says nothing.", "",
             "| projector | LLM | task | caption-only | patch-aligned | gate | Δ (bootstrap) "
             "| Δ (t over seeds) |", "|---|---|---|---|---|---|---|---|"]
    for p in d["pairs"].values():
        for task, e in p["tasks"].items():
            for score, v in e.items():
                name = task if score == "accuracy" else f"{task} {score}"
                lines.append(f"| {p['projector']} | {p['llm']} | {name} | {_ms(v['caption'])} "
                             f"| {_ms(v['patch'])} | {'✓' if v['gate'] else '✗'} | "
                             f"{_ci(v['delta_boot'])} | {_ci(v['delta_t'])} |")
    return lines + [""]


def _fam_md(res: dict[str, Any]) -> list[str]:
    f = res["fam"]
    lines = [f"## 5. FAM from the SFT'd LVLM: patch-aligned ({f['patch_arm']}) vs caption-only",
             "", "MMEB protocol on Scenes, precision@1 (%), mean ± std over seeds; Δ with a "
             "95 % t interval over seeds. Chance (overall): "
             f"{_f(f.get('chance'), 1)}.", "",
             "| score | caption-only → FAM | patch-aligned → FAM | Δ |", "|---|---|---|---|"]
    for key, s in f["scores"].items():
        lines.append(f"| {key} | {_ms(s['caption'], 1)} | {_ms(s['patch'], 1)} | "
                     f"{_ci(s['delta_t'], 1)} |")
    lines += ["", f"All evaluation rows pooled, hierarchical bootstrap over seeds × rows: Δ "
              f"{_ci(f['rows_boot'], 2)} points.", ""]
    return lines


def format_results(res: dict[str, Any]) -> str:
    """The markdown report of :func:`fam.experiments.projector_compare.run_projector_compare`."""
    exp = res["config"]
    t = res["timings_s"]
    proj = exp["projector"]
    lines = ["# Projector study: patch-aligned vs caption-only projectors (arXiv 2505.17316, "
             "in miniature)", "",
             f"Tiny LLaVAs ({exp['model']['size']}; LLMs: {', '.join(exp['llms'])}) on Scenes "
             f"(textured backgrounds, {exp['scenes']['n_train_images']} training scenes); "
             f"seeds {exp['seeds']}; projectors {proj['optim']['steps']} steps (batch "
             f"{proj['optim']['batch_size']}), patch arm β = {proj['beta_max']:g} "
             f"{proj['beta_schedule']}; SFT {exp['sft']['optim']['steps']} steps "
             f"(LoRA r {exp['sft']['lora']['r']} + projector). "
             f"{len(res['runs'])} projector runs.", ""]
    lines += _tower_md(res) + _sweep_md(res, exp) + _cross_md(res)
    if "downstream" in res:
        lines += _downstream_md(res)
    if "fam" in res:
        lines += _fam_md(res)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    lines += [f"Wall time {t['total']:.0f} s ({phases}); {exp['workers']} process(es), "
              f"{res['torch_threads']} torch thread(s) each.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def write_figures(res: dict[str, Any], out: Path) -> dict[str, str]:
    """``entropy_vs_beta.png``, ``miou_vs_beta.png`` and (with SFT)
    ``sft_accuracy.png``; returns their names."""
    from fam.analysis.plots import plot_curves, plot_grouped_bars
    files = {}
    sweep = list(res["sweep"].values())
    base = [s for s in sweep if s["beta"] == 0]
    scheds = sorted({s["schedule"] for s in sweep if s["beta"] > 0})

    def curve(key: str, sched: str) -> tuple[list[float], list[float], list[float]]:
        pts = sorted(base + [s for s in sweep if s["schedule"] == sched],
                     key=lambda s: s["beta"])
        return ([s["beta"] for s in pts], [s["summary"][key]["mean"] for s in pts],
                [s["summary"][key]["std"] for s in pts])

    panels = {}
    for sfx, title in (("", "uncentred (SPEC)"), ("_c", "centred")):
        series = {}
        for sched in scheds:
            series[f"after P, {sched}"] = curve(f"H_after{sfx}", sched)
        if scheds:
            series["before P"] = curve(f"H_before{sfx}", scheds[0])
        panels[f"matrix entropy, {title}"] = series
    plot_curves(panels, out / "entropy_vs_beta.png", "β (patch-loss weight)", "nats")
    files["entropy_vs_beta"] = "entropy_vs_beta.png"
    plot_curves({"patch mIoU": {s: curve("miou", s) for s in scheds}},
                out / "miou_vs_beta.png", "β (patch-loss weight)", "mIoU")
    files["miou_vs_beta"] = "miou_vs_beta.png"
    if "downstream" in res:
        panels_b: dict[str, Any] = {}
        ref = {}
        for task in TASKS:
            groups = {}
            for p in res["downstream"]["pairs"].values():
                e = p["tasks"].get(task, {}).get("accuracy")
                if e:
                    groups[f"{p['projector']}/{p['llm']}"] = {
                        "caption-only": (e["caption"]["mean"], e["caption"]["std"]),
                        "patch-aligned": (e["patch"]["mean"], e["patch"]["std"])}
            if groups:
                panels_b[task] = groups
                ref[task] = res["downstream"]["chance"][task]["accuracy"]
        if panels_b:
            plot_grouped_bars(panels_b, out / "sft_accuracy.png", "accuracy", ref)
            files["sft_accuracy"] = "sft_accuracy.png"
    return files
