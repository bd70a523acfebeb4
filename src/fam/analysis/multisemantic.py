"""The multi-semantic check: do a patch's matching-pursuit atoms name what is true of it?

The paper's *multi-semantic alignment hypothesis* (arXiv 2505.17316) says a projected
patch is a sparse combination of the word embeddings of everything true of that patch
(e.g. "hand" + "phone" + "holding"); its next checks ask for precision/recall of K = 5
matching-pursuit atoms per patch against the words that are actually true there. On
Scenes that ground truth is exact: for a patch inside object ``o``'s mask the true words
are

* ``colour`` — ``o``'s colour word,
* ``shape`` — ``o``'s shape word,
* ``relation`` — ``left`` / ``right`` / ``above`` / ``below`` for each other object that
  ``o`` is clearly (by ``margin``) left of / right of / above / below.

Scores over in-mask patches (background patches have no ground truth):

* ``precision`` — of the K atoms, the fraction that is a token of a true word;
* ``recall`` — of the true words, the fraction with at least one token among the atoms;
  also per category (``recall_colour``, ``recall_shape``, ``recall_relation``; patches
  of one-object scenes have no relation word and do not count there).

Example:
    >>> truth = [{"colour": [{5}], "shape": [{7}], "relation": []}]
    >>> multisemantic_scores(torch.tensor([[5, 9, 1, 2, 3]]), truth, k=5)["recall"]
    0.5
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["CATEGORIES", "RELATION_TOKENS", "multisemantic_scores", "object_words",
           "word_token_sets"]

CATEGORIES = ("colour", "shape", "relation")
#: relation word → (axis, sign): "o is <word> of p" when sign·(c_o − c_p) ≥ margin
RELATION_TOKENS = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}


def object_words(objects: Sequence[Mapping], width: int, height: int,
                 margin: float = 12 / 112) -> list[dict[str, list[str]]]:
    """The words true of each object of a scene (module docstring).

    Args:
        objects: ``{colour, shape, box}`` per object (PAD ``attributes`` + ``box``).
        width, height: image size (boxes are in pixels).
        margin: relation margin as a fraction of the side (Scenes: 12 px of 112).

    Returns:
        Per object ``{"colour": [w], "shape": [w], "relation": [words...]}`` (each
        relation word once).
    """
    centres = [((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2)
               for o in objects]
    out = []
    for i, o in enumerate(objects):
        rel = []
        for word, (axis, sign) in RELATION_TOKENS.items():
            side = width if axis == 0 else height
            if any(sign * (centres[i][axis] - centres[j][axis]) >= margin * side
                   for j in range(len(objects)) if j != i):
                rel.append(word)
        out.append({"colour": [o["colour"]], "shape": [o["shape"]], "relation": rel})
    return out


def word_token_sets(words: Mapping[str, Sequence[str]],
                    tokenize: Callable[[str], Sequence[int]]) -> dict[str, list[set[int]]]:
    """Map each category's words to their token-id sets (``tokenize`` = the LLM's
    mid-sentence tokenisation, e.g. :func:`fam.analysis.report.label_token_ids`)."""
    return {c: [set(int(t) for t in tokenize(w)) for w in ws] for c, ws in words.items()}


def multisemantic_scores(atoms: torch.Tensor | np.ndarray,
                         truth: Sequence[Mapping[str, Sequence[set[int]]]],
                         k: int = 5) -> dict[str, float]:
    """Precision/recall of each patch's first ``k`` atoms against its true words.

    Args:
        atoms: ``(M, K_max)`` token ids picked by matching pursuit, in pick order, for M
            in-mask patches.
        truth: per patch, category → list of token-id sets (one set per true word).
        k: atoms used per patch (the paper's check: 5).

    Returns:
        ``precision``, ``recall``, ``recall_<category>`` (NaN when no patch has a word of
        that category), ``n_patches``, ``k``.
    """
    a = torch.as_tensor(np.asarray(atoms)).long()
    if a.dim() != 2 or a.shape[0] != len(truth):
        raise ValueError(f"atoms must be (M, K) with M = {len(truth)} patches, got "
                         f"{tuple(a.shape)}")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k={k} must be in 1..{a.shape[1]} (matching-pursuit steps run)")
    prec, rec = [], []
    per_cat: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for row, words in zip(a[:, :k].tolist(), truth):
        picked = set(row)
        true_tokens = set().union(*[s for ws in words.values() for s in ws]) \
            if any(words.values()) else set()
        prec.append(sum(t in true_tokens for t in row) / k)
        hits_all, n_all = 0, 0
        for cat, ws in words.items():
            if not ws:
                continue
            hits = sum(bool(s & picked) for s in ws)
            hits_all += hits
            n_all += len(ws)
            per_cat.setdefault(cat, []).append(hits / len(ws))
        if n_all:
            rec.append(hits_all / n_all)
    out = {"precision": float(np.mean(prec)) if prec else float("nan"),
           "recall": float(np.mean(rec)) if rec else float("nan"),
           "n_patches": len(truth), "k": k}
    for cat, vals in per_cat.items():
        out[f"recall_{cat}"] = float(np.mean(vals)) if vals else float("nan")
    return out
