"""Ranking metrics and MMEB aggregation (method.md §6).

MMEB scores each query against its candidate list and counts a hit when the positive is
ranked first (precision@1). A naive ``argmax`` returns the FIRST maximal index, and the
positive is always listed first in MMEB data, so a model that gives every candidate the
same score (e.g. a collapsed encoder) would score 100%. Three tie rules (:data:`TIE_RULES`):

- ``"expected"`` (default): a k-way tie at the top that includes the positive earns 1/k, the
  expected precision@1 under uniformly random tie breaking, so a constant scorer gets
  exactly the chance level;
- ``"optimistic"``: the positive wins every tie. With the positive listed first this is
  exactly ``np.argmax``, what VLM2Vec's ``eval.py`` and the MMEB leaderboard score with;
- ``"pessimistic"``: the positive loses every tie.

All reported numbers are percentages (0-100); datasets are averaged with equal weight
within a meta-task, IND, OOD and overall, as MMEB reports.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal, Mapping, Sequence

import torch

from fam.data.mmeb import META_TASKS, MMEB_DATASETS, DatasetInfo, dataset_info

logger = logging.getLogger(__name__)

__all__ = ["precision_at_1", "recall_at_k", "aggregate", "format_table", "META_TASK_NAMES",
           "TIE_RULES", "check_ties"]

Ties = Literal["expected", "optimistic", "pessimistic"]
#: The tie rules, with what each means (shown in tables).
TIE_RULES: dict[str, str] = {
    "expected": "a k-way tie with the positive earns 1/k",
    "optimistic": "ties go to the positive: argmax, as VLM2Vec and the MMEB leaderboard",
    "pessimistic": "ties go against the positive",
}


def check_ties(ties: str) -> str:
    """``ties`` if it names a tie rule, else a ``ValueError`` listing them."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {list(TIE_RULES)}, got {ties!r}")
    return ties

#: Display names of the meta-tasks.
META_TASK_NAMES = {"classification": "Classification", "vqa": "VQA",
                   "retrieval": "Retrieval", "grounding": "Grounding"}


def _positive_rank_counts(scores: torch.Tensor, positive_index: int | torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: how many candidates score strictly above the positive, and how many
    score exactly the same as it (the positive included).

    Args:
        scores: (Q, C) similarity of each query to each of its candidates.
        positive_index: column of the positive, an int or a (Q,) integer tensor.

    Returns:
        ``(greater, equal)``, both (Q,) int64; ``equal >= 1``.
    """
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must have shape (Q, C) with C >= 1, got {tuple(scores.shape)}")
    nan_rows = torch.isnan(scores).any(dim=1).nonzero().flatten()
    if len(nan_rows):
        shown = nan_rows[:10].tolist()
        raise ValueError(f"scores contain NaN in {len(nan_rows)} row(s) (first: {shown}); the "
                         "encoder produced invalid embeddings (check for zero vectors, "
                         "overflow in fp16, or a diverged checkpoint)")
    q, c = scores.shape
    idx = torch.as_tensor(positive_index, device=scores.device, dtype=torch.long)
    idx = idx.expand(q) if idx.ndim == 0 else idx
    if idx.shape != (q,):
        raise ValueError(f"positive_index must be an int or shape ({q},), got {tuple(idx.shape)}")
    if q and (idx.min() < 0 or idx.max() >= c):
        raise ValueError(f"positive_index out of range for {c} candidates")
    pos = scores.gather(1, idx[:, None])  # (Q, 1)
    greater = (scores > pos).sum(dim=1)
    equal = (scores == pos).sum(dim=1)
    return greater, equal


def recall_at_k(scores: torch.Tensor, k: int = 1, positive_index: int | torch.Tensor = 0,
                ties: Ties = "expected") -> torch.Tensor:
    """Per-query hit credit for "the positive is among the top ``k``", tie-aware.

    With ``g`` candidates strictly above the positive and ``e`` tied with it (itself
    included), a random tie break puts the positive uniformly at ranks ``g+1 .. g+e``,
    so the expected credit is ``clamp((k - g) / e, 0, 1)``. ``"optimistic"`` ranks the
    positive first among its ties: credit ``1`` iff ``g < k`` (for ``k = 1`` and the positive
    in column 0, ``argmax == 0``). ``"pessimistic"`` ranks it last: credit ``1`` iff
    ``g + e <= k``.

    Args:
        scores: (Q, C) query-candidate similarities.
        k: cut-off rank, ``>= 1``.
        positive_index: column of the positive (MMEB: 0), an int or a (Q,) tensor.
        ties: ``"expected"`` (default), ``"optimistic"`` or ``"pessimistic"``.

    Returns:
        (Q,) float64 credits in [0, 1].

    Raises:
        ValueError: NaN scores, bad shapes or an unknown ``ties`` mode.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_ties(ties)
    greater, equal = _positive_rank_counts(scores, positive_index)
    greater, equal = greater.double(), equal.double()
    if ties == "expected":
        return ((k - greater) / equal).clamp(0.0, 1.0)
    if ties == "optimistic":
        return (greater < k).double()
    return (greater + equal <= k).double()


def precision_at_1(scores: torch.Tensor, positive_index: int | torch.Tensor = 0,
                   ties: Ties = "expected") -> torch.Tensor:
    """MMEB precision@1 per query, ties never favouring the positive.

    Example::

        >>> precision_at_1(torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.8]]))
        tensor([0.5000, 0.0000], dtype=torch.float64)

    Args:
        scores: (Q, C) similarities; ``scores[q, positive_index]`` is the positive's.
        positive_index: column of the positive (MMEB: 0), an int or a (Q,) tensor.
        ties: ``"expected"``: a k-way tie at the top that includes the positive earns
            1/k (expected value under random tie breaking). ``"optimistic"``: earns 1
            (``np.argmax`` with the positive first, VLM2Vec's rule). ``"pessimistic"``: earns 0.

    Returns:
        (Q,) float64 credits in [0, 1]; the dataset score is their mean.

    Raises:
        ValueError: any NaN score (names the rows), bad shapes or ``ties`` mode.
    """
    return recall_at_k(scores, 1, positive_index, ties)


# --------------------------------------------------------------------------- aggregation

def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))  # type: ignore[arg-type]


def aggregate(per_dataset: Mapping[str, float], infos: Mapping[str, DatasetInfo] | None = None,
              chance: Mapping[str, float] | None = None) -> dict[str, Any]:
    """MMEB summary: equal-weight means over datasets per meta-task, IND, OOD and overall.

    Args:
        per_dataset: ``{dataset: score}`` (percent).
        infos: dataset metadata (default: the built-in MMEB table). Unknown names raise.
        chance: ``{dataset: chance level}`` in percent; defaults to ``100 * info.chance``.
            The chance block is aggregated exactly like the scores; a group whose datasets
            lack a chance level gets ``None``.

    Returns:
        ``{"meta_task": {task: mean | None}, "IND": mean | None, "OOD": ..., "overall": ...,
        "n_datasets": {task/IND/OOD/overall: count}, "chance": {"meta_task": {...},
        "IND": ..., "OOD": ..., "overall": ...}}``; a group with no dataset is ``None``.
    """
    infos = MMEB_DATASETS if infos is None else infos
    info = {name: dataset_info(name, infos=infos) for name in per_dataset}
    chance_of: dict[str, float | None] = {}
    for name, inf in info.items():
        if chance is not None and name in chance:
            chance_of[name] = float(chance[name])
        else:
            chance_of[name] = 100.0 * inf.chance if inf.chance is not None else None

    groups: dict[str, list[str]] = {t: [] for t in META_TASKS}
    groups.update(IND=[], OOD=[], overall=[])
    for name, inf in info.items():
        groups[inf.meta_task].append(name)
        groups[inf.split].append(name)
        groups["overall"].append(name)

    def summarize(values: Mapping[str, float | None]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "meta_task": {t: _mean([values[n] for n in groups[t]]) for t in META_TASKS}}
        for g in ("IND", "OOD", "overall"):
            out[g] = _mean([values[n] for n in groups[g]])
        return out

    result = summarize({n: float(v) for n, v in per_dataset.items()})
    result["n_datasets"] = {g: len(names) for g, names in groups.items()}
    result["chance"] = summarize(chance_of)
    return result


# --------------------------------------------------------------------------- table

def _as_runs(results: Any) -> list[tuple[str, dict]]:
    if isinstance(results, dict) and "datasets" in results:
        return [("model", results)]
    if isinstance(results, dict):
        return list(results.items())
    return [(str(name), res) for name, res in results]


def _fmt(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def format_table(results: Any, per_dataset: bool = False, digits: int = 1) -> str:
    """A fixed-width text table of MMEB results, one column per model.

    Rows: the four meta-tasks, IND, OOD and Overall (with ``per_dataset``, each meta-task
    row is preceded by its datasets). Columns: the number of datasets, one per model, the
    chance level and, for exactly two models, their difference (second minus first). The
    header's first cell states the tie rule the scores were computed with (``ties=...``;
    ``ties=mixed`` and a warning when the models were scored with different rules).

    Args:
        results: one results dict from :func:`fam.eval.mmeb.evaluate`, a ``{model name:
            results}`` dict, or a list of ``(model name, results)``.
        per_dataset: also list every dataset.
        digits: decimals shown.

    Returns:
        The table as a string (no trailing newline).
    """
    runs = _as_runs(results)
    if not runs:
        raise ValueError("no results to format")
    sets = [set(r.get("datasets", {})) for _, r in runs]
    if any(s != sets[0] for s in sets[1:]):
        logger.warning("the models were evaluated on different datasets; their means are not "
                       "directly comparable")
    first = runs[0][1]
    diff = len(runs) == 2
    rules = {r.get("ties", "unknown") for _, r in runs}
    if len(rules) > 1:
        logger.warning("the models were scored with different tie rules (%s); their numbers "
                       "are not directly comparable", ", ".join(
                           f"{name}: {r.get('ties', 'unknown')}" for name, r in runs))
    tie_cell = f"ties={rules.pop()}" if len(rules) == 1 else "ties=mixed"
    header = [tie_cell, "n"] + [name for name, _ in runs] + ["chance"] + (["diff"] if diff else [])
    body: list[list[str] | None] = []  # None = separator line

    def add(label: str, n: int | str, values: list[float | None], chance: float | None):
        row = [label, str(n)] + [_fmt(v, digits) for v in values] + [_fmt(chance, digits)]
        if diff:
            a, b = values
            row.append(_fmt(None if a is None or b is None else b - a, digits, signed=True))
        body.append(row)

    all_ds: dict[str, dict] = {}
    for _, r in runs:
        for name, d in r.get("datasets", {}).items():
            all_ds.setdefault(name, d)
    order = {name: i for i, name in enumerate(MMEB_DATASETS)}
    for task in META_TASKS:
        if per_dataset:
            names = sorted((n for n, d in all_ds.items() if d.get("meta_task") == task),
                           key=lambda n: (order.get(n, len(order)), n))
            for n in names:
                add("  " + n, "", [r.get("datasets", {}).get(n, {}).get("precision@1")
                                   for _, r in runs], all_ds[n].get("chance"))
        add(META_TASK_NAMES[task], first.get("n_datasets", {}).get(task, ""),
            [r.get("meta_task", {}).get(task) for _, r in runs],
            first.get("chance", {}).get("meta_task", {}).get(task))
    body.append(None)
    for key, label in (("IND", "IND"), ("OOD", "OOD"), ("overall", "Overall")):
        add(label, first.get("n_datasets", {}).get(key, ""), [r.get(key) for _, r in runs],
            first.get("chance", {}).get(key))

    widths = [max(len(row[i]) for row in [header] + [b for b in body if b is not None])
              for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(["x" * w for w in widths]))
    out = [line(header), rule]
    out += [rule if b is None else line(b) for b in body]
    return "\n".join(out)
