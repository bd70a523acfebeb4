"""Caption quality of generated captions against the Scenes ground truth.

The paper (arXiv 2505.17316) reports that a patch-aligned projector makes the LVLM write
better captions. On Scenes the ground truth of every image is known exactly (each
object's colour, shape, size and box, in the PAD record), so a caption can be checked
fact by fact instead of by n-gram overlap alone:

* **objects** — each mention ``[size] [colour] shape`` in the caption is matched to a
  distinct ground-truth object with the same colour *and* shape (attribute binding):
  ``object_precision`` = matched mentions / mentions, ``object_recall`` = matched objects /
  objects, ``object_f1``; micro-averaged over the corpus.
* **attributes** — ``colour_recall`` / ``shape_recall``: the fraction of the image's
  distinct colours / shapes that the caption names (binding-free), and
  ``size_accuracy``: of the matched mentions that state a size, how many state the right
  one.
* **count** — ``count_accuracy``: the caption mentions as many objects as the image holds.
* **relations** — each stated relation "A is left of / right of / above / below B" between
  two matched mentions is checked on the objects' box centres (``relation_accuracy`` =
  correct / stated; a relation between unmatched mentions is wrong).
* a standard n-gram metric: corpus **BLEU-4** (sacrebleu) against the reference captions.

Parsing is the Scenes grammar's: lower-case words, a mention is a shape word preceded by
at most a colour and a size word (``"a small red circle"``, ``"the blue square"``); plural
``"circles"`` counts as the shape. Words outside the Scenes vocabulary are ignored.

Example:
    >>> gt = [{"colour": "red", "shape": "circle", "size": "small", "box": [10, 10, 28, 28]},
    ...       {"colour": "blue", "shape": "square", "size": "large", "box": [60, 10, 92, 42]}]
    >>> s = caption_scores(["a small red circle is left of a large blue square"], [gt])
    >>> s["object_f1"], s["relation_accuracy"]
    (1.0, 1.0)
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COLOUR_WORDS", "RELATION_WORDS", "SHAPE_WORDS", "SIZE_WORDS", "Mention",
           "caption_scores", "parse_mentions", "parse_relations", "relation_holds"]

#: The Scenes vocabulary (:mod:`fam.data.scenes`: COLOURS, SHAPES, SIZES).
COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SHAPE_WORDS = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZE_WORDS = ("small", "large")
#: Relation phrase → (axis, sign): axis 0 = x, 1 = y (image rows grow downwards);
#: "A left of B" means ``sign · (centre_A − centre_B) > 0`` along the axis.
RELATION_WORDS: dict[str, tuple[int, int]] = {
    "left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}

_WORD = re.compile(r"[a-z]+")
_PLURAL = {s + "s": s for s in SHAPE_WORDS} | {"crosses": "cross"}


@dataclass(frozen=True)
class Mention:
    """An object mentioned in a caption: ``shape`` with optional ``colour`` and ``size``;
    ``start``/``end`` are word indices of the phrase (end exclusive)."""

    shape: str
    colour: str | None
    size: str | None
    start: int
    end: int


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def parse_mentions(text: str) -> list[Mention]:
    """The object mentions of a caption, in order (module docstring grammar)."""
    words = _words(text)
    out: list[Mention] = []
    for i, w in enumerate(words):
        shape = w if w in SHAPE_WORDS else _PLURAL.get(w)
        if shape is None:
            continue
        colour = size = None
        j = i - 1
        # at most a colour and a size before the shape, in either order
        while j >= 0 and i - j <= 2:
            if words[j] in COLOUR_WORDS and colour is None:
                colour = words[j]
            elif words[j] in SIZE_WORDS and size is None:
                size = words[j]
            else:
                break
            j -= 1
        out.append(Mention(shape, colour, size, j + 1, i + 1))
    return out


def parse_relations(text: str, mentions: Sequence[Mention] | None = None,
                    ) -> list[tuple[int, str, int]]:
    """Stated relations ``(mention a, phrase, mention b)``: a relation phrase standing
    between two consecutive mentions, e.g. "a red circle **is left of** a blue square"."""
    words = _words(text)
    mentions = parse_mentions(text) if mentions is None else list(mentions)
    out = []
    for a in range(len(mentions) - 1):
        gap = " ".join(words[mentions[a].end:mentions[a + 1].start])
        for phrase in RELATION_WORDS:
            if re.search(rf"\b{phrase}\b", gap):
                out.append((a, phrase, a + 1))
                break
    return out


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def relation_holds(phrase: str, box_a: Sequence[float], box_b: Sequence[float]) -> bool:
    """Whether "A <phrase> B" is true of two ``[x0, y0, x1, y1]`` boxes (centre offsets)."""
    axis, sign = RELATION_WORDS[phrase]
    d = _centre(box_a)[axis] - _centre(box_b)[axis]
    return sign * d > 0


def _match(mentions: Sequence[Mention], objects: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Mention index → object index: each object matched at most once, same colour and
    shape; among equal candidates the one with the same size is preferred."""
    used: set[int] = set()
    out: dict[int, int] = {}
    for mi, m in enumerate(mentions):
        if m.colour is None:
            continue
        cands = [oi for oi, o in enumerate(objects) if oi not in used
                 and o["colour"] == m.colour and o["shape"] == m.shape]
        if not cands:
            continue
        same = [oi for oi in cands if objects[oi].get("size") == m.size]
        oi = (same or cands)[0]
        used.add(oi)
        out[mi] = oi
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def caption_scores(captions: Sequence[str], objects: Sequence[Sequence[Mapping[str, Any]]],
                   references: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Scenes caption quality of generated captions (module docstring).

    Args:
        captions: generated captions, one per image.
        objects: per image, its ground-truth objects: ``{colour, shape, size, box}``
            (the PAD region ``attributes`` plus ``box``).
        references: per image, reference captions for BLEU-4 (optional).

    Returns:
        Micro-averaged ``object_precision``, ``object_recall``, ``object_f1``,
        ``colour_recall``, ``shape_recall``, ``size_accuracy``, ``count_accuracy``,
        ``relation_accuracy`` (NaN when no relation is stated), ``relations_stated``,
        ``bleu4`` (0–100; only with references), ``n``, and ``per_caption`` object-F1
        values (for paired statistics).
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} object lists")
    if references is not None and len(references) != len(captions):
        raise ValueError(f"{len(references)} reference lists for {len(captions)} captions")
    n_ment = n_obj = n_match = 0
    col_hit = col_tot = shp_hit = shp_tot = 0
    size_ok = size_tot = count_ok = 0
    rel_ok = rel_tot = 0
    per_caption = []
    for text, objs in zip(captions, objects):
        ments = parse_mentions(text)
        match = _match(ments, objs)
        n_ment += len(ments)
        n_obj += len(objs)
        n_match += len(match)
        words = set(_words(text)) | {_PLURAL[w] for w in _words(text) if w in _PLURAL}
        colours = {o["colour"] for o in objs}
        shapes = {o["shape"] for o in objs}
        col_tot += len(colours)
        col_hit += len(colours & words)
        shp_tot += len(shapes)
        shp_hit += len(shapes & words)
        for mi, oi in match.items():
            if ments[mi].size is not None:
                size_tot += 1
                size_ok += ments[mi].size == objs[oi].get("size")
        count_ok += len(ments) == len(objs)
        for a, phrase, b in parse_relations(text, ments):
            rel_tot += 1
            if a in match and b in match:
                rel_ok += relation_holds(phrase, objs[match[a]]["box"], objs[match[b]]["box"])
        p = _ratio(len(match), len(ments)) if ments else 0.0
        r = _ratio(len(match), len(objs))
        per_caption.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
    prec = _ratio(n_match, n_ment) if n_ment else 0.0
    rec = _ratio(n_match, n_obj)
    out: dict[str, Any] = {
        "object_precision": prec, "object_recall": rec,
        "object_f1": 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0,
        "colour_recall": _ratio(col_hit, col_tot), "shape_recall": _ratio(shp_hit, shp_tot),
        "size_accuracy": _ratio(size_ok, size_tot),
        "count_accuracy": _ratio(count_ok, len(captions)),
        "relation_accuracy": _ratio(rel_ok, rel_tot), "relations_stated": rel_tot,
        "n": len(captions), "per_caption": per_caption}
    if references is not None:
        out["bleu4"] = bleu4(captions, references)
    return out


def bleu4(captions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0–100) with sacrebleu's standard tokenisation (13a)."""
    import sacrebleu
    if not captions:
        return float("nan")
    k = max(len(r) for r in references)
    if k == 0 or any(len(r) == 0 for r in references):
        raise ValueError("every caption needs at least one reference")
    # sacrebleu wants k reference streams of equal length: repeat the last reference
    streams = [[r[min(j, len(r) - 1)] for r in references] for j in range(k)]
    score = sacrebleu.corpus_bleu(list(captions), streams).score
    return float(score) if math.isfinite(score) else float("nan")
