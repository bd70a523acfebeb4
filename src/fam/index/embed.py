"""The one place the index builder, ``fam search`` and the server turn items into vectors.

One small function over :class:`fam.model.encode.EncodePipeline` (the encode path of
``fam encode``, ``fam eval`` and ``EmbeddingModel.encode``), so every caller gets the same
vectors as ``fam encode``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from fam.data.types import MMItem
from fam.model import EmbeddingModel
from fam.model.encode import EncodePipeline


def embed(model: EmbeddingModel, items: Sequence[MMItem],
          images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None,
          batch_size: int = 32) -> torch.Tensor:
    """Embed items, reading their images from disk or taking them already decoded.

    Args:
        model: the embedding model.
        items: the items; ``item.image`` paths are read when ``images`` is None.
        images: optional decoded images aligned with ``items`` (an entry may be a list of
            images for ``<|image_1|>``, ``<|image_2|>``, ...; None for a text-only item).
        batch_size: items per forward.

    Returns:
        (n, d) float32 embeddings on the CPU (L2-normalised when the model normalises).
    """
    if images is not None and len(images) != len(items):
        raise ValueError(f"{len(images)} image entries for {len(items)} items")
    # One batch (the server's dynamic batches): no prefetch thread to start for it.
    prefetch = 0 if len(items) <= batch_size else 2
    return EncodePipeline(model, batch_size=batch_size, prefetch=prefetch).encode(items, images)
