"""One ranking per query, every metric (MMEB-V2's video and visual-document scoring).

A query is scored from two things: its **ranking** (candidate ids, best first: its own
candidates for a *local* task, the pooled corpus for a *global* one) and its **relevance**
(``{candidate id: grade > 0}``; binary tasks use grade 1). Every metric below is a pure
function of those two, at the cut-offs ``1, 5, 10``, under VLM2Vec-V2's field names
(``hit@1``, ``ndcg_linear@5``, ``ndcg_exponential@10``, ``precision@k``, ``recall@k``,
``f1@k``, ``map@k``, ``mrr@k``) so a ``{Dataset}_score.json`` reads like VLM2Vec's.

Definitions (``rel_i`` = grade of the item at rank ``i``, 0 when not relevant; ``R`` = the
relevant set):

- ``hit@k`` = 1 if any relevant item is in the top k; ``mrr@k`` = 1/rank of the first one
  within the top k (0 if none);
- ``precision@k`` = |top k ∩ R| / k; ``recall@k`` = |top k ∩ R| / |R|; ``f1@k`` their
  harmonic mean (0 when both are 0);
- ``map@k`` = Σ over relevant ranks i ≤ k of precision@i, divided by ``min(|R|, k)`` (the
  convention of VLM2Vec and of ml_metrics' ``apk``: a perfect top k scores 1 even when
  ``|R| > k``; trec_eval's ``map_cut_k`` divides by ``|R|`` instead);
- ``ndcg_linear@k`` = DCG/IDCG with gain ``rel`` and discount ``log2(i + 1)`` (rank i from 1),
  IDCG from all relevant grades sorted descending, truncated to k;
  ``ndcg_exponential@k`` the same with gain ``2**rel - 1``.

Where fam differs from VLM2Vec's scorer (``src/eval_utils/metrics.py``): VLM2Vec first
de-duplicates a row's labels with ``list(set(labels))`` and then zips them with the
relevance scores in their *original* order, so with graded qrels a label can receive another
label's grade (and which one depends on Python's hash seed). fam keeps each label with its
own grade (:func:`relevance_of`): identical duplicates collapse, a label listed twice with
two grades is an error. Ties between scores are broken *against* relevant items (a
constant scorer earns the worst ranking, never the best), where VLM2Vec's ``argsort`` keeps
the corpus order.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["K_LIST", "METRICS", "relevance_of", "rank_ids", "query_metrics",
           "score_rankings", "write_score_json"]

#: Cut-offs every metric is reported at.
K_LIST: tuple[int, ...] = (1, 5, 10)
#: Metric names, in the order of VLM2Vec's score files.
METRICS: tuple[str, ...] = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall",
                            "f1", "map", "mrr")


def relevance_of(labels: str | Sequence[str], rel_scores: Sequence[float] | None = None
                 ) -> dict[str, float]:
    """``{label: grade}`` for one query, each label keeping its own grade.

    Args:
        labels: one relevant id or a list of them (order irrelevant).
        rel_scores: the grade of each label, same length; ``None`` = binary (all 1).

    Raises:
        ValueError: lengths differ, a grade is not > 0, or a label is listed twice with
            two different grades.
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    grades = [1.0] * len(labels) if rel_scores is None else [float(s) for s in rel_scores]
    if len(grades) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(grades)} relevance scores")
    out: dict[str, float] = {}
    for label, grade in zip(labels, grades):
        if not grade > 0 or math.isinf(grade):
            raise ValueError(f"relevance of {label!r} must be a finite number > 0, got {grade}")
        if label in out and out[label] != grade:
            raise ValueError(f"label {label!r} is listed twice with grades {out[label]} and "
                             f"{grade}")
        out[label] = grade
    if not out:
        raise ValueError("a query needs at least one relevant label")
    return out


def rank_ids(scores: torch.Tensor, ids: Sequence[str],
             relevance: Sequence[Mapping[str, float]], top: int = max(K_LIST)
             ) -> list[list[str]]:
    """The top ``top`` ids per query, best score first, ties broken against relevance.

    Args:
        scores: (Q, N) similarity of each query to each of the N candidates.
        ids: the N candidate ids (column order).
        relevance: per query its ``{id: grade}``; among equal scores a less relevant id is
            ranked first (the pessimistic rule), so ties never flatter the model.
        top: how many ids to keep per query (the largest cut-off is enough for every metric).

    Raises:
        ValueError: shape mismatch or NaN scores.
    """
    if scores.ndim != 2 or scores.shape[1] != len(ids) or scores.shape[0] != len(relevance):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(relevance)} queries "
                         f"x {len(ids)} candidates")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the encoder produced invalid embeddings")
    column = {c: j for j, c in enumerate(ids)}
    grade = torch.zeros(scores.shape, dtype=torch.float64)
    for q, rel in enumerate(relevance):
        for label, g in rel.items():
            if label in column:
                grade[q, column[label]] = g
    # Stable two-key sort: grade ascending first, then score descending keeps that order
    # among equal scores.
    by_grade = torch.argsort(grade, dim=1, stable=True)
    s = scores.double().gather(1, by_grade)
    order = by_grade.gather(1, torch.argsort(-s, dim=1, stable=True))
    top = min(top, len(ids))
    return [[ids[j] for j in row] for row in order[:, :top].tolist()]


def _dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def query_metrics(ranking: Sequence[str], relevance: Mapping[str, float],
                  ks: Sequence[int] = K_LIST) -> dict[str, float]:
    """Every metric of one query at every cut-off (names as in :data:`METRICS`)."""
    if not relevance:
        raise ValueError("a query needs at least one relevant label")
    n_rel = len(relevance)
    grades = [float(relevance.get(c, 0.0)) for c in ranking]
    ideal = sorted(relevance.values(), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = grades[:k]
        hits = sum(1 for g in top if g > 0)
        first = next((i for i, g in enumerate(top) if g > 0), None)
        precision, recall = hits / k, hits / n_rel
        ap = 0.0
        seen = 0
        for i, g in enumerate(top):
            if g > 0:
                seen += 1
                ap += seen / (i + 1)
        out[f"hit@{k}"] = float(hits > 0)
        out[f"ndcg_linear@{k}"] = _dcg(top) / _dcg(ideal[:k])
        out[f"ndcg_exponential@{k}"] = (_dcg(2.0 ** g - 1 for g in top)
                                        / _dcg(2.0 ** g - 1 for g in ideal[:k]))
        out[f"precision@{k}"] = precision
        out[f"recall@{k}"] = recall
        out[f"f1@{k}"] = (2 * precision * recall / (precision + recall)
                          if precision + recall else 0.0)
        out[f"map@{k}"] = ap / min(n_rel, k)
        out[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
    return out


def score_rankings(rankings: Sequence[Sequence[str]],
                   relevance: Sequence[Mapping[str, float]],
                   ks: Sequence[int] = K_LIST) -> dict[str, float | int]:
    """Dataset scores: the mean of each metric over queries (fractions in [0, 1], as in
    VLM2Vec's score files), plus ``num_pred`` and ``num_data``."""
    if len(rankings) != len(relevance):
        raise ValueError(f"{len(rankings)} rankings but {len(relevance)} relevance labels")
    if not rankings:
        raise ValueError("no queries to score")
    per_query = [query_metrics(r, rel, ks) for r, rel in zip(rankings, relevance)]
    out: dict[str, float | int] = {}
    for metric in METRICS:
        for k in ks:
            key = f"{metric}@{k}"
            out[key] = sum(m[key] for m in per_query) / len(per_query)
    out["num_pred"] = len(rankings)
    out["num_data"] = len(relevance)
    return out


def write_score_json(path: str | Path, scores: Mapping[str, float | int]) -> Path:
    """Write ``scores`` as ``{Dataset}_score.json`` (sorted keys, 2-space indent)."""
    from fam.utils.io import atomic_write_text
    path = Path(path)
    atomic_write_text(path, json.dumps(dict(scores), indent=2, sort_keys=True) + "\n")
    return path
