"""The multi-vector study (``fam ablate --only multivector``): does fine-grained alignment make
an LVLM's token states a good multi-vector representation, with or without training for it?

Checkpoints (every one an ablation run, trained once per seed and shared with the other
groups by its settings, :class:`fam.experiments.ablation.AblationRun`):

* zero-shot: the baseline, MAC only and FAM, read twice: their pooled vector (``single``)
  and the plain last-layer token states (``content`` tokens, L2 per token, no head) scored
  by MaxSim (``maxsim``) or reranking the pooled top :data:`RERANK_K` (``hybrid``);
* trained: the baseline and MAC only adapted with ``multivector.enabled=true`` (the late
  InfoNCE beside the pooled one, the preset's ``adapt.multivector`` head: 128 dims,
  meanmaxsim), read the same three ways. These two isolate MAC's effect on trained late
  interaction at the cost of two extra adaptations per seed; FAM + multi-vector would add a
  third and is left out (VEIN acts on the pooled vector's reconstruction, not on the token
  vectors MaxSim reads).

Every scoring of a checkpoint is evaluated from **one** encoding of the eval items (the
pooled vector and the token vectors come from the same forward,
:class:`fam.model.multivector.TwoReadings`; a cache serves the later scorings), with per-row
credits, so the paired statistics of the ablation (Student t over seeds, bootstrap over eval
rows) apply to ``maxsim − single`` of one checkpoint as to ``MAC − baseline``.

Mechanism check (:func:`map_check`): for eval images of Scenes, each object label present
("red square", all objects with it united) is a query whose content tokens (the label, after
the T2I instruction) are read as vectors; the image's tokens (``image`` set, the same head)
as the document. The map is the mean over the label's tokens of their similarity with each
image token — what MaxSim maximises over — scored against the ground-truth masks on the token
grid as the patch-alignment analysis does (:mod:`fam.analysis.alignment`: min-max per map,
threshold 0.5, IoU with ``S_k``; θ = 0.5 coverage with the arg-max fallback): mIoU, the
fraction of maps peaking inside the object (pointing), the in-minus-out contrast, and the
mIoU of the same maps with their cells shuffled (chance).

Per (seed, run) the study writes ``seed<s>/results/multivector/<run key>.json``: the late
scorings' records (key ``<run key>@<scoring>``), the map check and one example's maps for the
figure. The ablation report reads them (:func:`collect`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import ConfigError

if TYPE_CHECKING:
    from fam.config import DemoConfig
    from fam.experiments.ablation import AblationRun

log = logging.getLogger(__name__)

__all__ = ["STUDY_GROUP", "LATE_SCORINGS", "RERANK_K", "STUDY_COMPARISONS", "ScoredRun",
           "study_runs", "study_file", "study_eval", "map_check", "CachedReadings", "collect",
           "report_groups", "format_study"]

STUDY_GROUP = "multivector"
#: Scorings read besides the pooled vector (``single``, the run's own result file).
LATE_SCORINGS: tuple[str, ...] = ("maxsim", "hybrid")
#: Candidates ``hybrid`` reranks: a quarter of a 16-candidate Scenes row (fam eval's default,
#: 10, would rerank most of the row and be MaxSim by another name).
RERANK_K = 4
MAP_IMAGES = 64  #: eval images of the map check (at most)
#: The Scenes T2I query's instruction and the image target's text (fam.data.scenes.tasks).
T2I_PREFIX = "Find me an everyday image that matches the given caption: "
IMAGE_TARGET = f"{IMAGE_PLACEHOLDER}\nRepresent the given image."
#: Zero-shot checkpoints and trained ones, in the tables' order.
ZERO_SHOT: tuple[str, ...] = ("baseline", "mac_only", "fam")
TRAINED: tuple[str, ...] = ("baseline+mv", "mac_only+mv")


def scored(label: str, scoring: str) -> str:
    return label if scoring == "single" else f"{label} · {scoring}"


#: Paired comparisons of the study (config, reference), besides every row − baseline.
STUDY_COMPARISONS: tuple[tuple[str, str], ...] = (
    *((scored(c, s), c) for c in ZERO_SHOT + TRAINED for s in LATE_SCORINGS),
    (scored("mac_only", "maxsim"), scored("baseline", "maxsim")),
    (scored("fam", "maxsim"), scored("baseline", "maxsim")),
    (scored("mac_only+mv", "maxsim"), scored("baseline+mv", "maxsim")),
    (scored("mac_only+mv", "hybrid"), scored("baseline+mv", "hybrid")),
    (scored("baseline+mv", "maxsim"), scored("baseline", "maxsim")),
    (scored("mac_only+mv", "maxsim"), scored("mac_only", "maxsim")),
    ("baseline+mv", "baseline"), ("mac_only+mv", "mac_only"))
#: Map-check comparisons (config, reference), on checkpoints.
MAP_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("mac_only", "baseline"), ("fam", "baseline"), ("mac_only+mv", "baseline+mv"),
    ("baseline+mv", "baseline"), ("mac_only+mv", "mac_only"))


@dataclass(frozen=True)
class ScoredRun:
    """A run read with a late scoring: a row of the report (trains nothing itself)."""

    run: Any  # AblationRun
    scoring: str

    @property
    def key(self) -> str:
        return self.run.key if self.scoring == "single" else f"{self.run.key}@{self.scoring}"


def study_runs(mac: tuple[float, float, float], vein: Mapping[str, Any]
               ) -> list[tuple[str, AblationRun]]:
    """The study's checkpoints: ``[(label, run)]`` (the zero-shot ones are the main group's)."""
    from fam.experiments.ablation import AblationRun
    # Training order: FAM last (its zero-shot reading is the least central comparison).
    return [("baseline", AblationRun()), ("mac_only", AblationRun(align_weights=mac)),
            ("baseline+mv", AblationRun(multivector=True)),
            ("mac_only+mv", AblationRun(align_weights=mac, multivector=True)),
            ("fam", AblationRun(align_weights=mac, **vein))]


def study_file(root: Path, key: str) -> Path:
    return root / "results" / "multivector" / f"{key}.json"


def report_groups(expanded: Mapping[str, Sequence[tuple[str, Any]]]
                  ) -> dict[str, list[tuple[str, Any]]]:
    """The groups as the report shows them: the study's checkpoints each followed by their
    late scorings (rows ``<label> · maxsim``, keys ``<run key>@maxsim``)."""
    out = {g: list(cfgs) for g, cfgs in expanded.items()}
    if STUDY_GROUP in out:
        order = {lab: i for i, lab in enumerate(ZERO_SHOT + TRAINED)}
        cfgs = sorted(out[STUDY_GROUP], key=lambda c: order.get(c[0], len(order)))
        out[STUDY_GROUP] = [(scored(label, s), ScoredRun(r, s)) for label, r in cfgs
                            for s in ("single",) + LATE_SCORINGS]
    return out


# --------------------------------------------------------------------------- evaluation

class CachedReadings:
    """An encoder serving both readings of each item from one forward, encoded once and
    kept (so ``single``, ``maxsim`` and ``hybrid`` of a checkpoint share one encoding)."""

    def __init__(self, readings: Any):
        self.readings = readings
        self.adapter = readings.adapter
        self._cache: dict[MMItem, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def similarity(self) -> str:
        return self.readings.similarity

    def encode_multi_all(self, items, batch_size: int = 32, progress: bool = False,
                         desc: str = "encode") -> tuple[torch.Tensor, list[torch.Tensor]]:
        items = list(items)
        todo = list(dict.fromkeys(it for it in items if it not in self._cache))
        if todo:
            pooled, tokens = self.readings.encode_multi_all(todo, batch_size=batch_size,
                                                            progress=progress, desc=desc)
            for it, p, t in zip(todo, pooled.detach().float().cpu(), tokens):
                self._cache[it] = (p, t.detach().float().cpu())
        got = [self._cache[it] for it in items]
        return torch.stack([p for p, _ in got]), [t for _, t in got]

    def encode_all(self, items, batch_size: int = 32, progress: bool = False,
                   desc: str = "encode") -> torch.Tensor:
        return self.encode_multi_all(items, batch_size, progress, desc)[0]


def _readings(model_dir: Path, tokens: str | None = None):
    from fam.backbones import load_backbone
    from fam.model import EmbeddingModel
    from fam.model.multivector import TwoReadings, load_multivector
    model = EmbeddingModel(load_backbone(model_dir))
    head = load_multivector(model_dir, model.adapter.hidden_size, tokens=tokens)
    return model, TwoReadings(model, head.to(model.adapter.device))


def study_eval(run: AblationRun, root: Path, data: Path, seed: int, plan: DemoConfig,
               progress: bool = False) -> dict[str, Any]:
    """The late scorings and the map check of one finished run (its ``runs/<key>/model``)."""
    from fam.eval.mmeb import evaluate
    model_dir = root / "runs" / run.key / "model"
    model, readings = _readings(model_dir)
    enc = CachedReadings(readings)
    records = []
    for scoring in LATE_SCORINGS:
        t = time.time()
        res = evaluate(enc, data / "eval", data, progress=progress, per_row=True,
                       scoring=scoring, rerank_k=RERANK_K)
        records.append({"key": f"{run.key}@{scoring}", "seed": seed, "scoring": scoring,
                        "run": dataclasses.asdict(run), "model": str(model_dir),
                        "results": res, "timings_s": {"eval": time.time() - t}})
    t = time.time()
    maps = map_check(model_dir, data, max_images=min(MAP_IMAGES, plan.scenes.n_eval_images))
    records[0]["timings_s"]["maps"] = time.time() - t
    return {"key": run.key, "seed": seed, "head": readings.head.settings(),
            "trained_head": (model_dir / "fam_multivector.json").is_file(),
            "records": records, "maps": maps}


# --------------------------------------------------------------------------- map check

def _label_items(labels: Sequence[str]) -> list[MMItem]:
    out = []
    for lab in labels:
        text = f"{T2I_PREFIX}a {lab}"
        out.append(MMItem(text=text, content=(len(text) - len(lab), len(text))))
    return out


def _token_strings(tokenizer: Any, item: MMItem) -> list[str]:
    """The tokens of an item's content span as the tokenizer writes them (for figure labels)."""
    enc = tokenizer(item.text, return_offsets_mapping=True, add_special_tokens=False)
    lo, hi = item.content or (0, len(item.text))
    ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a < hi and b > lo]
    return [tokenizer.decode([i]).strip() or "·" for i in ids]


def _grid(adapter: Any, rec: Any, n_tokens: int) -> Any:
    """The record's image-token grid (the adapter's, :class:`fam.backbones.batch.TokenGrid`),
    checked against the tokens the head read."""
    from PIL import Image
    with Image.open(rec.path) as im:
        grid = adapter.image_token_grid(im.convert("RGB"))
    if grid is None or grid.first + grid.rows * grid.cols > n_tokens:
        raise ConfigError(f"{type(adapter).__name__}: no plain image-token grid for "
                          f"{rec.image} ({n_tokens} image tokens); the map check needs one "
                          "(Qwen2-VL and LLaVA-1.5 families)")
    return grid


def _masks_on_grid(masks: torch.Tensor, grid: Any) -> torch.Tensor:
    """``(K, rows·cols)`` coverage of ``(K, H, W)`` masks by the grid's cells (the grid covers
    ``grid.box`` of the image)."""
    from fam.analysis.alignment import grid_coverage
    h, w = masks.shape[1:]
    x0, y0, x1, y1 = grid.box
    crop = masks[:, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]
    return grid_coverage(crop, (grid.rows, grid.cols))


def _pick_example(recs: Sequence[Any]) -> int:
    """The figure's image: the first with two objects of different labels (a short caption
    and a wrong object to tell apart), else the first."""
    for i, r in enumerate(recs):
        if len(r.regions) == 2 and len({reg.label for reg in r.regions}) == 2:
            return i
    return 0


def map_check(model_dir: str | Path, data: str | Path, max_images: int = MAP_IMAGES,
              example: int | None = None) -> dict[str, Any]:
    """MaxSim maps of object labels over Scenes eval images against the objects' masks.

    Returns:
        ``{"miou", "miou_shuffled", "pointing", "contrast", "n_regions", "n_images", "grid",
        "example": {image, caption, tokens, maps, object_coverage, grid}}`` (``example``: the
        T2I caption of eval image ``example`` (default: :func:`_pick_example`) and its
        per-token maps, for the figure).
    """
    from fam.analysis.alignment import (contrast, patch_miou, pointing_accuracy,
                                        shuffled_miou, token_maps)
    from fam.analysis.probes import pad_records
    from fam.data.rle import rle_decode
    from fam.projector.geometry import select_patches

    data = Path(data)
    recs = pad_records(data, "eval", max_images)
    model, q_read = _readings(Path(model_dir))
    _, d_read = _readings(Path(model_dir), tokens="image")
    docs = [MMItem(text=IMAGE_TARGET, image=r.path) for r in recs]
    _, d_tok = d_read.encode_multi_all(docs)
    grids = [_grid(model.adapter, r, len(t)) for r, t in zip(recs, d_tok)]
    d_tok = [t[g.first:g.first + g.rows * g.cols] for t, g in zip(d_tok, grids)]
    queries, gts, owner = [], [], []
    for i, r in enumerate(recs):
        by_label: dict[str, torch.Tensor] = {}
        for reg in r.regions:
            m = torch.from_numpy(rle_decode(reg.mask).astype(bool))
            by_label[reg.label] = by_label[reg.label] | m if reg.label in by_label else m
        if not by_label:
            continue
        cov = _masks_on_grid(torch.stack(list(by_label.values())), grids[i])
        gts += list(torch.from_numpy(select_patches(cov.numpy(), 0.5, flat=True)))
        queries += list(by_label)
        owner += [i] * len(by_label)
    q_items = _label_items(queries)
    _, q_tok = q_read.encode_multi_all(q_items)
    ious, points, contrasts, shuffled = [], [], [], []
    for n in sorted({g.rows * g.cols for g in grids}):  # maps of one grid size together
        ks = [k for k in range(len(q_items)) if len(d_tok[owner[k]]) == n]
        maps = torch.stack([token_maps(q_tok[k], d_tok[owner[k]]).mean(0) for k in ks])
        gt = torch.stack([gts[k] for k in ks])
        w = len(ks)
        ious.append((patch_miou(maps, gt), w))
        points.append((pointing_accuracy(maps, gt), w))
        contrasts.append((contrast(maps, gt), w))
        shuffled.append((shuffled_miou(maps, gt), w))

    def avg(xs: list[tuple[float, int]]) -> float:
        return sum(v * w for v, w in xs) / sum(w for _, w in xs)

    out = {"miou": avg(ious), "miou_shuffled": avg(shuffled), "pointing": avg(points),
           "contrast": avg(contrasts), "n_regions": len(q_items), "n_images": len(recs),
           "grid": [grids[0].rows, grids[0].cols]}
    example = _pick_example(recs) if example is None else example
    out["example"] = _example(model, q_read, recs[example], d_tok[example], grids[example], data)
    return out


def _example(model: Any, q_read: Any, rec: Any, d_tok: torch.Tensor, grid: Any,
             data: Path) -> dict[str, Any]:
    """Per-token maps of the image's T2I caption (its scene caption) for the figure."""
    from fam.analysis.alignment import token_maps
    from fam.data.rle import rle_decode
    caps = {Path(c["image"]).as_posix(): c["caption"]
            for c in json.loads((data / "captions_eval.json").read_text())}
    caption = caps.get(rec.image) or f"a {rec.regions[0].label}"
    text = f"{T2I_PREFIX}{caption}"
    item = MMItem(text=text, content=(len(T2I_PREFIX), len(text)))
    _, q = q_read.encode_multi_all([item])
    maps = token_maps(q[0], d_tok)
    names = _token_strings(model.adapter.tokenizer, item)
    if len(names) != len(maps):
        names = [f"t{i + 1}" for i in range(len(maps))]
    masks = torch.stack([torch.from_numpy(rle_decode(r.mask).astype(bool)) for r in rec.regions])
    cover = _masks_on_grid(masks.any(0, keepdim=True), grid)[0]
    return {"image": rec.image, "caption": caption, "tokens": names, "maps": maps.tolist(),
            "object_coverage": cover.tolist(), "grid": [grid.rows, grid.cols],
            "box": list(grid.box)}


# --------------------------------------------------------------------------- report

MAP_METRICS: tuple[str, ...] = ("miou", "miou_shuffled", "pointing", "contrast")


def collect(out: Path, seeds: Sequence[int],
            expanded: Mapping[str, Sequence[tuple[str, Any]]]
            ) -> tuple[dict[str, list[tuple[str, Any]]], list[dict[str, Any]], dict[str, Any]]:
    """``(report groups, the late scorings' records, the map summary)`` of the finished study
    files (nothing when the group is not run)."""
    if STUDY_GROUP not in expanded:
        return dict(expanded), [], {}
    labels = {r.key: lab for lab, r in expanded[STUDY_GROUP]}
    records: list[dict[str, Any]] = []
    maps: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in seeds:
        for key, lab in labels.items():
            f = study_file(out / f"seed{seed}", key)
            if f.exists():
                d = json.loads(f.read_text())
                records += d["records"]
                maps.setdefault(lab, {})[seed] = {**d["maps"], "head": d["head"],
                                                  "trained_head": d["trained_head"]}
    order = [lab for lab in ZERO_SHOT + TRAINED if lab in maps] + \
        [lab for lab in labels.values() if lab not in ZERO_SHOT + TRAINED]
    return report_groups(expanded), records, summarise_maps(maps, order)


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    from fam.analysis.stats import paired_t_ci
    if not xs:
        return {"mean": None, "sd": None, "n": 0, "ci95": None}
    r = paired_t_ci([0.0] * len(xs), list(xs))
    ok = r["n"] >= 2
    return {"mean": r["mean"], "sd": r["sd"] if ok else None, "n": r["n"],
            "ci95": [r["lo"], r["hi"]] if ok else None}


def summarise_maps(maps: Mapping[str, Mapping[int, Mapping[str, Any]]],
                   order: Sequence[str]) -> dict[str, Any]:
    """Per checkpoint: mean, sd and t 95 % interval over seeds of each map metric; paired
    differences (:data:`MAP_COMPARISONS`, same seeds); the lowest seed's example maps."""
    per = {}
    for lab in order:
        if lab not in maps:
            continue
        seeds = sorted(maps[lab])
        per[lab] = {m: _stats([maps[lab][s][m] for s in seeds]) for m in MAP_METRICS}
        per[lab].update(seeds=seeds, n_regions=maps[lab][seeds[0]]["n_regions"],
                        trained_head=maps[lab][seeds[0]]["trained_head"])
    paired = []
    for a, b in MAP_COMPARISONS:
        if a in maps and b in maps:
            both = sorted(set(maps[a]) & set(maps[b]))
            paired.append({"config": a, "reference": b, "seeds": both, "metrics": {
                m: _stats([maps[a][s][m] - maps[b][s][m] for s in both])
                for m in ("miou", "pointing")}})
    examples = {}
    for lab in order:
        if lab in maps:
            examples[lab] = {**maps[lab][min(maps[lab])]["example"], "seed": min(maps[lab])}
    return {"maps": per, "paired": paired, "examples": examples}


def _cell(d: Mapping[str, Any], fmt: str = "{:.3f}") -> str:
    if d.get("mean") is None:
        return "-"
    s = fmt.format(d["mean"])
    if d.get("ci95"):
        s += f" [{fmt.format(d['ci95'][0])}, {fmt.format(d['ci95'][1])}]"
    return s


def format_study(study: Mapping[str, Any], table: Sequence[str] = ()) -> list[str]:
    """Markdown lines of the study's summary ``table`` (:func:`summary_table`) and the map
    check (the precision tables are the ablation's)."""
    lines = []
    if table:
        lines += ["## One vector or many: summary", "",
                  "Overall precision@1 (%) of each reading, mean over seeds; maxsim − single "
                  "paired by seed (Student t 95 %); retrieval and grounding single / maxsim; "
                  "hybrid = MaxSim rerank of the pooled top " + f"{RERANK_K}.", "", *table, ""]
    per = study.get("maps") or {}
    if not per:
        return lines
    lines += ["## MaxSim maps vs object masks", "",
             "Per object label of an eval image (query: the label's tokens after the T2I "
             "instruction; document: the image's tokens), the map = mean over the label's "
             "tokens of their similarity with each image token, against the union of that "
             "label's object masks on the token grid (min-max per map, threshold 0.5; mIoU as "
             "the patch-alignment analysis). Shuffled: the same maps, cells permuted (chance). "
             "Pointing: the map peaks inside the object. Mean over seeds [t 95 %].", "",
             "| checkpoint | head | mIoU | mIoU shuffled | pointing | in − out cos | seeds |",
             "|---|---|---|---|---|---|---|"]
    for lab, m in per.items():
        lines.append(f"| {lab} | {'trained' if m['trained_head'] else 'token states'} | "
                     f"{_cell(m['miou'])} | {_cell(m['miou_shuffled'])} | "
                     f"{_cell(m['pointing'], '{:.2f}')} | {_cell(m['contrast'])} | "
                     f"{len(m['seeds'])} |")
    if study.get("paired"):
        lines += ["", "| map difference (paired by seed) | seeds | ΔmIoU [t 95 %] | "
                  "Δpointing [t 95 %] |", "|---|---|---|---|"]
        for p in study["paired"]:
            lines.append(f"| {p['config']} − {p['reference']} | {len(p['seeds'])} | "
                         f"{_cell(p['metrics']['miou'], '{:+.3f}')} | "
                         f"{_cell(p['metrics']['pointing'], '{:+.2f}')} |")
    return lines + [""]


def plot_examples(path: Path, study: Mapping[str, Any], data: Path) -> str | None:
    """The figure: per checkpoint (rows), the example image with each query token's map
    (columns) and their mean; None without matplotlib or examples."""
    ex = study.get("examples") or {}
    if not ex:
        return None
    try:
        from fam.analysis.plots import plot_token_maps
    except ImportError:  # pragma: no cover - matplotlib is an optional extra
        return None
    try:
        return str(plot_token_maps(ex, data, path))
    except ImportError:  # pragma: no cover
        return None


def summary_table(report: Mapping[str, Any]) -> list[str]:
    """The study in one table (the README's): per checkpoint, overall precision@1 of each
    reading (mean over seeds), ``maxsim − single`` paired by seed with its t interval,
    retrieval and grounding single / maxsim, and the map mIoU (shuffled-cell chance)."""
    groups = dict(report.get("groups", {}))
    if STUDY_GROUP not in groups:
        return []
    keys = dict((lab, key) for lab, key in groups[STUDY_GROUP])
    agg = report["aggregates"]
    paired = {(p["config"], p["reference"]): p for p in report.get("paired") or []}
    maps = (report.get("multivector") or {}).get("maps", {})

    def mean(label: str, metric: str) -> str:
        a = agg.get(keys.get(label, ""), {}).get(metric, {})
        return "-" if a.get("mean") is None else f"{a['mean']:.1f}"

    lines = ["| checkpoint | seeds | single | maxsim | hybrid | maxsim − single [t 95 %] | "
             "Retr. single / maxsim | Ground. single / maxsim | map mIoU (shuffled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lab in ZERO_SHOT + TRAINED:
        if keys.get(lab) not in agg:
            continue
        p = paired.get((scored(lab, "maxsim"), lab))
        d = p["metrics"]["overall"] if p else {}
        delta = "-" if d.get("mean") is None else f"{d['mean']:+.1f}" + (
            f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d.get("ci95") else "")
        m = maps.get(lab)
        miou = (f"{m['miou']['mean']:.3f} ({m['miou_shuffled']['mean']:.3f})" if m else "-")
        name = lab.replace("+mv", " + multi-vector training")
        late = agg.get(keys.get(scored(lab, "maxsim"), ""))
        n = len((late or agg[keys[lab]])["seeds"])
        lines.append(f"| {name} | {n} | {mean(lab, 'overall')} | "
                     f"{mean(scored(lab, 'maxsim'), 'overall')} | "
                     f"{mean(scored(lab, 'hybrid'), 'overall')} | {delta} | "
                     f"{mean(lab, 'retrieval')} / {mean(scored(lab, 'maxsim'), 'retrieval')} | "
                     f"{mean(lab, 'grounding')} / {mean(scored(lab, 'maxsim'), 'grounding')} | "
                     f"{miou} |")
    return lines
