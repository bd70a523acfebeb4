"""One ``fam search`` query against a loaded index: the text it prints.

The one implementation of a search's output, used by ``fam search`` in its own process and
by its query worker (:mod:`fam.serve.search_worker`), so both print the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fam.index.index import Index, format_hits

__all__ = ["SearchQuery", "run_query"]


@dataclass(frozen=True)
class SearchQuery:
    """What a ``fam search`` asks (the index and the model are loaded already).

    Attributes:
        text: query text ('' for none).
        image: query image file (absolute path) or None.
        k: number of hits.
        prompt: an explicit query prompt (``--query-prompt``) or None for the index's rule.
        as_json: JSONL output (one hit per line) instead of the table.
    """

    text: str = ""
    image: str | None = None
    k: int = 10
    prompt: str | None = None
    as_json: bool = False


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
        The line saying which text was embedded, and the hits: a table, or one JSON object
        per line (each line ending in a newline; nothing for no hits).
    """
    from fam.index.embed import embed

    image = Path(query.image) if query.image is not None else None
    note = index.describe_query(query.text, image is not None, query.prompt)
    item = index.query_item(query.text, image, query.prompt)
    if index.late is not None:  # multi-vector index: late interaction
        from fam.index.multivector import query_encoder
        _, toks = query_encoder(index, model, model_path).encode_multi_all([item])
        hits = index.search_tokens(toks, query.k)[0]
    else:
        hits = index.search(embed(model, [item]), query.k)[0]
    if query.as_json:
        out = "".join(json.dumps(h.to_json(), ensure_ascii=False) + "\n" for h in hits)
    else:
        out = format_hits(hits) + "\n"
    return note, out
