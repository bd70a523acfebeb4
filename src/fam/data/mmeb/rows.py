"""Reading and validating MMEB rows: ``load_train``, ``load_eval`` (every row checked on load)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from fam.data.mmeb.layout import discover_datasets, guess_image_root, iter_rows
from fam.data.mmeb.records import (EVAL_FIELDS, TRAIN_FIELDS, TRAIN_OPTIONAL, TRAIN_REQUIRED,
                                   EvalRow, TrainPair)
from fam.data.items import VISUAL_KEYS, check_item, visual_inputs as _visuals
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import DataError
from fam.utils.io import read_jsonl, resolve_under

logger = logging.getLogger(__name__)
#: Training-row columns read (parquet reads only these): MMEB's, and each side's video.
_TRAIN_COLUMNS = [*TRAIN_REQUIRED, *TRAIN_OPTIONAL,
                  *(VISUAL_KEYS[side][1] for side in ("query", "pos", "neg"))]


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
                 image_field: str, images: tuple[Path, ...] = (),
                 video: tuple[Path, ...] = ()) -> MMItem:
        key = (text, rel, images, video)
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
        elif IMAGE_PLACEHOLDER in text and not images:
            raise DataError(f"the text contains {IMAGE_PLACEHOLDER} but '{image_field}' is "
                            "empty; give the image path or remove the placeholder",
                            source, line, text_field)
        if not text and image is None and not images and not video:
            raise DataError(f"empty item: both '{text_field}' and '{image_field}' are empty",
                            source, line, text_field)
        # The input contract's placeholder rules (<|image_2|> with one image, twice the same).
        check_item(text, int(image is not None) + len(images), path=source, line=line,
                   text_field=text_field)
        src = self._sources.setdefault(source, str(source))  # one string per file, shared
        item = MMItem(text=text, image=image, images=images, video=video, source=src, line=line,
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
        _, video = _visuals(row, side, make.image_root, source, line)
        if optional and not text and not rel and not video:
            sides[side] = None
            continue
        sides[side] = make(text, rel, source, line, tkey, ikey, video=video)
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


def load_train(data_dir_or_file: str | Path, image_root: str | Path | None,
               subsets: Iterable[str] | None = None, max_per_subset: int | None = None,
               seed: int = 0, split: str | None = None) -> list[TrainPair]:
    """Load and validate MMEB-format training pairs.

    Every row is validated (fields, types, image paths under ``image_root``); images are
    not opened (see :func:`validate_images`).

    Args:
        data_dir_or_file: a data file, a folder of ``<subset>.jsonl|parquet`` files, a
            folder of per-subset folders (MMEB-train layout), or a benchmark root holding
            ``train/``.
        image_root: folder the rows' image paths are relative to; ``None``: found by
            :func:`~fam.data.mmeb.layout.guess_image_root` (default: the data's parent).
        subsets: subset names to load (default: all found). Unknown names are an error.
        max_per_subset: keep at most this many rows per subset, a uniformly random sample
            (seeded) kept in file order. ``None`` keeps all.
        seed: seed of that sample.
        split: split of multi-split folders (default ``"original"``, as VLM2Vec;
            ``"diverse_instruction"`` for MMEB-train's paraphrased instructions).

    Returns:
        The pairs, subsets in the order given (or sorted), rows in file order.

    Raises:
        DataError: a malformed row (names file, line, field), an unknown subset, no data.
    """
    found = discover_datasets(data_dir_or_file, "train", split)
    names = _select(found, subsets, "subset", data_dir_or_file)
    if image_root is None:
        image_root = guess_image_root(data_dir_or_file, found[names[0]] if names else [],
                                      [f for _, f in TRAIN_FIELDS.values()],
                                      Path(data_dir_or_file).parent)
    make = _ItemFactory(Path(image_root))
    pairs: list[TrainPair] = []
    for name in names:
        rows: list[TrainPair] = []
        for f in found[name]:
            for line, row in iter_rows(f, _TRAIN_COLUMNS, TRAIN_REQUIRED):
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
        for line, row in iter_rows(f, EVAL_FIELDS, EVAL_FIELDS):
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


def read_items(path: str | Path, image_root: str | Path) -> list[MMItem]:
    """Checked items of an inference JSONL (``fam encode``): :func:`fam.data.items.read_items`.

    Raises:
        DataError: naming the file, line and field of the first bad row.
    """
    from fam.data.items import read_items as read_item_rows
    return [r.item for r in read_item_rows(path, image_root)]


def _select(found: dict[str, list[Path]], wanted: Iterable[str] | None, what: str,
            where: str | Path) -> list[str]:
    if wanted is None:
        return list(found)
    wanted = list(wanted)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DataError(f"{what}(s) {missing} not found; available: {sorted(found)}", where)
    return wanted
