"""MMEB-format data: training pairs, evaluation rows and per-dataset metadata.

MMEB (Jiang et al., VLM2Vec, 2024) stores every task as rows of text + relative image
paths; SPEC §6 gives the fields. Two layouts are read, both for JSONL and parquet:

* **files**: ``<dir>/<Dataset>.jsonl`` or ``<dir>/<Dataset>.parquet`` (our built-in
  benchmark writes ``train/<Dataset>.jsonl`` and ``eval/<Dataset>.jsonl``);
* **folders** (the Hugging Face layout of ``TIGER-Lab/MMEB-train`` / ``MMEB-eval``):
  ``<dir>/<Dataset>/<split>-00000-of-00001.parquet``. A folder holding several splits
  (MMEB-train has ``original`` and ``diverse_instruction``) is read for one split only:
  ``original`` for training and ``test`` for evaluation, as VLM2Vec does, unless
  ``split=`` says otherwise.

Given a benchmark root that holds ``train/`` and ``eval/`` folders and no data files of
its own, the loaders descend into the matching folder.

Training rows: ``qry, qry_image_path, pos_text, pos_image_path`` (required) and
``neg_text, neg_image_path`` (optional; ``""``, null or missing = no hard negative).
Evaluation rows: ``qry_text, qry_img_path, tgt_text: list[str], tgt_img_path: list[str]``;
the FIRST candidate is the positive. An empty image path means "no image".

Every row is validated when it is loaded; a bad one raises :class:`~fam.errors.DataError`
naming the file, the line (1-based line for JSONL, row index + 1 for parquet) and the
field. Image paths are resolved under the image root (paths escaping it are refused) but
images are NOT opened here: rows keep paths, not pixels (real subsets have 100K rows).
Use :func:`validate_images` to check that every referenced image exists up front, and
:meth:`TrainPair.load_image` to open one with an error that still names its row.

Dataset metadata (meta-task, IND/OOD) for the 36 MMEB evaluation datasets is a table in
this module; a ``datasets.json`` next to the data extends or overrides it.
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from PIL import Image
from torch.utils.data import Dataset

from fam.data.images import load_image
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import DataError
from fam.utils.io import read_jsonl, resolve_under

logger = logging.getLogger(__name__)

__all__ = [
    "TrainPair", "EvalRow", "TrainPairDataset", "DatasetInfo", "MMEB_DATASETS", "META_TASKS",
    "load_train", "load_eval", "read_eval_rows", "discover_datasets", "validate_images",
    "dataset_info", "load_dataset_infos", "find_datasets_json", "collate_train_pairs",
]

#: Meta-tasks in the order MMEB reports them.
META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
SPLITS: tuple[str, ...] = ("IND", "OOD")

TRAIN_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_OPTIONAL = ("neg_text", "neg_image_path")
EVAL_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

#: (text field, image field) of each side of a training pair, for error messages.
TRAIN_FIELDS: dict[str, tuple[str, str]] = {
    "query": ("qry", "qry_image_path"),
    "pos": ("pos_text", "pos_image_path"),
    "neg": ("neg_text", "neg_image_path"),
}

_DATA_SUFFIXES = (".jsonl", ".parquet")
# Hugging Face shard names: "<split>-00000-of-00003.parquet".
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
_DEFAULT_SPLIT = {"train": "original", "eval": "test"}
_PARQUET_BATCH = 4096  # rows per pyarrow batch: bounds memory while reading 100K-row files


# --------------------------------------------------------------------------- records

@dataclass(slots=True)
class TrainPair:
    """One training row: a query, its positive and an optional hard negative.

    Attributes:
        query, pos, neg: the three sides; image paths are absolute (resolved under the
            image root) and not yet opened. ``neg`` is ``None`` when the row has none.
        dataset: subset name (file stem or folder name, e.g. ``"ImageNet_1K"``).
        source: the data file the row came from.
        line: 1-based JSONL line, or parquet row index + 1.
    """

    query: MMItem
    pos: MMItem
    neg: MMItem | None
    dataset: str
    source: str
    line: int

    def load_image(self, side: Literal["query", "pos", "neg"]) -> Image.Image | None:
        """Open the image of one side as RGB (``None`` if that side has no image).

        Raises:
            DataError: the image is missing or corrupt; the message names the image, the
                data file, line and image field of this row.
        """
        if side not in TRAIN_FIELDS:
            raise ValueError(f"side must be one of {tuple(TRAIN_FIELDS)}, got {side!r}")
        item = getattr(self, side)
        if item is None or item.image is None:
            return None
        return load_image(item.image, source=self.source, line=self.line,
                          field=TRAIN_FIELDS[side][1])


@dataclass(slots=True)
class EvalRow:
    """One evaluation row: a query ranked against candidates, ``candidates[0]`` positive.

    Attributes:
        query: the query item.
        candidates: C ≥ 2 items; the first one is the positive (MMEB convention).
        dataset: dataset name (e.g. ``"ImageNet-1K"``).
        source: the data file the row came from.
        line: 1-based JSONL line, or parquet row index + 1.
    """

    query: MMItem
    candidates: list[MMItem]
    dataset: str
    source: str
    line: int


class TrainPairDataset(Dataset):
    """A torch ``Dataset`` over :class:`TrainPair` records (paths only, no pixels).

    Images are opened later by the backbone adapter, through :meth:`TrainPair.load_image`
    (or :func:`fam.data.images.load_image` with the pair's ``source``/``line``), so that
    a corrupt image still names its row. Use :func:`collate_train_pairs` as the
    ``DataLoader``'s ``collate_fn``: the default collate cannot batch dataclasses.

    Args:
        pairs: the records, e.g. from :func:`load_train`.
    """

    def __init__(self, pairs: Sequence[TrainPair]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TrainPair:
        return self.pairs[index]

    @property
    def datasets(self) -> list[str]:
        """Subset names present, in first-seen order."""
        return list(dict.fromkeys(p.dataset for p in self.pairs))


def collate_train_pairs(batch: list[TrainPair]) -> list[TrainPair]:
    """``DataLoader`` collate function: keep the pairs as a list (the adapter tokenises)."""
    return list(batch)


# --------------------------------------------------------------------------- discovery

def _split_of(path: Path) -> str:
    m = _HF_SHARD.match(path.stem)
    return m.group("split") if m else path.stem


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in _DATA_SUFFIXES and not p.name.startswith("."))


def discover_datasets(path: str | Path, kind: Literal["train", "eval"],
                      split: str | None = None) -> dict[str, list[Path]]:
    """Find the datasets under ``path`` and the files that hold each one.

    Args:
        path: a single ``.jsonl``/``.parquet`` file, a folder of such files (one per
            dataset), a folder of per-dataset folders (Hugging Face layout), or a benchmark
            root with a ``train/`` or ``eval/`` folder.
        kind: ``"train"`` or ``"eval"``; picks the sub-folder of a benchmark root and the
            default split of multi-split folders (``original`` / ``test``).
        split: the split to read inside multi-split folders (default by ``kind``).

    Returns:
        ``{dataset name: [files]}`` in sorted name order; the files of one dataset are
        read in order and concatenated.

    Raises:
        DataError: nothing found, a name found twice, or an ambiguous multi-split folder.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix not in _DATA_SUFFIXES:
            raise DataError(f"unsupported data file type {path.suffix!r}; expected .jsonl or "
                            ".parquet", path)
        return {path.stem: [path]}
    if not path.is_dir():
        raise DataError(f"{kind} data not found: no such file or folder", path)
    if not _data_files(path) and (path / kind).is_dir():
        logger.info("reading %s data from %s", kind, path / kind)
        path = path / kind

    found: dict[str, list[Path]] = {}
    for f in _data_files(path):
        if f.stem in found:
            raise DataError(f"dataset {f.stem!r} is stored twice ({found[f.stem][0].name} and "
                            f"{f.name}); keep one", path)
        found[f.stem] = [f]
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _data_files(sub)
        if not files:
            continue
        if sub.name in found:
            raise DataError(f"dataset {sub.name!r} is stored both as a file and as a folder; "
                            "keep one", path)
        by_split: dict[str, list[Path]] = {}
        for f in files:
            by_split.setdefault(_split_of(f), []).append(f)
        if len(by_split) == 1:
            found[sub.name] = files
            continue
        want = split or _DEFAULT_SPLIT[kind]
        if want not in by_split:
            raise DataError(f"folder holds splits {sorted(by_split)} and none is {want!r}; pass "
                            "split= to choose one", sub)
        found[sub.name] = by_split[want]
    if not found:
        raise DataError(f"no {kind} data found: expected <Dataset>.jsonl / <Dataset>.parquet "
                        "files or one folder of parquet/jsonl files per dataset", path)
    return dict(sorted(found.items()))


def _iter_rows(path: Path, columns: Sequence[str], required: Sequence[str]
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, row)`` from a JSONL or parquet file.

    For parquet, ``line`` is the row index + 1 and only ``columns`` are read (the real
    files carry other columns we do not need); a missing required column is reported once.
    """
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    import pyarrow.parquet as pq  # heavy import, only needed for parquet data

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet file: {e}", path) from None
    names = set(pf.schema_arrow.names)
    for col in required:
        if col not in names:
            raise DataError(f"column missing (the file has {sorted(names)})", path, None, col)
    present = [c for c in columns if c in names]
    line = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=present):
        for row in batch.to_pylist():
            line += 1
            yield line, row


# --------------------------------------------------------------------------- row parsing

class _ItemFactory:
    """Builds validated :class:`MMItem` s, caching path resolution and identical items.

    Real MMEB rows repeat the same candidates (e.g. 1000 class labels in every
    ImageNet-1K row); interning them saves memory and makes later deduplication cheap.
    Each item records the file, line and field of the first row that used it
    (``MMItem.source/line/field``), so an adapter that fails to load its image can say
    where it came from.
    """

    def __init__(self, image_root: Path):
        self.image_root = image_root
        self._paths: dict[str, Path] = {}
        self._items: dict[tuple[str, str], MMItem] = {}
        self._sources: dict[Path, str] = {}

    def __call__(self, text: str, rel: str, source: Path, line: int, text_field: str,
                 image_field: str) -> MMItem:
        key = (text, rel)
        item = self._items.get(key)
        if item is not None:
            return item
        image = None
        if rel:
            image = self._paths.get(rel)
            if image is None:
                image = resolve_under(self.image_root, rel, source=source, line=line,
                                      field=image_field)
                self._paths[rel] = image
        elif IMAGE_PLACEHOLDER in text:
            raise DataError(f"the text contains {IMAGE_PLACEHOLDER} but '{image_field}' is "
                            "empty; give the image path or remove the placeholder",
                            source, line, text_field)
        if not text and image is None:
            raise DataError(f"empty item: both '{text_field}' and '{image_field}' are empty",
                            source, line, text_field)
        src = self._sources.setdefault(source, str(source))  # one string per file, shared
        item = MMItem(text=text, image=image, source=src, line=line,
                      field=image_field if image is not None else text_field)
        self._items[key] = item
        return item


def _text(row: dict, key: str, source: Path, line: int, *, required: bool = True) -> str:
    """A text field: must be a string ("" allowed); missing/None only if optional."""
    if key not in row:
        if required:
            raise DataError("field missing", source, line, key)
        return ""
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", source, line, key)
    return value


def _image_path(value: Any, source: Path, line: int, key: str) -> str:
    """An image-path value: a string, "" or None meaning no image."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected an image path string, got {type(value).__name__}",
                        source, line, key)
    return value


def _parse_train_row(row: dict, source: Path, line: int, dataset: str,
                     make: _ItemFactory) -> TrainPair:
    for key in TRAIN_REQUIRED:
        if key not in row:
            raise DataError("field missing", source, line, key)
    sides: dict[str, MMItem | None] = {}
    for side, (tkey, ikey) in TRAIN_FIELDS.items():
        optional = side == "neg"
        text = _text(row, tkey, source, line, required=not optional)
        rel = _image_path(row.get(ikey), source, line, ikey)
        if optional and not text and not rel:
            sides[side] = None
            continue
        sides[side] = make(text, rel, source, line, tkey, ikey)
    assert sides["query"] is not None and sides["pos"] is not None
    return TrainPair(query=sides["query"], pos=sides["pos"], neg=sides["neg"],
                     dataset=dataset, source=str(source), line=line)


def _as_list(value: Any, source: Path, line: int, key: str) -> list | str:
    if isinstance(value, (list, str)):
        return value
    if value is None:
        raise DataError("field is null; expected a list", source, line, key)
    raise DataError(f"expected a list of strings, got {type(value).__name__}", source, line, key)


def _parse_eval_row(row: dict, source: Path, line: int, dataset: str,
                    make: _ItemFactory) -> EvalRow:
    for key in EVAL_FIELDS:
        if key not in row:
            raise DataError("field missing", source, line, key)
    qtext = _text(row, "qry_text", source, line)
    qrel = _image_path(row["qry_img_path"], source, line, "qry_img_path")
    query = make(qtext, qrel, source, line, "qry_text", "qry_img_path")

    texts = _as_list(row["tgt_text"], source, line, "tgt_text")
    images = _as_list(row["tgt_img_path"], source, line, "tgt_img_path")
    # Some real MMEB-eval rows store one string for a side that is the same for every
    # candidate (e.g. tgt_text "" for image candidates); VLM2Vec broadcasts it too.
    if isinstance(texts, str) and isinstance(images, str):
        raise DataError("expected a list of candidates, got a single string", source, line,
                        "tgt_text")
    if isinstance(texts, str):
        texts = [texts] * len(images)
    if isinstance(images, str):
        images = [images] * len(texts)
    if len(texts) != len(images):
        raise DataError(f"tgt_text has {len(texts)} candidates but tgt_img_path has "
                        f"{len(images)}; they must pair up one to one", source, line,
                        "tgt_img_path")
    if len(texts) < 2:
        raise DataError(f"need at least 2 candidates (the positive first, then negatives), "
                        f"got {len(texts)}", source, line, "tgt_text")
    cands = []
    for i, (t, p) in enumerate(zip(texts, images)):
        tf, pf = f"tgt_text[{i}]", f"tgt_img_path[{i}]"
        if not isinstance(t, str):
            raise DataError(f"expected a string, got {type(t).__name__}", source, line, tf)
        cands.append(make(t, _image_path(p, source, line, pf), source, line, tf, pf))
    return EvalRow(query=query, candidates=cands, dataset=dataset, source=str(source), line=line)


# --------------------------------------------------------------------------- loaders

def load_train(data_dir_or_file: str | Path, image_root: str | Path,
               subsets: Iterable[str] | None = None, max_per_subset: int | None = None,
               seed: int = 0, split: str | None = None) -> list[TrainPair]:
    """Load and validate MMEB-format training pairs.

    Every row is validated (fields, types, image paths under ``image_root``); images are
    not opened (see :func:`validate_images`).

    Args:
        data_dir_or_file: a data file, a folder of ``<subset>.jsonl|parquet`` files, a
            folder of per-subset folders (MMEB-train layout), or a benchmark root holding
            ``train/``.
        image_root: folder the rows' image paths are relative to.
        subsets: subset names to load (default: all found). Unknown names are an error.
        max_per_subset: keep at most this many rows per subset, a uniformly random sample
            (seeded) kept in file order. ``None`` keeps all.
        seed: seed of that sample.
        split: split of multi-split folders (default ``"original"``, as VLM2Vec).

    Returns:
        The pairs, subsets in the order given (or sorted), rows in file order.

    Raises:
        DataError: a malformed row (names file, line, field), an unknown subset, no data.
    """
    found = discover_datasets(data_dir_or_file, "train", split)
    names = _select(found, subsets, "subset", data_dir_or_file)
    make = _ItemFactory(Path(image_root))
    pairs: list[TrainPair] = []
    for name in names:
        rows: list[TrainPair] = []
        for f in found[name]:
            for line, row in _iter_rows(f, TRAIN_REQUIRED + TRAIN_OPTIONAL, TRAIN_REQUIRED):
                rows.append(_parse_train_row(row, f, line, name, make))
        if max_per_subset is not None and len(rows) > max_per_subset:
            keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)),
                                                                 max_per_subset))
            rows = [rows[i] for i in keep]
        n_neg = sum(p.neg is not None for p in rows)
        logger.info("train subset %s: %d pairs (%d with hard negatives)", name, len(rows), n_neg)
        pairs.extend(rows)
    return pairs


def read_eval_rows(name: str, files: Sequence[str | Path], image_root: str | Path,
                   max_rows: int | None = None) -> list[EvalRow]:
    """Read and validate the rows of one evaluation dataset.

    Args:
        name: the dataset name stored in each row.
        files: its data files (from :func:`discover_datasets`), read in order.
        image_root: folder the image paths are relative to.
        max_rows: keep only the first ``max_rows`` rows (quick runs).

    Raises:
        DataError: a malformed row (names file, line, field).
    """
    make = _ItemFactory(Path(image_root))
    rows: list[EvalRow] = []
    for f in map(Path, files):
        for line, row in _iter_rows(f, EVAL_FIELDS, EVAL_FIELDS):
            if max_rows is not None and len(rows) >= max_rows:
                return rows
            rows.append(_parse_eval_row(row, f, line, name, make))
    return rows


def load_eval(dir_or_file: str | Path, image_root: str | Path,
              datasets: Iterable[str] | None = None, max_rows: int | None = None,
              split: str | None = None) -> dict[str, list[EvalRow]]:
    """Load and validate MMEB-format evaluation rows, per dataset.

    For a large benchmark prefer :func:`discover_datasets` + :func:`read_eval_rows`, one
    dataset at a time (what :func:`fam.eval.mmeb.evaluate` does).

    Args:
        dir_or_file: a data file, a folder of ``<Dataset>.jsonl|parquet`` files, a folder
            of per-dataset folders (MMEB-eval layout) or a benchmark root holding ``eval/``.
        image_root: folder the image paths are relative to.
        datasets: names to load (default: all found). Unknown names are an error.
        max_rows: keep the first ``max_rows`` rows of each dataset.
        split: split of multi-split folders (default ``"test"``).

    Returns:
        ``{dataset: rows}``.
    """
    found = discover_datasets(dir_or_file, "eval", split)
    names = _select(found, datasets, "dataset", dir_or_file)
    return {n: read_eval_rows(n, found[n], image_root, max_rows) for n in names}


def _select(found: dict[str, list[Path]], wanted: Iterable[str] | None, what: str,
            where: str | Path) -> list[str]:
    if wanted is None:
        return list(found)
    wanted = list(wanted)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DataError(f"{what}(s) {missing} not found; available: {sorted(found)}", where)
    return wanted


def validate_images(records: Iterable[TrainPair | EvalRow], decode: bool = False) -> int:
    """Check that every image the records reference exists (and optionally decodes).

    Each distinct image is checked once. Use before a long run so a missing file fails
    in seconds, not hours in.

    Args:
        records: training pairs and/or evaluation rows.
        decode: also open and decode each image (slow; catches corrupt files).

    Returns:
        The number of distinct images checked.

    Raises:
        DataError: names the first bad image's data file, line and field, and how many
            other images are missing.
    """
    seen: set[Path] = set()
    missing: list[tuple[Path, str, int, str]] = []
    for rec in records:
        for item, fld in _image_fields(rec):
            if item is None or item.image is None or item.image in seen:
                continue
            seen.add(item.image)
            if decode:
                load_image(item.image, source=rec.source, line=rec.line, field=fld)
            elif not item.image.is_file():
                missing.append((item.image, rec.source, rec.line, fld))
    if missing:
        img, src, line, fld = missing[0]
        more = f" (and {len(missing) - 1} more missing images)" if len(missing) > 1 else ""
        raise DataError(f"image not found: {img}{more}; check the image root", src, line, fld)
    return len(seen)


def _image_fields(rec: TrainPair | EvalRow) -> Iterator[tuple[MMItem | None, str]]:
    if isinstance(rec, TrainPair):
        for side, (_, ikey) in TRAIN_FIELDS.items():
            yield getattr(rec, side), ikey
    else:
        yield rec.query, "qry_img_path"
        for i, c in enumerate(rec.candidates):
            yield c, f"tgt_img_path[{i}]"


# --------------------------------------------------------------------------- metadata

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
