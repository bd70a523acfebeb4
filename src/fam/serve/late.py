"""``/v1/search`` on a multi-vector index: MaxSim hits and per-query-token similarity maps.

The query is encoded, searched (FAISS token candidates, exact MaxSim rerank: what ``fam
search`` does on the same index) and, when the request says ``"maps": true``, each hit's maps
are computed (:class:`fam.index.maps.LateMaps`), all in one call on the model worker thread
(the tokenizer and image processor are not used from two threads at once). The answer adds::

    "scoring": "maxsim", "similarity": "maxsim" | "meanmaxsim",
    "query_tokens": ["a", " red", ...]          the query tokens that are vectors (with maps)
    data[i]["maps"]: {"grid": [rows, cols], "box": [x0, y0, x1, y1],
                      "values": [[rows·cols floats] per query token],
                      "contribution": [per query token]}   or null, with data[i]["maps_note"]

A hit's score is the sum (``maxsim``) or mean (``meanmaxsim``) of its contributions; a map's
maximum equals the contribution when the best match is an image token.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fam.data.types import Visuals
from fam.serve.batching import QueueFull
from fam.serve.hits import hit_json
from fam.serve.inputs import ParsedInput, RequestError, load_images

__all__ = ["late_maps", "late_search", "check_maps_flag"]


def late_maps(index, model, model_path: str | None):
    """The :class:`fam.index.maps.LateMaps` of a multi-vector index (None for another)."""
    if index is None or index.late is None:
        return None
    from fam.index.maps import LateMaps
    from fam.index.multivector import query_encoder
    return LateMaps(index, query_encoder(index, model, model_path))


def check_maps_flag(body: dict, late) -> bool:
    """The request's ``maps`` flag (refused on a single-vector index)."""
    maps = body.get("maps", False)
    if not isinstance(maps, bool):
        raise RequestError(400, f"maps: expected true or false, got {maps!r}", "maps")
    if maps and late is None:
        raise RequestError(400, "maps: this index is single-vector; similarity maps need one "
                                "built with fam index build --multivector", "maps")
    return maps


async def late_search(service, inp: ParsedInput, k: int, maps: bool) -> dict[str, Any]:
    """The ``/v1/search`` answer for one query on the multi-vector index."""
    late = service.late
    images = (await load_images([inp], service.config, service.rules))[0]
    # One image, several, or a Visuals with a video's frames (the encode paths take all three).
    image = images if isinstance(images, Visuals) else \
        images[0] if len(images) == 1 else (images or None)

    def run():
        return late.search(inp.item(), image, k, maps)

    try:
        fut = service.encoder.call(run)
    except QueueFull as e:
        raise RequestError(503, f"server busy: {e}; retry later", type_="server_busy") from None
    res = await asyncio.wrap_future(fut)
    if not res.tokens:
        raise RequestError(400, f"the query has no token vectors: the index keeps the "
                                f"{late.head.tokens!r} tokens of each side; send an image",
                           "query")
    index = service.index
    data = []
    for n, h in enumerate(res.hits):
        d = hit_json(index, h)
        if res.maps is not None:
            m = res.maps[n]
            d["maps"] = None if isinstance(m, str) else m.to_json()
            if isinstance(m, str):
                d["maps_note"] = m
        data.append(d)
    out: dict[str, Any] = {"object": "list", "data": data, "model": service.name,
                           "scoring": "maxsim", "similarity": late.head.similarity}
    if maps:
        out["query_tokens"] = res.tokens
    return out
