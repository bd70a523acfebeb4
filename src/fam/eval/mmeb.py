"""The MMEB evaluation protocol (method.md §6): rank candidates by cosine, report precision@1.

For each dataset: every distinct item (query or candidate, e.g. the same ``(text, image)``) is
encoded once, each query is scored against its own candidate list by cosine similarity,
and precision@1 (with the chosen tie rule, see :mod:`fam.eval.metrics`) is averaged
over rows. Real MMEB rows carry 1000 candidates, mostly shared across rows (e.g. the 1000
ImageNet class names), so deduplication cuts encoding work by up to ~1000x.

Results JSON (what :func:`evaluate` returns and :func:`save_results` writes); every score
and chance level is a percentage in [0, 100]::

    {
      "metric": "precision@1",
      "ties": "expected",                 # tie rule: expected | optimistic | pessimistic
      "datasets": {
        "<name>": {
          "precision@1": 63.2,            # mean over rows x 100
          "n": 1000,                      # rows evaluated
          "n_correct": 632.0,             # sum of per-row credits (an int unless ties split)
          "n_candidates": 1000,           # candidates per row (a float mean if they vary)
          "n_encoded": 2000,              # distinct items encoded (after deduplication)
          "meta_task": "classification",  # classification | vqa | retrieval | grounding
          "split": "IND",                 # IND | OOD
          "chance": 0.1,                  # expected precision@1 of a random ranking
          "credits": [1.0, 0.0, 0.5, ...] # per-row credits, only with keep_credits=True
        }, ...
      },
      "meta_task": {"classification": 55.1, "vqa": null, ...},  # null: no dataset evaluated
      "IND": 60.0, "OOD": 50.0, "overall": 55.6,  # equal-weight means over datasets
      "n_datasets": {"classification": 10, ..., "IND": 20, "OOD": 16, "overall": 36},
      "chance": {"meta_task": {...}, "IND": ..., "OOD": ..., "overall": ...},
      "other_datasets": [],               # evaluated but not MMEB: in no mean
      "settings": {"data_dir": "...", "image_root": "...", "max_rows": null, "split": null,
                   "backbone": {"prompt_format": "fam", "image_resolution": null,
                                "max_text_tokens": 128, "min_pixels": ..., "max_pixels": ...}}
    }

``settings.backbone`` is recorded when the encoder is an :class:`~fam.model.EmbeddingModel`
(the input settings of its adapter). :func:`save_score_files` also writes VLM2Vec's
per-dataset files, ``{Dataset}_score.json`` with ``acc`` (a fraction), ``num_correct`` and
``num_pred``, so a fam run compares file by file with a VLM2Vec ``eval.py`` run.

A dataset's chance level comes from ``datasets.json`` when it declares one (its
``chance``, else ``1 / n_candidates``); otherwise it is computed from the rows evaluated
(mean of 1 / #candidates), which is exactly what a constant scorer obtains under the
``"expected"`` tie rule. Items are deduplicated by value (``MMItem`` equality: text,
image path and content span).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fam.data.mmeb import (EvalRow, discover_datasets, find_datasets_json, find_info,
                           load_dataset_infos, read_eval_rows, validate_images)
from fam.data.mmeb.datasets import MMEB_EVAL_EXTRAS
from fam.data.mmeb.layout import guess_image_root
from fam.data.types import MMItem
from fam.errors import ConfigError, DataError
from fam.eval.metrics import Ties, aggregate, check_ties, precision_at_1
from fam.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["Encoder", "evaluate", "evaluate_rows", "save_results", "load_results",
           "save_score_files", "PRIMARY_METRIC"]

#: The metric MMEB reports; the key of each dataset's score in the results.
PRIMARY_METRIC = "precision@1"

# Scoring works on chunks of rows with at most this many (row, candidate) scores...
_SCORE_CHUNK_ELEMS = 2 ** 22
# ...and, when candidates are not shared, gathers at most this many float32 elements of
# (rows, C, d) candidate embeddings at once (128 MiB).
_GATHER_BLOCK_ELEMS = 2 ** 25


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds MMEB items.

    ``encode`` receives up to ``batch_size`` items (text with optional
    :data:`~fam.data.types.IMAGE_PLACEHOLDER`, optional absolute image path) and returns
    their embeddings, (n, d), one row per item in order. Rows should be L2-normalised;
    :func:`evaluate` re-normalises anyway so the score is exactly cosine. It is called
    under ``torch.no_grad()``; putting the model in eval mode is the caller's job.
    """

    def encode(self, items: list[MMItem]) -> torch.Tensor:  # (n, d)
        ...

    # Optional: ``encode_all(items, batch_size=, progress=, desc=) -> (n, d)`` embeds all of
    # ``items`` in one call (its own batching and progress bar); used when present.


def _encode_unique(encoder: Encoder, items: Sequence[MMItem], batch_size: int,
                   progress: bool, desc: str) -> torch.Tensor:
    """Encode ``items`` in batches; returns (len(items), d) float32 unit rows on the CPU.

    Embeddings are moved to the CPU batch by batch so the accelerator keeps its memory for
    the model; scoring on the CPU is cheap next to encoding.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1", key="batch_size")
    encode_all = getattr(encoder, "encode_all", None)
    if callable(encode_all):
        # The encoder batches the whole list itself (EmbeddingModel: length-grouped batches,
        # preprocessing overlapped with the forward).
        emb = encode_all(list(items), batch_size=batch_size, progress=progress, desc=desc)
        _check_shape(emb, len(items), "encoder.encode_all")
        emb = emb.detach().float().cpu()
        _refuse_non_finite(emb, items)
        return F.normalize(emb, dim=-1)
    chunks: list[torch.Tensor] = []
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = list(items[start:start + batch_size])
            emb = encoder.encode(batch)
            _check_shape(emb, len(batch), "encoder.encode")
            emb = emb.detach().float().cpu()
            _refuse_non_finite(emb, batch)
            chunks.append(F.normalize(emb, dim=-1))
            bar.update(len(batch))
    bar.close()
    return torch.cat(chunks)


def _check_shape(emb: object, n: int, what: str) -> None:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != n:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"{what} returned {shape} for {n} items; expected a tensor of shape "
                         "(n, d)")


def _refuse_non_finite(emb: torch.Tensor, items: Sequence[MMItem]) -> None:
    """NaN scores would rank as chance and look like a weak model; refuse instead."""
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten()
    if bad.numel():
        it = items[int(bad[0])]
        where = f" (first: {it.source}, line {it.line})" if it.source else ""
        raise DataError(f"the model produced non-finite embeddings for {bad.numel()} of "
                        f"{len(items)} items{where}; its weights or inputs are broken (check "
                        "for NaN weights)")


def _score_rows(emb: torch.Tensor, q_idx: torch.Tensor, c_idx: torch.Tensor,
                ties: Ties) -> torch.Tensor:
    """Precision@1 credits of rows sharing one candidate count.

    Args:
        emb: (U, d) unit embeddings of the distinct items.
        q_idx: (R,) row -> index of its query in ``emb``.
        c_idx: (R, C) row -> indices of its candidates (positive first).

    Returns:
        (R,) float64 credits.
    """
    r, c = c_idx.shape
    d = emb.shape[1]
    rows_per_chunk = max(1, _SCORE_CHUNK_ELEMS // c)
    out = []
    for s in range(0, r, rows_per_chunk):
        q = emb[q_idx[s:s + rows_per_chunk]]                          # (b, d)
        cidx = c_idx[s:s + rows_per_chunk]                            # (b, C)
        uniq, inv = torch.unique(cidx, return_inverse=True)           # (u,), (b, C)
        if q.shape[0] * len(uniq) <= 4 * _SCORE_CHUNK_ELEMS:
            # Shared candidates (e.g. the same 1000 class names in every row): one
            # (b, d) x (d, u) product, then pick each row's own columns.
            scores = (q @ emb[uniq].T).gather(1, inv)                 # (b, C) cosine
        else:
            # Mostly distinct candidates: gather each row's own (C, d) block instead of
            # scoring every row against all u, which would cost u / C times more.
            step = max(1, _GATHER_BLOCK_ELEMS // max(1, c * d))
            scores = torch.cat([torch.einsum("bd,bcd->bc", q[i:i + step], emb[cidx[i:i + step]])
                                for i in range(0, q.shape[0], step)])
        out.append(precision_at_1(scores, 0, ties))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def evaluate_rows(encoder: Encoder, rows: Sequence[EvalRow], batch_size: int = 32,
                  ties: Ties = "expected", progress: bool = True, desc: str = "encode",
                  scoring: str = "single", rerank_k: int = 10) -> tuple[torch.Tensor, int]:
    """Score one dataset's rows.

    Args:
        encoder: see :class:`Encoder`.
        rows: the dataset's rows (candidate lists may differ in length).
        batch_size: items per ``encoder.encode`` call.
        ties: tie rule of :func:`~fam.eval.metrics.precision_at_1`.
        progress: show a progress bar.
        desc: progress-bar label.
        scoring: ``"single"`` (pooled cosine), ``"maxsim"`` or ``"hybrid"``
            (:mod:`fam.eval.late`; the encoder then needs ``encode_multi_all``).
        rerank_k: candidates ``hybrid`` reranks with MaxSim.

    Returns:
        ``(credits, n_encoded)``: (R,) float64 per-row precision@1 credit in [0, 1], and
        the number of distinct items encoded.
    """
    # Deduplicate by value: MMItem is frozen and compares (text, image, content). The
    # loader interns repeated items, so an id() lookup first skips most of the (slow)
    # dataclass hashing of ~1M candidate references per real MMEB dataset.
    index: dict[MMItem, int] = {}
    by_id: dict[int, int] = {}

    def slot(item: MMItem) -> int:
        k = by_id.get(id(item))
        if k is None:
            k = index.setdefault(item, len(index))
            by_id[id(item)] = k  # rows keep the item alive, so its id stays unique
        return k

    q_of = [slot(row.query) for row in rows]
    c_of = [[slot(c) for c in row.candidates] for row in rows]
    if scoring == "single":
        emb = _encode_unique(encoder, list(index), batch_size, progress, desc)

        def score(q_idx: torch.Tensor, c_idx: torch.Tensor) -> torch.Tensor:
            return _score_rows(emb, q_idx, c_idx, ties)
    else:
        from fam.eval.late import encode_both, row_scores
        pooled, tokens = encode_both(encoder, list(index), batch_size, progress, desc)
        sim = getattr(encoder, "similarity", "maxsim")

        def score(q_idx: torch.Tensor, c_idx: torch.Tensor) -> torch.Tensor:
            return precision_at_1(row_scores(pooled, tokens, q_idx, c_idx, scoring, rerank_k,
                                             sim), 0, ties)

    credits = torch.zeros(len(rows), dtype=torch.float64)
    by_count: dict[int, list[int]] = {}
    for i, cands in enumerate(c_of):
        by_count.setdefault(len(cands), []).append(i)
    for _, members in sorted(by_count.items()):
        q_idx = torch.tensor([q_of[i] for i in members], dtype=torch.long)
        c_idx = torch.tensor([c_of[i] for i in members], dtype=torch.long)
        try:
            credits[members] = score(q_idx, c_idx)
        except ValueError as e:
            row = rows[members[0]]
            raise ValueError(f"dataset {row.dataset} ({row.source}): {e}") from None
    return credits, len(index)


def evaluate(encoder: Encoder, data_dir: str | Path, image_root: str | Path | None = None,
             datasets: Iterable[str] | None = None, batch_size: int = 32,
             max_rows: int | None = None, progress: bool = True, ties: Ties = "expected",
             split: str | None = None, check_images: bool = True,
             per_row: bool = False, scoring: str = "single", rerank_k: int = 10
             ) -> dict[str, Any]:
    """Run the MMEB protocol on every (or the chosen) dataset under ``data_dir``.

    Datasets are loaded and scored one at a time, so memory holds one dataset's rows and
    embeddings. Dataset names are looked up in the metadata (built-in table +
    ``datasets.json``) before anything is encoded; a dataset that is in neither is still
    evaluated, reported under ``other_datasets`` (``meta_task``/``split`` null) and left
    out of every mean, with a warning that says so.

    Args:
        encoder: see :class:`Encoder`.
        data_dir: MMEB-eval folder (``<Dataset>.jsonl|parquet`` files or one folder per
            dataset), a single data file, or a benchmark root holding ``eval/``.
        image_root: folder image paths are relative to (default: ``data_dir``, or the
            folder of a data file, unless the rows' images are found under its
            ``eval_images/`` or ``images/``: :func:`fam.data.mmeb.layout.guess_image_root`).
        datasets: names to evaluate (default: all found, except the sets MMEB-eval's
            repository holds beside the benchmark, e.g. CIFAR-100, skipped with a warning
            unless ``datasets.json`` declares them).
        batch_size: items per ``encoder.encode`` call.
        max_rows: evaluate only the first ``max_rows`` rows of each dataset (quick runs).
        progress: show progress bars.
        ties: tie rule (``"expected"``: a k-way tie with the positive scores 1/k).
        split: split of multi-split dataset folders (default ``"test"``).
        check_images: check every referenced image before encoding (exists, opens within
            the decompression-bomb limit, file intact), so a bad file is reported with its
            data row rather than from inside the model.
        per_row: also keep each dataset's per-row credits (``credits``, in row order) for
            paired statistics between models evaluated on the same rows.
        scoring: ``"single"`` | ``"maxsim"`` | ``"hybrid"`` (:mod:`fam.eval.late`), recorded
            in ``settings`` when not ``"single"``.
        rerank_k: candidates ``"hybrid"`` reranks.

    Returns:
        The results dict described in this module's docstring.

    Raises:
        DataError: bad data, a dataset that is not there, a missing, corrupt or oversized
            image (names file, line, field), or non-finite embeddings.
    """
    check_ties(ties)
    from fam.eval.late import check_scoring
    check_scoring(scoring, encoder, rerank_k)
    data_dir = Path(data_dir)
    found = discover_datasets(data_dir, "eval", split)
    infos = load_dataset_infos(data_dir)
    if datasets is None:
        # MMEB-eval as published also holds sets outside the benchmark (e.g. CIFAR-100):
        # evaluated only when named, or declared in datasets.json.
        extras = [n for n in found if n in MMEB_EVAL_EXTRAS and n not in infos]
        if extras:
            logger.warning("skipping %s: in MMEB-eval's repository but not one of the 36 MMEB "
                           "datasets (name them with datasets= to evaluate them apart from the "
                           "means, or declare them in datasets.json)", ", ".join(extras))
        names = [n for n in found if n not in extras]
    else:
        names = list(datasets)
    if not names:
        raise ValueError("no dataset selected (datasets=[])")
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"dataset(s) {missing} not found; available: {sorted(found)}", data_dir)
    if image_root is None:
        image_root = guess_image_root(data_dir, found[names[0]], ("qry_img_path", "tgt_img_path"),
                                      data_dir if data_dir.is_dir() else data_dir.parent)
    meta = {n: find_info(n, infos) for n in names}
    other = [n for n in names if meta[n] is None]
    if other:
        target = find_datasets_json(data_dir) or "datasets.json beside the data"
        logger.warning("%s: not MMEB dataset(s) (not among the 36 nor declared in %s): "
                       "evaluated and reported under 'Other datasets', left out of the "
                       "meta-task, IND, OOD and overall means; declare them in %s "
                       "({name: {meta_task, split}}) to include them", ", ".join(other),
                       target, target)

    per_dataset: dict[str, dict[str, Any]] = {}
    for name in tqdm(names, desc="MMEB", unit="dataset", disable=not progress):
        rows = read_eval_rows(name, found[name], image_root, max_rows)
        if not rows:
            raise DataError("dataset has no rows", found[name][0])
        if check_images:
            # The backbone's image limits too (the input contract), so no dataset dies mid-way.
            adapter = getattr(encoder, "adapter", None) or \
                getattr(getattr(encoder, "model", None), "adapter", None)
            rules = getattr(adapter, "input_rules", None)
            validate_images(rows, mode="verify", progress=progress,
                            rules=rules.images if rules is not None else None)
        credits, n_encoded = evaluate_rows(encoder, rows, batch_size, ties, progress, name,
                                           scoring, rerank_k)
        counts = [len(r.candidates) for r in rows]
        info = meta[name]
        chance = info.chance if info is not None and info.chance is not None else \
            sum(1.0 / c for c in counts) / len(counts)
        n_cand: float = counts[0] if len(set(counts)) == 1 else sum(counts) / len(counts)
        per_dataset[name] = {
            PRIMARY_METRIC: 100.0 * credits.mean().item(),
            "n": len(rows),
            "n_correct": float(credits.sum().item()),
            "n_candidates": n_cand,
            "n_encoded": n_encoded,
            "meta_task": info.meta_task if info is not None else None,
            "split": info.split if info is not None else None,
            "chance": 100.0 * chance,
        }
        if per_row:
            per_dataset[name]["credits"] = [float(c) for c in credits.tolist()]
        logger.info("%s: precision@1 %.2f over %d rows (%d distinct items encoded)", name,
                    per_dataset[name][PRIMARY_METRIC], len(rows), n_encoded)

    known = {n: d for n, d in per_dataset.items() if n not in other}
    summary = aggregate({n: d[PRIMARY_METRIC] for n, d in known.items()}, infos,
                        chance={n: d["chance"] for n, d in known.items()})
    results: dict[str, Any] = {"metric": PRIMARY_METRIC, "ties": ties, "datasets": per_dataset}
    results.update(summary)
    results["other_datasets"] = other  # evaluated, not in any mean (not MMEB datasets)
    results["settings"] = {"data_dir": str(data_dir), "image_root": str(image_root),
                           "max_rows": max_rows, "split": split}
    if scoring != "single":
        results["settings"].update(scoring=scoring, similarity=getattr(encoder, "similarity", None),
                                   **({"rerank_k": rerank_k} if scoring == "hybrid" else {}))
    backbone = getattr(getattr(encoder, "adapter", None), "settings", None)
    if backbone is not None and hasattr(backbone, "to_dict"):
        results["settings"]["backbone"] = backbone.to_dict()
    logger.info("MMEB overall %s (IND %s, OOD %s) over %d datasets", _pct(results["overall"]),
                _pct(results["IND"]), _pct(results["OOD"]), len(per_dataset))
    return results


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def save_results(results: dict[str, Any], path: str | Path) -> None:
    """Write results as JSON atomically (a crash never leaves a truncated file)."""
    atomic_write_json(path, results)


def save_score_files(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write VLM2Vec's per-dataset score files, ``<out_dir>/{Dataset}_score.json``.

    Each holds ``{"acc": fraction correct, "num_correct": ..., "num_pred": rows}`` like
    VLM2Vec's ``eval.py``; ``num_correct`` is an int when every row earned 0 or 1 (always
    with ties ``optimistic``/``pessimistic``), else the sum of fractional tie credits.

    Returns:
        The files written (atomically).
    """
    out: list[Path] = []
    for name, d in results.get("datasets", {}).items():
        n = int(d["n"])
        correct = float(d.get("n_correct", d[PRIMARY_METRIC] * n / 100.0))
        num_correct: int | float = int(round(correct)) if abs(correct - round(correct)) < 1e-9 \
            else correct
        path = Path(out_dir) / f"{name}_score.json"
        atomic_write_json(path, {"acc": correct / n if n else 0.0, "num_correct": num_correct,
                                 "num_pred": n})
        out.append(path)
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """Read results written by :func:`save_results`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
