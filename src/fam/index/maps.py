"""Similarity maps of late interaction: where on a result's image each query token matched.

A multi-vector index scores an item by MaxSim: each query token's largest dot product with
the item's stored token vectors, summed (``maxsim``) or averaged (``meanmaxsim``). The map of
query token ``t`` over a result is its dot product with every stored *image* token vector of
that result, laid on the image-token grid the backbone adapter reports
(:meth:`fam.backbones.base.BackboneAdapter.image_token_grid`); ``contribution[t]`` is the
token's MaxSim term. Both come from one matrix product over the stored vectors, so a map's
maximum *is* the contribution whenever the best match is an image token (with the ``content``
token set an item's text tokens are vectors too, and may hold the maximum).

Which stored vectors are image tokens is read from the item's encoded batch (tokenisation and
image processing, no forward): the head's counted positions, in sequence order, are the stored
rows. An item whose stored vectors are not its tokens one to one (``--max-tokens`` merged
them), with several images or a video, or of a family whose image tokens are not one grid, has
no map; :meth:`LateMaps.maps` says why in one line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fam.backbones.batch import TokenGrid
from fam.data.types import MMItem
from fam.errors import DataError
from fam.index.items import apply_prompt

__all__ = ["TokenMaps", "similarity_maps", "LateMaps", "LateResult", "overlay", "write_maps",
           "RAMP"]

log = logging.getLogger(__name__)

#: Item layouts kept in memory (one small tensor each).
_LAYOUT_CACHE = 4096


@dataclass
class TokenMaps:
    """The maps of one result.

    Attributes:
        grid: the image-token grid (rows, cols, the image box it covers).
        values: ``(Nq, rows·cols)`` dot products of each query token with each grid token.
        contribution: ``(Nq,)`` each query token's MaxSim term (max over all the item's
            vectors: image tokens and, with the ``content`` set, text tokens).
    """

    grid: TokenGrid
    values: torch.Tensor
    contribution: torch.Tensor

    def to_json(self, digits: int = 5) -> dict[str, Any]:
        """The JSON form (values rounded alike, so a map's max still equals its term)."""
        def r(t: torch.Tensor) -> list:
            return [round(float(v), digits) for v in t]
        g = self.grid
        return {"grid": [g.rows, g.cols], "box": list(g.box),
                "values": [r(v) for v in self.values], "contribution": r(self.contribution)}


def similarity_maps(query: torch.Tensor, doc: torch.Tensor, grid_rows: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (Nq, G), contribution (Nq,))`` of query tokens ``(Nq, D)`` against an item's
    stored vectors ``(n, D)``; ``grid_rows`` (G,) are the rows of ``doc`` on the grid, raster
    order. One product: the values are a subset of what the contribution maximises over."""
    sims = query.float() @ doc.float().T  # (Nq, n)
    if sims.shape[1] == 0:
        return sims[:, :0], torch.zeros(len(query))
    return sims[:, grid_rows], sims.max(dim=1).values


@dataclass
class LateResult:
    """A late-interaction search: hits, the query's tokens, each hit's maps (or why not)."""

    hits: list
    tokens: list[str]
    maps: list[TokenMaps | str] | None


class LateMaps:
    """Late-interaction search with similarity maps over a multi-vector index.

    Args:
        index: a loaded multi-vector :class:`fam.index.Index`.
        encoder: its query encoder (:func:`fam.index.multivector.query_encoder`).
    """

    def __init__(self, index, encoder):
        self.index, self.encoder = index, encoder
        self.adapter, self.head = encoder.model.adapter, encoder.head
        self._layouts: dict[int, tuple[torch.Tensor, TokenGrid] | str] = {}

    def _counted(self, item: MMItem, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, is_image)`` of the item's counted positions (the head's vectors, in order)
        and the positions' mask, from its encoded batch."""
        batch = self.adapter.encode([item], [image])
        ids = batch.inputs["input_ids"][0]
        keep = self.head.counted(batch.inputs["attention_mask"], batch.image_mask,
                                 batch.text_mask)[0]
        return ids[keep], batch.image_mask[0][keep], keep

    def query(self, item: MMItem, image=None) -> tuple[torch.Tensor, list[str]]:
        """The query's token vectors ``(Nq, D)`` and each one's text (image tokens:
        ``<image k>``): only the tokens that are vectors (special and masked ones are not).
        ``image``: decoded image(s) of the item (None: read from ``item``'s paths)."""
        if image is None and (item.image is not None or item.images):
            image = self.adapter.load_item_image(item)
        _, toks = self.encoder.encode_multi_all([item], images=[image])
        ids, is_image, _ = self._counted(item, image)
        tok = self.adapter.tokenizer
        texts, n_img = [], 0
        for i, im in zip(ids.tolist(), is_image.tolist()):
            n_img += im
            texts.append(f"<image {n_img}>" if im else tok.decode([i]))
        if len(texts) != len(toks[0]):  # the same tokenisation twice: a bug if they differ
            raise RuntimeError(f"{len(texts)} query tokens for {len(toks[0])} vectors")
        return toks[0], texts

    def layout(self, i: int) -> tuple[torch.Tensor, TokenGrid] | str:
        """Item ``i``'s grid rows among its stored vectors and its grid, or why it has none."""
        if i not in self._layouts:
            if len(self._layouts) >= _LAYOUT_CACHE:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[i] = self._layout(i)
        return self._layouts[i]

    def _layout(self, i: int) -> tuple[torch.Tensor, TokenGrid] | str:
        idx, row = self.index, self.index.rows[i]
        if row.get("images") or row.get("video"):
            return "maps cover items with one image (this one has several, or a video)"
        path = idx.image_file(i)
        if path is None:
            return "the item has no image"
        item = MMItem(apply_prompt(idx.manifest.document_prompt, str(row.get("text") or "")),
                      path)
        try:
            image = self.adapter.load_item_image(item)
            grid = self.adapter.image_token_grid(image)
            if grid is None:
                return (f"{self.adapter.family}'s image tokens are tiles, not one grid: no "
                        "map is drawn")
            _, is_image, _ = self._counted(item, image)
        except DataError as e:
            return f"the item's image cannot be read now ({getattr(e, 'reason', e)})"
        store = idx.late.store
        stored = int(store.offsets[i + 1] - store.offsets[i])
        if stored != len(is_image):
            cap = (idx.manifest.multivector or {}).get("max_tokens")
            return (f"the item's {len(is_image)} tokens are stored as {stored} merged vectors "
                    f"(--max-tokens {cap}): merged vectors have no place on the image")
        rows = torch.nonzero(is_image).flatten()[grid.first:grid.first + grid.rows * grid.cols]
        if len(rows) != grid.rows * grid.cols:
            return (f"the index's token set {self.head.tokens!r} keeps {len(rows)} image "
                    f"tokens, not the {grid.rows}x{grid.cols} grid")
        return rows, grid

    def maps(self, query: torch.Tensor, i: int) -> TokenMaps | str:
        """Item ``i``'s maps for the query's token vectors, or one line saying why none."""
        lay = self.layout(i)
        if isinstance(lay, str):
            return lay
        rows, grid = lay
        store = self.index.late.store
        doc = store.tokens[int(store.offsets[i]):int(store.offsets[i + 1])]
        values, contribution = similarity_maps(query, doc, rows)
        return TokenMaps(grid, values, contribution)

    def search(self, item: MMItem, image=None, k: int = 10, maps: bool = True) -> LateResult:
        """Top-k by late interaction (as ``fam search``), with each hit's maps if asked."""
        q, texts = self.query(item, image)
        hits = self.index.search_tokens([q], k)[0]
        return LateResult(hits, texts, [self.maps(q, h.index) for h in hits] if maps else None)


#: The colour ramp of the maps (inferno-like; the search page uses the same stops).
RAMP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def _heat(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(..., 3)`` uint8 colours of ``values`` scaled from ``[lo, hi]`` onto :data:`RAMP`."""
    ramp = torch.tensor(RAMP, dtype=torch.float32)
    x = ((values.float() - lo) / (hi - lo) if hi > lo else torch.zeros_like(values.float()))
    f = x.clamp(0, 1) * (len(RAMP) - 1)
    i = f.floor().long().clamp(max=len(RAMP) - 2)
    w = (f - i)[..., None]
    return (ramp[i] + (ramp[i + 1] - ramp[i]) * w).round().to(torch.uint8)


def overlay(image, maps: TokenMaps, t: int, lo: float, hi: float, alpha: float = 0.6):
    """The image with query token ``t``'s map laid over the part its grid covers (cells as
    blocks, no smoothing: each block is one image token)."""
    from PIL import Image
    g = maps.grid
    heat = _heat(maps.values[t].reshape(g.rows, g.cols), lo, hi).numpy()
    base = image.convert("RGB")
    w, h = base.size
    x0, y0, x1, y1 = (round(g.box[0] * w), round(g.box[1] * h), round(g.box[2] * w),
                      round(g.box[3] * h))
    region = base.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    cells = Image.fromarray(heat, "RGB").resize(region.size, Image.NEAREST)
    base.paste(Image.blend(region, cells, alpha), (x0, y0))
    return base


def write_maps(out_dir, index, result: LateResult, panel: int = 160) -> list:
    """One PNG per hit with maps (``NN-<id>.png``): the image, then one panel per query token
    (its map over the image, its text and contribution below), one colour scale per token
    across the hits; and ``maps.json`` (the tokens, each hit's maps as ``/v1/search``).

    Returns:
        The PNG paths written.
    """
    import json
    import re
    from pathlib import Path

    from PIL import Image, ImageDraw
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_maps = [(h, m) for h, m in zip(result.hits, result.maps or []) if not isinstance(m, str)]
    scale = [(min(float(m.values[t].min()) for _, m in with_maps),
              max(float(m.values[t].max()) for _, m in with_maps))
             for t in range(len(result.tokens))] if with_maps else []
    written = []
    for h, m in with_maps:
        image = Image.open(index.image_file(h.index))
        size = (max(1, round(image.width * panel / image.height)), panel)
        panels = [image.convert("RGB").resize(size)] + [
            overlay(image, m, t, *scale[t]).resize(size) for t in range(len(result.tokens))]
        sheet = Image.new("RGB", (len(panels) * (size[0] + 4), panel + 30), "white")
        draw = ImageDraw.Draw(sheet)
        for n, p in enumerate(panels):
            x = n * (size[0] + 4)
            sheet.paste(p, (x, 0))
            label = (f"#{h.rank} {h.score:.4f}" if n == 0 else
                     f"{result.tokens[n - 1].strip()!s} {float(m.contribution[n - 1]):.3f}")
            draw.text((x + 2, panel + 8), label[:24], fill="black")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", h.id)[:60]
        path = out_dir / f"{h.rank:02d}-{safe}.png"
        sheet.save(path)
        written.append(path)
    notes = {h.id: m for h, m in zip(result.hits, result.maps or []) if isinstance(m, str)}
    (out_dir / "maps.json").write_text(json.dumps({
        "query_tokens": result.tokens,
        "hits": [{**h.to_json(), "maps": None if isinstance(m, str) else m.to_json(),
                  **({"maps_note": m} if isinstance(m, str) else {})}
                 for h, m in zip(result.hits, result.maps or [])]}, ensure_ascii=False))
    if notes:
        log.info("no map for %d hit(s): %s", len(notes), next(iter(notes.values())))
    return written
