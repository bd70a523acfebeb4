"""Metadata of the MMEB data sets (meta-task, IND/OOD): the table and ``datasets.json``."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fam.errors import DataError

logger = logging.getLogger(__name__)


#: Meta-tasks in the order MMEB reports them.
META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")


SPLITS: tuple[str, ...] = ("IND", "OOD")


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one evaluation dataset.

    Attributes:
        name: dataset name as in the data (e.g. ``"ImageNet-1K"``).
        meta_task: one of :data:`META_TASKS`.
        split: ``"IND"`` (its training set is in MMEB-train) or ``"OOD"``.
        n_candidates: nominal candidates per query, or ``None`` if unknown.
        chance: expected precision@1 of a random ranking, as a fraction in (0, 1]; ``None``
            means "compute it from the data" (mean over rows of 1 / #candidates), which is
            exact for the rows evaluated.
        extra: any other keys given in ``datasets.json``.
    """

    name: str
    meta_task: str
    split: str
    n_candidates: int | None = None
    chance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _table() -> dict[str, DatasetInfo]:
    # MMEB (VLM2Vec paper, Table 1): 36 datasets, 20 IND (also in MMEB-train) + 16 OOD.
    # Candidate counts are nominal (classification: number of classes; others 1000); the
    # chance level is left to be computed from the rows actually evaluated.
    groups: list[tuple[str, str, dict[str, int | None]]] = [
        ("classification", "IND", {"ImageNet-1K": 1000, "N24News": 24, "HatefulMemes": 2,
                                   "VOC2007": 20, "SUN397": 397}),
        ("classification", "OOD", {"Place365": 365, "ImageNet-A": 1000, "ImageNet-R": 200,
                                   "ObjectNet": 313, "Country211": 211}),
        ("vqa", "IND", dict.fromkeys(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
                                      "ChartQA", "Visual7W"], 1000)),
        ("vqa", "OOD", dict.fromkeys(["ScienceQA", "VizWiz", "GQA", "TextVQA"], 1000)),
        ("retrieval", "IND", dict.fromkeys(["VisDial", "CIRR", "VisualNews_t2i",
                                            "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                                            "NIGHTS", "WebQA"], 1000)),
        ("retrieval", "OOD", dict.fromkeys(["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"], 1000)),
        ("grounding", "IND", {"MSCOCO": 1000}),
        ("grounding", "OOD", dict.fromkeys(["Visual7W-Pointing", "RefCOCO",
                                            "RefCOCO-Matching"], 1000)),
    ]
    return {name: DatasetInfo(name, mt, sp, n)
            for mt, sp, names in groups for name, n in names.items()}


#: The 36 MMEB evaluation datasets (name -> info). Extend via ``datasets.json``.
MMEB_DATASETS: dict[str, DatasetInfo] = _table()


#: Sets that the published MMEB-eval repository holds beside the 36 of the benchmark; an
#: evaluation of "every dataset found" skips them (name them to evaluate them).
MMEB_EVAL_EXTRAS: frozenset[str] = frozenset({"CIFAR-100"})

# MMEB-train spells one subset differently from its eval counterpart.
_ALIASES = {"ImageNet_1K": "ImageNet-1K"}


def find_datasets_json(data_dir: str | Path | None) -> Path | None:
    """``datasets.json`` in ``data_dir`` (or the folder of a data file), else its parent.

    The parent is searched so that both a benchmark root and its ``eval/`` folder work.
    """
    if data_dir is None:
        return None
    d = Path(data_dir)
    if d.is_file():
        d = d.parent
    for cand in (d / "datasets.json", d.parent / "datasets.json"):
        if cand.is_file():
            return cand
    return None


def load_dataset_infos(data_dir: str | Path | None = None) -> dict[str, DatasetInfo]:
    """The built-in table, extended/overridden by ``datasets.json`` (:func:`find_datasets_json`).

    ``datasets.json`` maps a name to ``{"meta_task", "split", "n_candidates", "chance",
    ...}``. For a name in the table any subset of keys overrides it; a new name needs
    ``meta_task`` and ``split``. ``chance`` is a fraction in (0, 1]; if absent it is
    ``1 / n_candidates`` when that is given, else computed from the data.

    Raises:
        DataError: malformed ``datasets.json`` (names the file and the dataset/key).
    """
    infos = dict(MMEB_DATASETS)
    path = find_datasets_json(data_dir)
    if path is None:
        return infos
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", path, e.lineno) from None
    if not isinstance(raw, dict):
        raise DataError("expected an object {dataset name: {meta_task, split, ...}}", path)
    for name, spec in raw.items():
        infos[name] = _parse_info(name, spec, infos.get(name), path)
    logger.debug("dataset metadata: %d entries from %s", len(raw), path)
    return infos


def _parse_info(name: str, spec: Any, base: DatasetInfo | None, path: Path) -> DatasetInfo:
    def bad(msg: str, key: str | None = None) -> DataError:
        return DataError(msg, path, None, f"{name}.{key}" if key else name)

    if not isinstance(spec, dict):
        raise bad("expected an object {meta_task, split, n_candidates, chance}")
    meta_task = spec.get("meta_task", base.meta_task if base else None)
    split = spec.get("split", base.split if base else None)
    if meta_task not in META_TASKS:
        raise bad(f"meta_task must be one of {list(META_TASKS)}, got {meta_task!r}", "meta_task")
    if split not in SPLITS:
        raise bad(f"split must be one of {list(SPLITS)}, got {split!r}", "split")
    n = spec.get("n_candidates", base.n_candidates if base else None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
        raise bad(f"n_candidates must be an integer >= 2, got {n!r}", "n_candidates")
    if "chance" in spec:
        chance = spec["chance"]
        if (not isinstance(chance, (int, float)) or isinstance(chance, bool)
                or not 0 < chance <= 1):
            raise bad(f"chance is a probability in (0, 1] (e.g. 1/n_candidates), got {chance!r};"
                      " a percentage must be divided by 100", "chance")
        chance = float(chance)
    elif "n_candidates" in spec:
        chance = 1.0 / n
    else:
        chance = base.chance if base else None
    known = {"meta_task", "split", "n_candidates", "chance"}
    extra = {k: v for k, v in spec.items() if k not in known}
    return DatasetInfo(name, meta_task, split, n, chance, extra)


def dataset_info(name: str, data_dir: str | Path | None = None,
                 infos: Mapping[str, DatasetInfo] | None = None) -> DatasetInfo:
    """Metadata of one dataset, from ``datasets.json`` near ``data_dir`` or the built-in table.

    Args:
        name: dataset name (MMEB-train spelling ``ImageNet_1K`` is accepted too).
        data_dir: where to look for ``datasets.json`` (ignored if ``infos`` is given).
        infos: a table already loaded by :func:`load_dataset_infos` (avoids re-reading).

    Raises:
        DataError: unknown dataset; the message says how to declare it.
    """
    if infos is None:
        infos = load_dataset_infos(data_dir)
    info = infos.get(name) or infos.get(_ALIASES.get(name, ""))
    if info is None:
        where = find_datasets_json(data_dir)
        target = str(where) if where else (
            f"{Path(data_dir) / 'datasets.json'}" if data_dir is not None else "datasets.json "
            "in the data folder")
        raise DataError(
            f"unknown dataset {name!r}: it is not one of the 36 MMEB datasets; add it to "
            f"{target} as {{\"{name}\": {{\"meta_task\": one of {list(META_TASKS)}, "
            f"\"split\": \"IND\" or \"OOD\", \"n_candidates\": int}}}}", data_dir)
    return info
