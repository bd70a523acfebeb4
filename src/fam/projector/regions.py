"""Region targets of patch-aligned training (method.md §4): PAD masks on the token grid.

Each PAD mask goes through exactly the image processor's geometry
(:func:`fam.projector.geometry.processor_transform`), is average-pooled onto the patch
grid (coverage ``c_k``) and thresholded at θ (``S_k``, arg-max fallback); each label is
tokenised as written mid-sentence. Shared by projector training and the alignment report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fam.data.rle import rle_decode
from fam.errors import ConfigError, DataError
from fam.pad.records import PadRecord
from fam.projector.geometry import mask_to_patch_coverage, processor_transform, select_patches

logger = logging.getLogger(__name__)

__all__ = ["RegionTargets", "region_targets", "label_token_ids", "token_layout"]


def token_layout(adapter: Any) -> tuple[int, int, int]:
    """``(G_h, G_w, offset)`` of a LLaVA adapter's image tokens.

    ``offset`` is 1 when the CLS token leads the image tokens
    (``vision_feature_select_strategy == "full"``), else 0: grid cell ``i`` (raster) is image
    token ``offset + i``.
    """
    if not hasattr(adapter, "patch_grid"):
        raise ConfigError(f"{type(adapter).__name__} has no patch_grid(): the alignment tools "
                          "need a LLaVA-style adapter")
    gh, gw = adapter.patch_grid()
    full = getattr(adapter.config, "vision_feature_select_strategy", "default") == "full"
    return gh, gw, int(full)


def label_token_ids(tokenizer: Any, label: str, context: str = "a") -> list[int]:
    """Token ids of a label as it is written inside a sentence (no special tokens).

    The label is tokenised after a context word (``"a red circle"``) and the tokens
    overlapping the label's characters are kept. With byte-level BPE, a word at the start of
    a string tokenises differently from the same word mid-sentence (``"red"`` → ``re``,
    ``d`` but ``" red"`` → ``Ġred``), and only the mid-sentence form is what captions train;
    SentencePiece tokenizers give ``▁red`` either way.

    Args:
        tokenizer: a fast tokenizer (offset mapping needed).
        label: the region label, e.g. ``"fire hydrant"``.
        context: the word written before it.

    Returns:
        The label's token ids (may be empty for an empty label).
    """
    label = label.strip()
    if not label:
        return []
    text = f"{context} {label}"
    start = len(context) + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    ids = [int(t) for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
           if e > start and s < len(text) and e > s and int(t) not in special]
    if not ids:  # a tokenizer without offsets for these pieces: plain tokenisation
        ids = [int(t) for t in tokenizer(label, add_special_tokens=False)["input_ids"]
               if int(t) not in special]
    return ids


@dataclass
class RegionTargets:
    """The annotated regions of one image on the LLM's image-token grid (method.md §4).

    Attributes:
        labels: K region labels.
        token_ids: K lists, each label's token ids (:func:`label_token_ids`).
        patch_sets: ``(K, N)`` bool ``S_k`` over the N image tokens (raster, after the CLS
            offset when there is one).
        coverage: ``(K, N)`` float32 patch coverage ``c_k``.
        grid: ``(G_h, G_w)``.
        offset: index of grid cell 0 among the image tokens (1 with a leading CLS token).
    """

    labels: list[str]
    token_ids: list[list[int]]
    patch_sets: np.ndarray
    coverage: np.ndarray
    grid: tuple[int, int]
    offset: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def region_targets(record: PadRecord, adapter: Any, theta: float = 0.5) -> RegionTargets:
    """Decode a PAD record's masks into patch sets on the adapter's image-token grid.

    Each mask goes through the image processor's exact geometry
    (:func:`processor_transform`), is average-pooled onto the patch grid (``c_k``) and
    thresholded at ``theta`` with the arg-max fallback (``S_k``; method.md §4). Regions
    cropped away entirely (empty ``S_k``) and labels without tokens are dropped.

    Args:
        record: a validated PAD record (:func:`fam.pad.records.read_pad`); its source and
            line name it in errors.
        adapter: a LLaVA-style adapter (processor, tokenizer, patch grid).
        theta: coverage threshold (0.5 in the paper).

    Returns:
        :class:`RegionTargets` with ``N = offset + G_h·G_w`` columns.
    """
    src, line = record.source, record.line
    gh, gw, off = token_layout(adapter)
    h, w = record.height, record.width
    patch = int(adapter.config.vision_config.patch_size)
    tf = processor_transform(adapter.image_processor, (h, w), patch)
    if tf.grid_size("token") != (gh, gw):
        raise DataError(f"processed grid {tf.grid_size('token')} != the model's patch grid "
                        f"{(gh, gw)}; the processor and the vision config disagree", src, line)
    labels, ids, masks = [], [], []
    for j, reg in enumerate(record.regions):
        m = rle_decode(reg.mask, where=str(src) if src else None)
        if m.shape != (h, w):
            raise DataError(f"region {j} mask is {m.shape[0]}x{m.shape[1]} but the record says "
                            f"{h}x{w} (height x width); masks must be at full resolution",
                            src, line, f"regions[{j}].mask")
        tok = label_token_ids(adapter.tokenizer, reg.label)
        if not tok:
            logger.debug("%s:%s region %d: label %r has no tokens; skipped", src, line, j,
                         reg.label)
            continue
        labels.append(reg.label)
        ids.append(tok)
        masks.append(m)
    n = off + gh * gw
    if not masks:
        return RegionTargets([], [], np.zeros((0, n), bool), np.zeros((0, n), np.float32),
                             (gh, gw), off)
    cov = mask_to_patch_coverage(np.stack(masks), tf, level="token").reshape(len(masks), -1)
    sets = select_patches(cov, theta, flat=True)
    keep = sets.any(axis=1)
    if not keep.all():
        logger.debug("%s:%s: %d region(s) outside the processed image; skipped", src, line,
                     int((~keep).sum()))
    cov, sets = cov[keep], sets[keep]
    labels = [x for x, k in zip(labels, keep) if k]
    ids = [x for x, k in zip(ids, keep) if k]
    if off:
        cov = np.concatenate([np.zeros((len(cov), off), np.float32), cov], axis=1)
        sets = np.concatenate([np.zeros((len(sets), off), bool), sets], axis=1)
    return RegionTargets(labels, ids, sets, cov.astype(np.float32), (gh, gw), off)
