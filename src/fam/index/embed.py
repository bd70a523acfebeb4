"""The one place the index builder, ``fam search`` and the server turn items into vectors.

Kept to one small function so that the encode path it calls can be swapped (a faster batch
encoder) without touching its callers; every caller therefore gets the same vectors as
``fam encode`` (``EmbeddingModel.encode``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from fam.data.types import MMItem
from fam.model import EmbeddingModel, autocast_for


@torch.no_grad()
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
    if images is None:
        return model.encode(items, batch_size=batch_size)
    if len(images) != len(items):
        raise ValueError(f"{len(images)} image entries for {len(items)} items")
    was_training = model.training
    model.eval()
    device = model.adapter.device
    outs = []
    try:
        for i in range(0, len(items), batch_size):
            batch = model.adapter.encode(items[i:i + batch_size],
                                         images=images[i:i + batch_size]).to(device)
            with autocast_for(device, model.adapter.dtype):
                outs.append(model(batch).embedding.float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, model.adapter.hidden_size)
    return torch.cat(outs)
