"""Where MMEB data sets are on disk: files or Hugging Face folders, JSONL or parquet, splits.

The Hugging Face layouts as published (checked against the dataset repositories' file lists):

* ``TIGER-Lab/MMEB-eval``: ``<Dataset>/test-00000-of-00001.parquet``, or the parquet
  converter's ``<Dataset>/test/0000.parquet``; it also holds datasets outside the 36 of the
  benchmark (e.g. ``CIFAR-100``), which are skipped unless asked for by name.
* ``TIGER-Lab/MMEB-train``: ``<Subset>/original-00000-of-00001.parquet`` and
  ``<Subset>/diverse_instruction-00000-of-00001.parquet`` (choose with ``split=``; VLM2Vec's
  paper results use ``original``), beside a legacy ``train-00000-of-00001.parquet`` from
  before the two splits, which is ignored with a warning.

Images: VLM2Vec unzips MMEB-eval's images into ``eval_images/`` and MMEB-train's into the
dataset folder (``images/``); :func:`guess_image_root` finds the folder the rows' image paths
are relative to when none is given.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from fam.errors import DataError
from fam.utils.io import read_jsonl

logger = logging.getLogger(__name__)


_DATA_SUFFIXES = (".jsonl", ".parquet")


# Hugging Face shard names: "<split>-00000-of-00003.parquet".
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


_DEFAULT_SPLIT = {"train": "original", "eval": "test"}


_PARQUET_BATCH = 4096  # rows per pyarrow batch: bounds memory while reading 100K-row files


def _split_of(path: Path) -> str:
    m = _HF_SHARD.match(path.stem)
    return m.group("split") if m else path.stem


#: MMEB-train's split from before ``original``/``diverse_instruction`` existed.
_LEGACY_TRAIN_SPLIT = "train"


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in _DATA_SUFFIXES and not p.name.startswith("."))


def _splits_of_folder(folder: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of one dataset folder: ``<split>-NNNNN-of-NNNNN.parquet`` shards
    and/or ``<split>/NNNN.parquet`` sub-folders (the parquet converter's layout).

    Raises:
        DataError: a split stored in two formats (``test.jsonl`` and ``test.parquet``).
    """
    by_split: dict[str, list[Path]] = {}
    for f in _data_files(folder):
        by_split.setdefault(_split_of(f), []).append(f)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _data_files(sub)
        if files:
            by_split.setdefault(sub.name, []).extend(files)
    for name, fs in by_split.items():
        kinds = sorted({f.suffix for f in fs})
        if len(kinds) > 1:
            # test.jsonl + test.parquet are two copies of a split, not two shards: reading
            # both would count every row twice.
            raise DataError(f"split {name!r} is stored as both {' and '.join(kinds)} "
                            f"({', '.join(f.name for f in fs)}); keep one format", folder)
    return by_split


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
    legacy: list[str] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_split = _splits_of_folder(sub)
        if not by_split:
            continue
        if sub.name in found:
            raise DataError(f"dataset {sub.name!r} is stored both as a file and as a folder; "
                            "keep one", path)
        if split is None and kind == "train" and _LEGACY_TRAIN_SPLIT in by_split and \
                len(by_split) > 1:
            del by_split[_LEGACY_TRAIN_SPLIT]
            legacy.append(sub.name)
        if len(by_split) == 1 and (split is None or split in by_split):
            found[sub.name] = next(iter(by_split.values()))
            continue
        want = split or _DEFAULT_SPLIT[kind]
        if want not in by_split:
            raise DataError(f"folder holds splits {sorted(by_split)} and none is {want!r}; pass "
                            "split= to choose one", sub)
        found[sub.name] = by_split[want]
    if legacy:
        logger.warning("ignoring the legacy %r shard of %d subset folder(s) (%s): MMEB-train's "
                       "split from before 'original'/'diverse_instruction'; reading %r (pass "
                       "split= to choose)", _LEGACY_TRAIN_SPLIT, len(legacy),
                       ", ".join(legacy[:5]) + (", ..." if len(legacy) > 5 else ""),
                       _DEFAULT_SPLIT["train"])
    if not found:
        raise DataError(f"no {kind} data found: expected <Dataset>.jsonl / <Dataset>.parquet "
                        "files or one folder of parquet/jsonl files per dataset", path)
    return dict(sorted(found.items()))


def guess_image_root(data: str | Path, files: Sequence[Path], image_fields: Sequence[str],
                     default: Path, n_probe: int = 16) -> Path:
    """The folder the rows' image paths are relative to, when the user gave none.

    Tries ``default`` first, then the data folder, its ``eval_images/`` and ``images/`` (where
    VLM2Vec's instructions unzip MMEB's images) and the same beside it; the first folder
    under which the first ``n_probe`` image paths of ``files`` all exist wins. When none
    fits, ``default`` is returned (image validation then names the first missing file).
    """
    data = Path(data)
    base = data if data.is_dir() else data.parent
    rel: list[str] = []
    for f in files:
        for _, row in iter_rows(f, list(image_fields), []):
            for key in image_fields:
                v = row.get(key)
                for path in (v if isinstance(v, list) else [v]):
                    if isinstance(path, str) and path:
                        rel.append(path)
            if len(rel) >= n_probe:
                break
        if len(rel) >= n_probe:
            break
    if not rel:
        return default
    candidates = [default, base, base / "eval_images", base / "images", base.parent,
                  base.parent / "eval_images", base.parent / "images"]
    for root in dict.fromkeys(c for c in candidates):
        if all((root / r).is_file() for r in rel[:n_probe]):
            if root != default:
                logger.info("image root: %s (the rows' image paths resolve there)", root)
            return root
    return default


def iter_rows(path: Path, columns: Sequence[str], required: Sequence[str]
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, row)`` from a JSONL or parquet file.

    For parquet, ``line`` is the row index + 1 and only ``columns`` are read (the real
    files carry other columns we do not need); a missing required column is reported once.
    """
    if path.suffix == ".jsonl":
        extra: set[str] = set()
        for line, row in read_jsonl(path):
            extra.update(k for k in row if k not in columns)
            yield line, row
        if extra:
            # MMEB rows carry other columns by design (ids, metadata): said once per file.
            logger.warning("%s: column(s) %s are not MMEB fields fam reads; ignored", path,
                       ", ".join(map(repr, sorted(extra))))
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
