"""A search hit as ``/v1/search`` answers it: the hit's fields and the URLs of its images.

``image_url`` for its ``image``; ``images_urls`` for its further images and ``frame_urls``
for its video's sampled frames (``video_frames``), when it has them; None for a file that is
not there. The URLs are this server's ``/v1/index/items/{i}/...`` routes, which serve only
files the index lists.
"""
from __future__ import annotations

from typing import Any

__all__ = ["hit_json"]


def hit_json(index, hit) -> dict[str, Any]:
    """``hit.to_json()`` with the URLs of its image, further images and video frames."""
    d = hit.to_json()
    d["image_url"] = (f"/v1/index/items/{hit.index}/image"
                      if index.image_file(hit.index) is not None else None)
    for key, name in (("images", "images_urls"), ("video_frames", "frame_urls")):
        paths = getattr(hit, key)
        if paths:
            d[name] = [f"/v1/index/items/{hit.index}/{key}/{j}"
                       if index.image_file(hit.index, key, j) is not None else None
                       for j in range(len(paths))]
    return d
