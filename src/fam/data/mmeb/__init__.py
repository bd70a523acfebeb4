"""MMEB-format data: training pairs, evaluation rows and per-dataset metadata.

MMEB (Jiang et al., VLM2Vec, 2024) stores every task as rows of text + relative image
paths; method.md §6 gives the fields. Two layouts are read, both for JSONL and parquet:

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

Dataset metadata (meta-task, IND/OOD) for the 36 MMEB evaluation datasets is a table
(:mod:`fam.data.mmeb.datasets`); a ``datasets.json`` next to the data extends or overrides it.

Modules: :mod:`~fam.data.mmeb.records` (the row types), :mod:`~fam.data.mmeb.layout`
(finding data sets on disk), :mod:`~fam.data.mmeb.rows` (reading and validating rows),
:mod:`~fam.data.mmeb.datasets` (metadata).
"""
from fam.data.mmeb.datasets import (META_TASKS, MMEB_DATASETS, SPLITS, DatasetInfo, dataset_info,
                                    find_datasets_json, load_dataset_infos)
from fam.data.mmeb.layout import discover_datasets
from fam.data.mmeb.records import (EVAL_FIELDS, TRAIN_FIELDS, EvalRow, TrainPair, TrainPairDataset,
                                   collate_train_pairs, validate_images)
from fam.data.mmeb.rows import load_eval, load_train, read_eval_rows

__all__ = [
    "TrainPair", "EvalRow", "TrainPairDataset", "DatasetInfo", "MMEB_DATASETS", "META_TASKS",
    "SPLITS", "TRAIN_FIELDS", "EVAL_FIELDS", "load_train", "load_eval", "read_eval_rows",
    "discover_datasets", "validate_images", "dataset_info", "load_dataset_infos",
    "find_datasets_json", "collate_train_pairs",
]
