"""Scene descriptions: objects, relations, captions and referring expressions.

Geometry conventions: boxes are ``[x0, y0, x1, y1]`` in pixels with an exclusive end
(``x1 - x0`` is the width), like :func:`fam.data.rle.rle_to_bbox`. Relations compare
object centres: ``a`` is "left of" ``b`` when ``cx_a <= cx_b - relation_margin``; offsets
in ``[margin/2, margin)`` are treated as ambiguous and never used in any text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fam.config.scenes import ScenesConfig

REL_WORDS = {(0, -1): "left of", (0, 1): "right of", (1, -1): "above", (1, 1): "below"}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``box`` is its placement square ``[x0, y0, x1, y1)`` in pixels."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        """Class label, e.g. ``"red circle"`` (the PAD region label)."""
        return f"{self.colour} {self.shape}"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Scene:
    """A scene description; pixels come from :func:`render_scene`.

    Attributes:
        id: file stem, e.g. ``"tr00012"`` or ``"ev00003-swap"`` (a counterfactual).
        split: ``"train"`` or ``"eval"`` (the image folder).
        pool: ``"train" | "eval" | "novel" | "crowded" | "striped"``.
        style: ``"plain"`` or ``"striped"`` background.
        background: grey level of the background.
        objects: the objects, in drawing order.
        expressions: a referring expression per object, unique within the scene.
        caption_order: object order in the caption.
        caption_relation: ``(i, j, axis)``: the caption states object i's relation to
            object j along axis 0 (x) or 1 (y); ``None`` for one-object scenes.
        caption: whole-image caption with all attributes and one relation.
        blip_caption: shorter caption without sizes or relations.
        counterfactuals: hard-negative variants (each differs in one binding, the
            relation, or one attribute); empty for counterfactuals themselves.
    """

    id: str
    split: str
    pool: str
    style: str
    background: int
    objects: tuple[SceneObject, ...]
    expressions: tuple[str, ...]
    caption_order: tuple[int, ...]
    caption_relation: tuple[int, int, int] | None
    caption: str
    blip_caption: str
    counterfactuals: tuple["Scene", ...] = ()

    @property
    def image_path(self) -> str:
        """Image path relative to the output directory (the image root)."""
        return f"images/{self.split}/{self.id}.png"

    def crop_path(self, k: int) -> str:
        """Relative path of object ``k``'s crop."""
        return f"crops/{self.split}/{self.id}_{k}.png"

    @property
    def multiset(self) -> tuple[tuple[str, str, str], ...]:
        """Sorted (size, colour, shape) of all objects: equal multisets = same caption truth."""
        return tuple(sorted((o.size, o.colour, o.shape) for o in self.objects))


def relation(a: SceneObject, b: SceneObject, axis: int, margin: float) -> str | None:
    """Clear relation of ``a`` to ``b`` along ``axis`` (0: x, 1: y), or ``None``.

    Returns ``"left of"``/``"right of"`` (axis 0) or ``"above"``/``"below"`` (axis 1)
    when the centres differ by at least ``margin`` pixels.
    """
    d = a.centre[axis] - b.centre[axis]
    if d <= -margin:
        return REL_WORDS[(axis, -1)]
    if d >= margin:
        return REL_WORDS[(axis, 1)]
    return None


def ambiguous(a: SceneObject, b: SceneObject, axis: int, margin: float) -> bool:
    """Offsets in [margin/2, margin) could be read either way; such pairs are avoided."""
    d = abs(a.centre[axis] - b.centre[axis])
    return margin / 2.0 <= d < margin


def join_words(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def article(o: SceneObject) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def caption_text(objs: Sequence[SceneObject], order: Sequence[int],
                  rel: tuple[int, int, int] | None, margin: float) -> str:
    if rel is None:
        head, rest = article(objs[order[0]]), list(order[1:])
    else:
        i, j, axis = rel
        r = relation(objs[i], objs[j], axis, margin)
        if r is None:  # the plan guarantees a clear relation; mirroring keeps it clear
            raise AssertionError("caption relation became unclear")
        head, rest = f"{article(objs[i])} is {r} {article(objs[j])}", list(order[2:])
    if rest:
        head += ", with " + join_words([article(objs[k]) for k in rest])
    return head


def relation_phrase(t: int, objs: Sequence[SceneObject], confusers: Sequence[int],
                     rng: np.random.Generator, margin: float) -> str | None:
    """A phrase "left of the blue star" that holds for ``t`` and for no confuser."""
    pair_count = pair_counts(objs)
    options = []
    for a, anchor in enumerate(objs):
        if a == t or pair_count[anchor.pair] != 1:  # anchor must be nameable on its own
            continue
        for axis in (0, 1):
            r = relation(objs[t], anchor, axis, margin)
            if r is None:
                continue
            if all(relation(objs[c], anchor, axis, margin) != r
                   and not ambiguous(objs[c], anchor, axis, margin)
                   for c in confusers if c != t):
                options.append(f"{r} the {anchor.colour} {anchor.shape}")
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


def pair_counts(objs: Sequence[SceneObject]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[o.pair] = counts.get(o.pair, 0) + 1
    return counts


def expressions(objs: Sequence[SceneObject], rng: np.random.Generator,
                 cfg: ScenesConfig) -> list[str] | None:
    """Shortest unique referring expression per object, or ``None`` if one has none.

    Order of preference: "the red circle" (unique colour-shape), "the large red circle"
    (unique with size), "the red circle left of the blue star" (relation to a uniquely
    named anchor). With probability ``p_relation_expression`` a relation is added even
    when not needed, so that relational grounding is also trained on easy scenes.
    """
    out = []
    pair_count = pair_counts(objs)
    for t, o in enumerate(objs):
        base = f"the {o.colour} {o.shape}"
        confusers = [c for c, oc in enumerate(objs) if oc.pair == o.pair]
        if pair_count[o.pair] == 1:
            expr = base
            if len(objs) > 1 and rng.random() < cfg.p_relation_expression:
                phrase = relation_phrase(t, objs, confusers, rng, cfg.relation_margin)
                if phrase:
                    expr = f"{base} {phrase}"
        elif sum(oc.pair == o.pair and oc.size == o.size for oc in objs) == 1:
            expr = f"the {o.size} {o.colour} {o.shape}"
        else:
            phrase = relation_phrase(t, objs, confusers, rng, cfg.relation_margin)
            if phrase is None:
                return None
            expr = f"{base} {phrase}"
        out.append(expr)
    return out


def caption_plan(objs: Sequence[SceneObject], rng: np.random.Generator,
                  margin: float) -> tuple[tuple[int, ...], tuple[int, int, int] | None] | None:
    """Pick the caption's object order and its relation (between two uniquely named objects)."""
    n = len(objs)
    if n == 1:
        return (0,), None
    pair_count = pair_counts(objs)
    unique = [i for i in range(n) if pair_count[objs[i].pair] == 1]
    options = [(i, j, axis) for i in unique for j in unique if i != j for axis in (0, 1)
               if relation(objs[i], objs[j], axis, margin) is not None]
    if not options:
        return None
    i, j, axis = options[int(rng.integers(len(options)))]
    rest = [k for k in range(n) if k not in (i, j)]
    rest = [rest[k] for k in rng.permutation(len(rest))]
    return (i, j, *rest), (i, j, axis)


def describe(sid: str, split: str, pool: str, style: str, background: int,
              objs: Sequence[SceneObject], rng: np.random.Generator, cfg: ScenesConfig,
              plan: tuple[tuple[int, ...], tuple[int, int, int] | None] | None = None
              ) -> Scene | None:
    """Attach expressions and captions; ``None`` if the scene cannot be described uniquely."""
    exprs = expressions(objs, rng, cfg)
    if exprs is None:
        return None
    if plan is None:
        plan = caption_plan(objs, rng, cfg.relation_margin)
        if plan is None:
            return None
    order, rel = plan
    caption = caption_text(objs, order, rel, cfg.relation_margin)
    blip = "a picture of " + join_words([f"a {objs[k].colour} {objs[k].shape}" for k in order])
    return Scene(sid, split, pool, style, background, tuple(objs), tuple(exprs),
                 tuple(order), rel, caption, blip)
