"""The encoded batch every adapter returns (tokens, masks, pixel inputs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EncodedBatch", "TokenGrid"]


@dataclass
class EncodedBatch:
    """A tokenised, padded batch ready for the backbone.

    Attributes:
        inputs: keyword arguments for the model's forward (``input_ids`` (B, L),
            ``attention_mask`` (B, L), and the family's pixel inputs).
        image_mask: (B, L) bool, image-token positions.
        text_mask: (B, L) bool, text-content positions.
        eos_index: (B,) long, position of the last real token (the pooled token).
        has_image: (B,) bool, whether the item carries an image or a video.
        visual_counts: (B, 2) long, each row's number of images and of (native) videos, in
            the order their pixel inputs are stacked; ``None``: one image per row with
            ``has_image`` (what :func:`fam.train.gradcache.split_encoded` then assumes).
    """

    inputs: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    eos_index: torch.Tensor
    has_image: torch.Tensor
    visual_counts: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EncodedBatch":
        """Move every tensor to ``device``; floating pixel inputs also to ``dtype`` if given."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return EncodedBatch({k: mv(v) for k, v in self.inputs.items()}, self.image_mask.to(device),
                            self.text_mask.to(device), self.eos_index.to(device),
                            self.has_image.to(device),
                            None if self.visual_counts is None else self.visual_counts.to(device))

    @property
    def batch_size(self) -> int:
        return int(self.eos_index.shape[0])


@dataclass(frozen=True)
class TokenGrid:
    """Where one image's tokens lie on the image (what a similarity map is drawn on).

    Attributes:
        rows, cols: the grid of image tokens the LLM reads, raster order.
        first: the index of the grid's first token among the image's image tokens (1 when a
            CLS token leads them).
        box: ``(x0, y0, x1, y1)``, the part of the image the grid covers, as fractions of
            its width and height (a centre crop covers less than the whole image).
    """

    rows: int
    cols: int
    first: int = 0
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
