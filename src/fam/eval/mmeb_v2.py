"""MMEB-V2 evaluation: image, video and visual-document tasks ranked and scored alike.

Each dataset (:mod:`fam.data.mmeb.v2`) is a set of queries with relevance labels; each
query ranks its own candidates (local) or the whole corpus (global), by cosine of the
embeddings, ties against relevant items (:mod:`fam.eval.ranking`). Every metric at 1/5/10
is written to ``{Dataset}_score.json`` under VLM2Vec's names; the dataset's score is
``hit@1`` for image and video tasks and ``ndcg_linear@5`` for visual documents, as
VLM2Vec-V2's ``report_score_v2.py`` reports.

Aggregation (equal weight per dataset, percentages): the nine groups (image
classification/VQA/retrieval/grounding, video classification/QA/retrieval/moment
retrieval, visual documents), each modality (``image``, ``video``, ``visdoc``: the mean
over its datasets, as ``report_score_v2.py`` averages) and ``overall`` (the mean over every
dataset). A dataset's modality and group come from the MMEB-V2 table (:data:`V2_DATASETS`)
or from ``datasets.json`` beside the data (``{name: {"modality": "video", "meta_task":
"retrieval"}}``); a dataset in neither is scored and listed under ``other_datasets``, outside
every mean.

Results JSON::

    {"metric": {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"},
     "datasets": {name: {"modality", "meta_task", "score", "metrics": {hit@1, ...},
                         "n", "n_candidates", "ranking": "local" | "global", "chance"}},
     "groups": {"image/classification": ..., ..., "visdoc/retrieval": ...},
     "image": ..., "video": ..., "visdoc": ..., "overall": ...,
     "n_datasets": {...}, "other_datasets": [...], "settings": {...}}
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fam.data.images import ImageRef, check_images
from fam.data.mmeb.datasets import MMEB_DATASETS, find_datasets_json
from fam.data.mmeb.layout import iter_rows
from fam.data.mmeb.v2 import RankTask, discover_v2, read_task
from fam.errors import DataError
from fam.eval.ranking import rank_ids, score_rankings, write_score_json

logger = logging.getLogger(__name__)

__all__ = ["V2_GROUPS", "V2_DATASETS", "PRIMARY", "evaluate_v2", "is_v2_benchmark",
           "aggregate_v2", "save_v2_score_files", "format_v2_table"]

#: The nine groups, per modality, in report order.
V2_GROUPS: dict[str, tuple[str, ...]] = {
    "image": ("classification", "vqa", "retrieval", "grounding"),
    "video": ("classification", "qa", "retrieval", "moment_retrieval"),
    "visdoc": ("retrieval",),
}
#: The score of a dataset, per modality (report_score_v2.py's modality2metric).
PRIMARY: dict[str, str] = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}

_VIDEO = {"classification": ["K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast"],
          "qa": ["MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA"],
          "retrieval": ["DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2"],
          "moment_retrieval": ["QVHighlight", "Charades-STA", "MomentSeeker"]}
_VISDOC = ["ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad",
           "ViDoRe_tatdqa", "ViDoRe_shiftproject",
           "ViDoRe_syntheticDocQA_artificial_intelligence", "ViDoRe_syntheticDocQA_energy",
           "ViDoRe_syntheticDocQA_government_reports",
           "ViDoRe_syntheticDocQA_healthcare_industry", "ViDoRe_esg_reports_human_labeled_v2",
           "ViDoRe_biomedical_lectures_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
           "ViDoRe_economics_reports_v2", "ViDoRe_economics_reports_v2_multilingual",
           "ViDoRe_esg_reports_v2", "ViDoRe_esg_reports_v2_multilingual", "VisRAG_ArxivQA",
           "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_SlideVQA", "VisRAG_InfoVQA",
           "VisRAG_PlotQA", "ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page",
           "MMLongBench-doc"]
#: ``{dataset: (modality, meta_task)}``: MMEB-V2's datasets (report_score_v2.py's lists).
V2_DATASETS: dict[str, tuple[str, str]] = {
    **{n: ("image", i.meta_task) for n, i in MMEB_DATASETS.items()},
    **{n: ("video", g) for g, names in _VIDEO.items() for n in names},
    **{n: ("visdoc", "retrieval") for n in _VISDOC},
}
_V2_KEYS = ("qry_video", "tgt_video", "clip_dir")


def is_v2_benchmark(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds MMEB-V2 data: a BEIR folder, a video/visdoc dataset name,
    or rows with video fields (``fam eval`` then scores it with :func:`evaluate_v2`)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return False
    for name, (kind, path) in discover_v2(data_dir).items():
        if kind == "beir" or V2_DATASETS.get(name, ("image",))[0] != "image":
            return True
        for _, row in iter_rows(path, list(_V2_KEYS), []):
            if isinstance(row, dict) and any(row.get(k) for k in _V2_KEYS):
                return True
            break
    return False


def _declared(data_dir: Path) -> dict[str, dict[str, Any]]:
    path = find_datasets_json(data_dir)
    if path is None:
        return {}
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read datasets.json: {e}", path) from None
    if not isinstance(spec, dict):
        raise DataError("expected an object {dataset: {modality, meta_task}}", path)
    out = {}
    for name, entry in spec.items():
        if not isinstance(entry, dict):
            raise DataError(f"{name}: expected an object {{modality, meta_task}}", path, None,
                            name)
        modality = entry.get("modality", "image")
        task = entry.get("meta_task")
        if modality not in V2_GROUPS or task not in V2_GROUPS[modality]:
            raise DataError(f"{name}: modality must be one of {list(V2_GROUPS)} and meta_task "
                            f"one of that modality's groups {V2_GROUPS}; got {modality!r}, "
                            f"{task!r}", path, None, name)
        out[name] = dict(entry, modality=modality)
    return out


def _check_media(task: RankTask, progress: bool) -> None:
    items = list(task.corpus.values()) + [q.item for q in task.queries]
    check_images((ImageRef(p, it.source, it.line, it.field) for it in items
                  for p in it.all_images + list(it.video)), mode="verify", progress=progress)


def _rank(task: RankTask, emb: torch.Tensor, slot: dict[int, int],
          ids: list[str]) -> list[list[str]]:
    """Top-10 ids per query (local: its candidates; global: the corpus)."""
    out: list[list[str]] = []
    glob = [k for k, q in enumerate(task.queries) if q.candidates is None]
    rankings: dict[int, list[str]] = {}
    if glob:
        corpus = emb[[slot[id(task.corpus[c])] for c in ids]]
        for s in range(0, len(glob), 256):
            chunk = glob[s:s + 256]
            q = emb[[slot[id(task.queries[k].item)] for k in chunk]]
            top = rank_ids(q @ corpus.T, ids, [task.queries[k].relevance for k in chunk])
            rankings.update(zip(chunk, top))
    for k, query in enumerate(task.queries):
        if query.candidates is None:
            out.append(rankings[k])
            continue
        cand = emb[[slot[id(task.corpus[c])] for c in query.candidates]]
        scores = emb[slot[id(query.item)]][None] @ cand.T
        out.append(rank_ids(scores, query.candidates, [query.relevance])[0])
    return out


def _evaluate_task(encoder: Any, task: RankTask, batch_size: int, progress: bool
                   ) -> dict[str, Any]:
    from fam.eval.mmeb import _encode_unique  # the shared encode (dedup, checks, normalise)
    unique: dict[Any, int] = {}
    slot: dict[int, int] = {}
    for it in list(task.corpus.values()) + [q.item for q in task.queries]:
        slot[id(it)] = unique.setdefault(it, len(unique))
    emb = _encode_unique(encoder, list(unique), batch_size, progress, task.name)
    ids = list(task.corpus)
    rankings = _rank(task, emb, slot, ids)
    metrics = score_rankings(rankings, [q.relevance for q in task.queries])
    local = [q for q in task.queries if q.candidates is not None]
    sizes = [len(q.candidates) if q.candidates is not None else len(ids) for q in task.queries]
    chance = sum(min(1.0, len(q.relevance) / n) for q, n in zip(task.queries, sizes)) / len(sizes)
    return {"metrics": metrics, "n": len(task.queries), "n_encoded": len(unique),
            "n_candidates": sum(sizes) / len(sizes),
            "ranking": "local" if len(local) == len(task.queries) else "global",
            "chance_hit@1": 100.0 * chance}


def aggregate_v2(per_dataset: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Group, modality and overall means (equal weight per dataset) of ``score``."""
    def mean(vals: Sequence[float]) -> float | None:
        return sum(vals) / len(vals) if vals else None

    known = {n: d for n, d in per_dataset.items() if d.get("modality") is not None}
    out: dict[str, Any] = {"groups": {}, "n_datasets": {}}
    for modality, groups in V2_GROUPS.items():
        for g in groups:
            vals = [d["score"] for d in known.values()
                    if d["modality"] == modality and d["meta_task"] == g]
            out["groups"][f"{modality}/{g}"] = mean(vals)
            out["n_datasets"][f"{modality}/{g}"] = len(vals)
        vals = [d["score"] for d in known.values() if d["modality"] == modality]
        out[modality], out["n_datasets"][modality] = mean(vals), len(vals)
    out["overall"] = mean([d["score"] for d in known.values()])
    out["n_datasets"]["overall"] = len(known)
    return out


def evaluate_v2(encoder: Any, data_dir: str | Path, media_root: str | Path | None = None,
                datasets: Iterable[str] | None = None, batch_size: int = 32,
                max_rows: int | None = None, progress: bool = True, check_media: bool = True
                ) -> dict[str, Any]:
    """Score every (or the chosen) dataset of an MMEB-V2 benchmark folder.

    Args:
        encoder: anything with ``encode(items) -> (n, d)`` (or ``encode_all``), e.g. an
            :class:`~fam.model.EmbeddingModel`.
        data_dir: the benchmark folder (layouts in :mod:`fam.data.mmeb.v2`).
        media_root: folder every image / frame / clip path is relative to (default:
            ``data_dir``).
        datasets: names to score (default: all found).
        max_rows: score only the first queries of each dataset.
        check_media: check every image and frame up front (``verify``).

    Returns:
        The results dict of this module's docstring.

    Raises:
        DataError: bad data (names file, line, field) or an unknown dataset name.
    """
    data_dir = Path(data_dir)
    root = Path(media_root) if media_root is not None else data_dir
    found = discover_v2(data_dir)
    names = list(found) if datasets is None else list(datasets)
    missing = [n for n in names if n not in found]
    if missing or not names:
        raise DataError(f"dataset(s) {missing or '[]'} not found; available: {sorted(found)}",
                        data_dir)
    declared = _declared(data_dir)
    per_dataset: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for name in names:
        entry = declared.get(name, {})
        inst = (entry["qry_inst"], entry["tgt_inst"]) if "qry_inst" in entry else None
        task = read_task(name, found[name][0], found[name][1], root, max_rows, inst)
        if check_media:
            _check_media(task, progress)
        res = _evaluate_task(encoder, task, batch_size, progress)
        modality, meta_task = ((entry["modality"], entry["meta_task"]) if entry
                               else V2_DATASETS.get(name, (None, None)))
        if modality is None:
            other.append(name)
        metric = PRIMARY.get(modality or ("video" if task.has_video else "visdoc"
                                          if task.kind == "beir" else "image"))
        res.update(modality=modality, meta_task=meta_task, metric=metric,
                   score=100.0 * float(res["metrics"][metric]))
        per_dataset[name] = res
        logger.info("%s: %s %.2f over %d queries", name, metric, res["score"], res["n"])
    if other:
        logger.warning("%s: not MMEB-V2 datasets and not declared in datasets.json "
                       "({name: {modality, meta_task}}): scored, left out of every mean",
                       ", ".join(other))
    results: dict[str, Any] = {"metric": dict(PRIMARY), "datasets": per_dataset}
    results.update(aggregate_v2(per_dataset))
    results["other_datasets"] = other
    results["settings"] = {"data_dir": str(data_dir), "media_root": str(root),
                           "max_rows": max_rows, "ties": "pessimistic"}
    backbone = getattr(getattr(encoder, "adapter", None), "settings", None)
    if backbone is not None and hasattr(backbone, "to_dict"):
        results["settings"]["backbone"] = backbone.to_dict()
    return results


def save_v2_score_files(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``<out_dir>/{Dataset}_score.json`` with every metric under VLM2Vec's keys."""
    return [write_score_json(Path(out_dir) / f"{name}_score.json", d["metrics"])
            for name, d in results.get("datasets", {}).items()]


def format_v2_table(results: Any, digits: int = 1) -> str:
    """A text table: every dataset's score, the nine groups, the modalities and overall.

    ``results``: one results dict, or a list of ``(name, results)`` (one column each, and
    their difference, second minus first, for two).
    """
    runs = [("score", results)] if isinstance(results, dict) else list(results)
    names = list(dict.fromkeys(n for _, r in runs for n in r["datasets"]))
    metric = {n: r["datasets"][n]["metric"] for _, r in runs for n in r["datasets"]}
    rows: list[tuple[str, list[float | None]]] = [
        (f"  {n} ({metric[n]})", [r["datasets"].get(n, {}).get("score") for _, r in runs])
        for n in names]
    rows += [(g, [r["groups"].get(g) for _, r in runs]) for g in runs[0][1]["groups"]]
    rows += [(m, [r.get(m) for _, r in runs]) for m in (*V2_GROUPS, "overall")]

    def fmt(v: float | None, signed: bool = False) -> str:
        return "-" if v is None else f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"

    header = [""] + [n for n, _ in runs] + (["diff"] if len(runs) == 2 else [])
    body = []
    for label, vals in rows:
        cells = [label] + [fmt(v) for v in vals]
        if len(runs) == 2:
            cells.append(fmt(None if None in vals else vals[1] - vals[0], signed=True))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                        zip(r[1:], widths[1:])]).rstrip()
                     for r in [header] + body)
