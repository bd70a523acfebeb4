"""MMEB records: training pairs and evaluation rows (paths, not pixels), and the image check."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

from PIL import Image
from torch.utils.data import Dataset

from fam.data.images import load_image
from fam.data.types import MMItem
from fam.errors import DataError

logger = logging.getLogger(__name__)


TRAIN_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")


TRAIN_OPTIONAL = ("neg_text", "neg_image_path")


EVAL_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


#: (text field, image field) of each side of a training pair, for error messages.
TRAIN_FIELDS: dict[str, tuple[str, str]] = {
    "query": ("qry", "qry_image_path"),
    "pos": ("pos_text", "pos_image_path"),
    "neg": ("neg_text", "neg_image_path"),
}


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

    def load_image(self, side: Literal["query", "pos", "neg"], rgb: bool = True
                   ) -> Image.Image | None:
        """Open the image of one side (``None`` if that side has no image).

        ``rgb=False`` keeps the file's mode for an adapter that pre-resizes and converts
        with its own rule (:func:`fam.data.images.load_image`); otherwise RGB.

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
                          field=TRAIN_FIELDS[side][1], rgb=rgb)


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
