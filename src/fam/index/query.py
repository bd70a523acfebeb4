"""One ``fam search`` query against a loaded index: the text it prints.

The one implementation of a search's output, used by ``fam search`` in its own process and
by its query worker (:mod:`fam.serve.search_worker`), so both print the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fam.errors import ConfigError
from fam.index.index import Index, format_hits

__all__ = ["SearchQuery", "run_query", "check_maps"]


@dataclass(frozen=True)
class SearchQuery:
    """What a ``fam search`` asks (the index and the model are loaded already).

    Attributes:
        text: query text ('' for none).
        image: query image file (absolute path) or None.
        k: number of hits.
        prompt: an explicit query prompt (``--query-prompt``) or None for the index's rule.
        as_json: JSONL output (one hit per line) instead of the table.
        maps: a folder (absolute path) for each hit's similarity maps per query token
            (``--maps``; a multi-vector index only), or None.
    """

    text: str = ""
    image: str | None = None
    k: int = 10
    prompt: str | None = None
    as_json: bool = False
    maps: str | None = None


def check_maps(index: Index, maps: str | None) -> None:
    """Refuse ``--maps`` on a single-vector index (one line)."""
    if maps is not None and index.late is None:
        raise ConfigError(f"--maps: {index.path} is a single-vector index; similarity maps "
                          "need one built with fam index build --multivector")


def run_query(index: Index, model, query: SearchQuery,
              model_path: str | Path | None = None) -> tuple[str, str]:
    """Embed ``query``, search ``index``; (the line for stderr, the text for stdout).

    Args:
        index: the loaded index.
        model: its query model (:func:`fam.index.load_query_model`).
        query: the query.
        model_path: the model folder given by the user (a multi-vector index reads its
            token head from it; default: the one recorded in the index).

    Returns:
        The line saying which text was embedded (and, with maps, a line saying where they
        went), and the hits: a table, or one JSON object per line (each line ending in a
        newline; nothing for no hits).
    """
    from fam.index.embed import embed

    check_maps(index, query.maps)
    image = Path(query.image) if query.image is not None else None
    note = index.describe_query(query.text, image is not None, query.prompt)
    item = index.query_item(query.text, image, query.prompt)
    if index.late is not None:  # multi-vector index: late interaction
        from fam.index.maps import LateMaps, write_maps
        from fam.index.multivector import query_encoder
        res = LateMaps(index, query_encoder(index, model, model_path)).search(
            item, None, query.k, maps=query.maps is not None)
        hits = res.hits
        if query.maps is not None:
            pngs = write_maps(query.maps, index, res)
            note += (f"\nquery tokens {res.tokens}; wrote {len(pngs)} map image(s) and "
                     f"maps.json to {query.maps}")
    else:
        hits = index.search(embed(model, [item]), query.k)[0]
    if query.as_json:
        out = "".join(json.dumps(h.to_json(), ensure_ascii=False) + "\n" for h in hits)
    else:
        out = format_hits(hits) + "\n"
    return note, out
