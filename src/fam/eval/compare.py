"""The runs ``fam eval --compare`` reads: every results file fam writes, labelled by its run.

A results path may be

* ``fam eval``'s results JSON (``eval_results.json``, or any ``--out``): one run;
* the demo's ``results.json`` (``{"models": {name: results}}``): one run per model, or only
  ``PATH:NAME`` (e.g. ``runs/demo/results.json:fam``);
* ``ablation.json`` (one run per config and seed, ``PATH:NAME`` for one), an ablation run
  record (``<ablation>/seed<s>/results/<run>.json``, its ``results``) or a FAM run of the
  projector study (``<study>/fam/<arm>/result.json``, its ``mmeb``);
* a folder holding one of those (``results.json``, ``eval_results.json``,
  ``model/eval_results.json``), or a folder of VLM2Vec ``{Dataset}_score.json`` files
  (scored by argmax: ties ``optimistic``).

Columns are named by the run folder (``runs/demo/fam/model/eval_results.json`` is run
``fam``), with as many parent folders as it takes to tell the runs apart.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from fam.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["load_runs", "load_run", "run_labels"]

_STANDARD_NAMES = ("results", "eval_results", "result")


def _split_selector(path: str | Path) -> tuple[Path, str | None]:
    """``PATH:NAME`` (a model of a demo results file) when PATH exists and the whole does not."""
    text = str(path)
    if not Path(text).exists() and ":" in text:
        head, name = text.rsplit(":", 1)
        if Path(head).exists() and name:
            return Path(head), name
    return Path(text), None


def _score_folder(p: Path) -> dict[str, Any]:
    """Results from a folder of VLM2Vec ``{Dataset}_score.json`` files."""
    from fam.data.mmeb import dataset_info, load_dataset_infos
    from fam.data.mmeb.datasets import MMEB_EVAL_EXTRAS
    from fam.eval.metrics import aggregate
    from fam.eval.mmeb import PRIMARY_METRIC
    infos = load_dataset_infos(p)
    per: dict[str, float] = {}
    datasets: dict[str, dict[str, Any]] = {}
    for f in sorted(p.glob("*_score.json")):
        name = f.name[:-len("_score.json")]
        if name in MMEB_EVAL_EXTRAS and name not in infos:
            log.warning("%s: %s is not one of the 36 MMEB datasets; left out", f, name)
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            acc, n = float(d["acc"]), int(d["num_pred"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a VLM2Vec score file ({e}); expected {{acc, num_correct, "
                            "num_pred}", f) from None
        info = dataset_info(name, p, infos=infos)
        per[name] = 100.0 * acc
        datasets[name] = {PRIMARY_METRIC: 100.0 * acc, "n": n, "meta_task": info.meta_task,
                          "split": info.split, "chance": None}
    res: dict[str, Any] = {"metric": PRIMARY_METRIC, "ties": "optimistic", "datasets": datasets}
    res.update(aggregate(per, infos))
    return res


def _file_runs(p: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """The MMEB results in one results file: ``[(model name or None, results)]``."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", p, e.lineno) from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file; expected a results JSON", p) from None
    if isinstance(obj, dict):
        if isinstance(obj.get("datasets"), dict):  # fam eval
            return [(None, obj)]
        models = obj.get("models")
        if isinstance(models, dict) and models and all(
                isinstance(r, dict) and "datasets" in r for r in models.values()):
            return list(models.items())  # the demo: one run per model
        recs = obj.get("runs")
        if isinstance(recs, list) and recs and all(
                isinstance(r, dict) and isinstance(r.get("results"), dict) and "key" in r
                for r in recs):  # ablation.json: every run of every seed
            seeds = {r.get("seed") for r in recs}
            return [(str(r["key"]) + (f"/seed{r.get('seed')}" if len(seeds) > 1 else ""),
                     r["results"]) for r in recs]
        for key in ("results", "mmeb"):  # an ablation run record, a projector-study FAM run
            if isinstance(obj.get(key), dict) and "datasets" in obj[key]:
                return [(None, obj[key])]
    found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"not a fam results file: expected MMEB results ('datasets'), the demo's "
                    f"results.json ('models'), ablation.json ('runs'), or an ablation or "
                    f"projector-study run record ('results' / 'mmeb'); found {found}", p)


def load_runs(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """Every run a results path holds: ``[(model name or None, results)]`` (see the module
    docstring for the paths understood).

    Raises:
        DataError: nothing readable there, or an unknown model name (names the path and
            what was expected).
    """
    p, name = _split_selector(path)
    if p.is_dir():
        for rel in ("results.json", "eval_results.json", "model/eval_results.json"):
            if (p / rel).is_file():
                runs = _file_runs(p / rel)
                break
        else:
            if not any(p.glob("*_score.json")):
                raise DataError("no results.json, eval_results.json, model/eval_results.json "
                                "or {Dataset}_score.json files here", p)
            runs = [(None, _score_folder(p))]
    elif p.is_file():
        runs = _file_runs(p)
    else:
        raise DataError("no such results file or folder", p)
    if name is not None:
        names = [n for n, _ in runs if n is not None]
        if name not in names:
            raise DataError(f"no model {name!r} in this results file"
                            + (f"; it holds {names}" if names else " (it holds one run)"), p)
        runs = [(n, r) for n, r in runs if n == name]
    return runs


def load_run(path: str | Path) -> dict[str, Any]:
    """The one run of a results path (a demo file: ``PATH:NAME`` picks its model)."""
    runs = load_runs(path)
    if len(runs) != 1:
        raise DataError(f"holds {len(runs)} runs ({[n for n, _ in runs]}); pick one with "
                        "PATH:NAME", _split_selector(path)[0])
    return runs[0][1]


def _run_parts(path: str | Path) -> tuple[str, ...]:
    """Path components naming a results path's run: its folder (a model folder ``model``
    stands for its run folder), then the file's stem if it says more than 'results'."""
    p = _split_selector(path)[0].resolve()
    folder = p if p.is_dir() else p.parent
    if folder.name == "model":
        folder = folder.parent
    parts = tuple(x for x in folder.parts if x not in ("/", ""))
    if p.is_file() and p.stem not in _STANDARD_NAMES:
        parts += (p.stem,)
    return parts or (str(p),)


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Column names for results paths: the shortest tails of their run folders that differ
    (a model picked with ``PATH:NAME`` is named ``label:NAME`` by the caller; identical
    paths get ``A:``, ``B:``, ... in front)."""
    parts = [_run_parts(p) for p in paths]
    picked = [_split_selector(p)[1] for p in paths]  # PATH:NAME is told apart by NAME too
    longest = max(len(x) for x in parts)
    for depth in range(1, longest + 1):
        labels = ["/".join(x[-depth:]) for x in parts]
        if len(set(zip(labels, picked))) == len(labels):
            return labels
    return [f"{chr(ord('A') + i)}:{lab}" for i, lab in enumerate(labels)]
