"""MMEB records: training pairs and evaluation rows (paths, not pixels), and the image check."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

from PIL import Image
from torch.utils.data import Dataset

from fam.data.images import ImageRef, ImageRules, check_images, load_image
from fam.data.types import MMItem

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

    def image_refs(self) -> Iterator[ImageRef]:
        """The images of this row (for the up-front check of a training run)."""
        return image_refs(self)

    def items(self) -> list[MMItem]:
        """The row's items (query, positive, negative if any), for the up-front check."""
        return [it for it in (self.query, self.pos, self.neg) if it is not None]


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

    def image_refs(self) -> Iterator[ImageRef]:
        """The images of this row."""
        return image_refs(self)


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


def validate_images(records: Iterable[TrainPair | EvalRow], decode: bool = False, *,
                    mode: str = "exists", progress: bool = False,
                    rules: ImageRules | None = None) -> int:
    """Check every image the records reference, up front (:func:`fam.data.images.check_images`).

    Each distinct image is checked once. Use before a long run so a bad file fails in
    seconds, not hours in.

    Args:
        records: training pairs and/or evaluation rows.
        decode: decode every image (slow; the same as ``mode="decode"``).
        mode: ``"exists"``, ``"verify"`` (header, size limit and file structure; catches
            truncated files and decompression bombs without decoding) or ``"decode"``.
        progress: show a progress bar.

    Returns:
        The number of distinct images checked.

    Raises:
        DataError: names the first bad image's data file, line and field, and how many
            other images are missing.
    """
    return check_images((r for rec in records for r in image_refs(rec)),
                        "decode" if decode else mode, progress,
                        rules=rules if rules is not None else ImageRules())


def image_refs(rec: TrainPair | EvalRow) -> Iterator[ImageRef]:
    """The images a record references, each with the record's file, line and field."""
    for item, fld in _image_fields(rec):
        if item is not None and item.image is not None:
            yield ImageRef(item.image, rec.source, rec.line, fld)
        if item is not None:  # further images and video frames (MMItem.images / .video)
            for p in item.images + item.video:
                yield ImageRef(p, rec.source, rec.line, item.field or fld)


def _image_fields(rec: TrainPair | EvalRow) -> Iterator[tuple[MMItem | None, str]]:
    if isinstance(rec, TrainPair):
        for side, (_, ikey) in TRAIN_FIELDS.items():
            yield getattr(rec, side), ikey
    else:
        yield rec.query, "qry_img_path"
        for i, c in enumerate(rec.candidates):
            yield c, f"tgt_img_path[{i}]"
