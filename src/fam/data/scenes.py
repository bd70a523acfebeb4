"""The built-in "Scenes" benchmark: procedurally drawn multi-object scenes in MMEB format.

No real data set can be downloaded here, so fam ships a generator for a small benchmark
on which a tiny VLM trains and evaluates on a CPU in minutes. One-object scenes are too
easy (a 1.4 M-parameter Qwen2-VL reaches 97%), so scenes hold 1-4 objects (shape, colour,
size, position) and the tasks need *attribute binding* ("red circle and blue square" vs
"blue circle and red square"), *relations* ("left of") and *hard negatives*:

* counterfactual scenes, re-rendered with two objects' colours swapped, the layout
  mirrored (flipping the caption's relation) or one attribute changed; they are the hard
  negative images (text-to-image) and captions (image-to-text);
* crops of other objects of the same image (grounding);
* labels of objects that are present but not the answer (classification, VQA).

Out of distribution (OOD, eval only): colour x shape pairs held out of every training
image (``"novel"`` pool), more objects than any training image (``"crowded"``), and a
striped background never drawn in training (``"striped"``).

Everything is deterministic in ``ScenesConfig.seed``: each pool and each data set draws
from its own ``numpy`` stream ``default_rng([seed, stream])``, so resizing one pool does
not change another. The output layout is a contract (see :func:`generate_scenes`).

Geometry conventions: boxes are ``[x0, y0, x1, y1]`` in pixels with an exclusive end
(``x1 - x0`` is the width), like :func:`fam.data.rle.rle_to_bbox`. Relations compare
object centres: ``a`` is "left of" ``b`` when ``cx_a <= cx_b - relation_margin``; offsets
in ``[margin/2, margin)`` are treated as ambiguous and never used in any text.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from fam.data.rle import rle_encode
from fam.data.types import IMAGE_PLACEHOLDER
from fam.errors import ConfigError
from fam.config.scenes import (COLOURS, DEFAULT_HELDOUT_PAIRS, NUMBER_WORDS, SHAPES, SIZES,
                               ScenesConfig)
from fam.utils.io import atomic_write_json, write_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "NUMBER_WORDS", "DEFAULT_HELDOUT_PAIRS", "TRAIN_FIELDS",
    "EVAL_FIELDS", "ScenesConfig", "SceneObject", "Scene", "generate_scenes",
    "render_scene", "crop_window", "relation", "dataset_specs", "DatasetSpec",
]

#: Exact field sets of MMEB training and eval rows.
TRAIN_FIELDS: tuple[str, ...] = ("qry", "qry_image_path", "pos_text", "pos_image_path",
                                 "neg_text", "neg_image_path")
EVAL_FIELDS: tuple[str, ...] = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

_P = IMAGE_PLACEHOLDER
_IMG_TGT = f"{_P}\nRepresent the given image."
_CROP_TGT = f"{_P}\nRepresent the given cropped image of the object."
_REL_WORDS = {(0, -1): "left of", (0, 1): "right of", (1, -1): "above", (1, 1): "below"}
_EDGE = 2  # px kept free at the image border so no object touches it

# Random streams (spawn keys of default_rng([seed, key])); fixed numbers so adding a
# data set or resizing a pool never changes another's draws.
_POOL_STREAMS = {"train": 1, "eval": 2, "novel": 3, "crowded": 4, "striped": 5}
_DATASET_STREAM_BASE = 100


# --------------------------------------------------------------------------- scenes


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
        return _REL_WORDS[(axis, -1)]
    if d >= margin:
        return _REL_WORDS[(axis, 1)]
    return None


def _ambiguous(a: SceneObject, b: SceneObject, axis: int, margin: float) -> bool:
    """Offsets in [margin/2, margin) could be read either way; such pairs are avoided."""
    d = abs(a.centre[axis] - b.centre[axis])
    return margin / 2.0 <= d < margin


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(o: SceneObject) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def _caption_text(objs: Sequence[SceneObject], order: Sequence[int],
                  rel: tuple[int, int, int] | None, margin: float) -> str:
    if rel is None:
        head, rest = _article(objs[order[0]]), list(order[1:])
    else:
        i, j, axis = rel
        r = relation(objs[i], objs[j], axis, margin)
        if r is None:  # the plan guarantees a clear relation; mirroring keeps it clear
            raise AssertionError("caption relation became unclear")
        head, rest = f"{_article(objs[i])} is {r} {_article(objs[j])}", list(order[2:])
    if rest:
        head += ", with " + _join([_article(objs[k]) for k in rest])
    return head


def _relation_phrase(t: int, objs: Sequence[SceneObject], confusers: Sequence[int],
                     rng: np.random.Generator, margin: float) -> str | None:
    """A phrase "left of the blue star" that holds for ``t`` and for no confuser."""
    pair_count = _pair_counts(objs)
    options = []
    for a, anchor in enumerate(objs):
        if a == t or pair_count[anchor.pair] != 1:  # anchor must be nameable on its own
            continue
        for axis in (0, 1):
            r = relation(objs[t], anchor, axis, margin)
            if r is None:
                continue
            if all(relation(objs[c], anchor, axis, margin) != r
                   and not _ambiguous(objs[c], anchor, axis, margin)
                   for c in confusers if c != t):
                options.append(f"{r} the {anchor.colour} {anchor.shape}")
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


def _pair_counts(objs: Sequence[SceneObject]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[o.pair] = counts.get(o.pair, 0) + 1
    return counts


def _expressions(objs: Sequence[SceneObject], rng: np.random.Generator,
                 cfg: ScenesConfig) -> list[str] | None:
    """Shortest unique referring expression per object, or ``None`` if one has none.

    Order of preference: "the red circle" (unique colour-shape), "the large red circle"
    (unique with size), "the red circle left of the blue star" (relation to a uniquely
    named anchor). With probability ``p_relation_expression`` a relation is added even
    when not needed, so that relational grounding is also trained on easy scenes.
    """
    out = []
    pair_count = _pair_counts(objs)
    for t, o in enumerate(objs):
        base = f"the {o.colour} {o.shape}"
        confusers = [c for c, oc in enumerate(objs) if oc.pair == o.pair]
        if pair_count[o.pair] == 1:
            expr = base
            if len(objs) > 1 and rng.random() < cfg.p_relation_expression:
                phrase = _relation_phrase(t, objs, confusers, rng, cfg.relation_margin)
                if phrase:
                    expr = f"{base} {phrase}"
        elif sum(oc.pair == o.pair and oc.size == o.size for oc in objs) == 1:
            expr = f"the {o.size} {o.colour} {o.shape}"
        else:
            phrase = _relation_phrase(t, objs, confusers, rng, cfg.relation_margin)
            if phrase is None:
                return None
            expr = f"{base} {phrase}"
        out.append(expr)
    return out


def _caption_plan(objs: Sequence[SceneObject], rng: np.random.Generator,
                  margin: float) -> tuple[tuple[int, ...], tuple[int, int, int] | None] | None:
    """Pick the caption's object order and its relation (between two uniquely named objects)."""
    n = len(objs)
    if n == 1:
        return (0,), None
    pair_count = _pair_counts(objs)
    unique = [i for i in range(n) if pair_count[objs[i].pair] == 1]
    options = [(i, j, axis) for i in unique for j in unique if i != j for axis in (0, 1)
               if relation(objs[i], objs[j], axis, margin) is not None]
    if not options:
        return None
    i, j, axis = options[int(rng.integers(len(options)))]
    rest = [k for k in range(n) if k not in (i, j)]
    rest = [rest[k] for k in rng.permutation(len(rest))]
    return (i, j, *rest), (i, j, axis)


def _finalise(sid: str, split: str, pool: str, style: str, background: int,
              objs: Sequence[SceneObject], rng: np.random.Generator, cfg: ScenesConfig,
              plan: tuple[tuple[int, ...], tuple[int, int, int] | None] | None = None
              ) -> Scene | None:
    """Attach expressions and captions; ``None`` if the scene cannot be described uniquely."""
    exprs = _expressions(objs, rng, cfg)
    if exprs is None:
        return None
    if plan is None:
        plan = _caption_plan(objs, rng, cfg.relation_margin)
        if plan is None:
            return None
    order, rel = plan
    caption = _caption_text(objs, order, rel, cfg.relation_margin)
    blip = "a picture of " + _join([f"a {objs[k].colour} {objs[k].shape}" for k in order])
    return Scene(sid, split, pool, style, background, tuple(objs), tuple(exprs),
                 tuple(order), rel, caption, blip)


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
            or b[3] + gap <= a[1])


def _sample_objects(rng: np.random.Generator, cfg: ScenesConfig, pool: str
                    ) -> list[SceneObject] | None:
    heldout = set(cfg.heldout_pairs)
    colours, shapes = list(COLOURS), list(SHAPES)
    n = cfg.ood_n_objects if pool == "crowded" else int(
        rng.integers(cfg.min_objects, cfg.max_objects + 1))
    specs: list[tuple[str, str, str]] = []
    for k in range(n):
        if pool == "novel" and k == 0:
            # The novel object is the one large object, so it is also the "largest".
            colour, shape = cfg.heldout_pairs[int(rng.integers(len(cfg.heldout_pairs)))]
            specs.append((colour, shape, "large"))
            continue
        for _ in range(100):
            # Reusing an existing colour / shape creates binding confusers.
            if specs and rng.random() < cfg.p_share_attribute:
                colour = specs[int(rng.integers(len(specs)))][0]
            else:
                colour = colours[int(rng.integers(len(colours)))]
            if specs and rng.random() < cfg.p_share_attribute:
                shape = specs[int(rng.integers(len(specs)))][1]
            else:
                shape = shapes[int(rng.integers(len(shapes)))]
            if (colour, shape) not in heldout:
                break
        else:
            return None
        if pool == "novel":
            size = "small"
        else:
            size = "large" if rng.random() < cfg.p_large else "small"
        specs.append((colour, shape, size))
    W = cfg.image_size
    boxes: list[tuple[int, int, int, int] | None] = [None] * n
    placed: list[tuple[int, int, int, int]] = []
    # Place large objects first: they are the hard ones to fit.
    for i in sorted(range(n), key=lambda i: specs[i][2] != "large"):
        s = cfg.large_size if specs[i][2] == "large" else cfg.small_size
        for _ in range(200):
            x0 = int(rng.integers(_EDGE, W - s - _EDGE + 1))
            y0 = int(rng.integers(_EDGE, W - s - _EDGE + 1))
            box = (x0, y0, x0 + s, y0 + s)
            if all(_separated(box, b, cfg.min_gap) for b in placed):
                break
        else:
            return None
        boxes[i] = box
        placed.append(box)
    return [SceneObject(shape, colour, size, boxes[i])  # type: ignore[arg-type]
            for i, (colour, shape, size) in enumerate(specs)]


def _counterfactuals(base: Scene, rng: np.random.Generator, cfg: ScenesConfig) -> list[Scene]:
    """Hard-negative variants of ``base``: colour swap, mirrored layout, one attribute.

    Each keeps the caption plan, so its caption differs from the original in exactly the
    changed binding / relation / attribute and is false for the original image (and the
    original caption false for it): a swap of two objects that differ in colour *and*
    shape, or a changed attribute, changes the multiset of (colour, shape) pairs; the
    mirror flips a relation between two uniquely named objects. Variants of training and
    IND scenes never contain a held-out pair.
    """
    objs = list(base.objects)
    heldout = set(cfg.heldout_pairs)
    keep_heldout_out = base.pool != "novel"
    plan = (base.caption_order, base.caption_relation)
    W = cfg.image_size

    def ok(new: list[SceneObject]) -> bool:
        return not (keep_heldout_out and any(o.pair in heldout for o in new))

    def make(kind: str, new: list[SceneObject]) -> Scene | None:
        sc = _finalise(f"{base.id}-{kind}", base.split, base.pool, base.style,
                       base.background, new, rng, cfg, plan)
        if sc is None or sc.caption == base.caption:
            return None
        return sc

    out: list[Scene] = []
    pairs = [(a, b) for a in range(len(objs)) for b in range(a + 1, len(objs))
             if objs[a].colour != objs[b].colour and objs[a].shape != objs[b].shape]
    for p in rng.permutation(len(pairs)):
        a, b = pairs[p]
        new = list(objs)
        new[a] = dataclasses.replace(objs[a], colour=objs[b].colour)
        new[b] = dataclasses.replace(objs[b], colour=objs[a].colour)
        sc = make("swap", new) if ok(new) else None
        if sc is not None:
            out.append(sc)
            break
    if base.caption_relation is not None:
        axis = base.caption_relation[2]

        def mirror(o: SceneObject) -> SceneObject:
            x0, y0, x1, y1 = o.box
            box = (W - x1, y0, W - x0, y1) if axis == 0 else (x0, W - y1, x1, W - y0)
            return dataclasses.replace(o, box=box)

        sc = make("mirror", [mirror(o) for o in objs])
        if sc is not None:
            out.append(sc)
    for _ in range(20):
        k = int(rng.integers(len(objs)))
        new = list(objs)
        if rng.random() < 0.5:
            choices = [c for c in COLOURS if c != objs[k].colour]
            new[k] = dataclasses.replace(objs[k], colour=choices[int(rng.integers(len(choices)))])
        else:
            choices = [s for s in SHAPES if s != objs[k].shape]
            new[k] = dataclasses.replace(objs[k], shape=choices[int(rng.integers(len(choices)))])
        sc = make("attr", new) if ok(new) else None
        if sc is not None:
            out.append(sc)
            break
    return out


_POOL_PREFIX = {"train": "tr", "eval": "ev", "novel": "nv", "crowded": "cw", "striped": "st"}


def _sample_pool(cfg: ScenesConfig, pool: str, n: int) -> list[Scene]:
    """Draw ``n`` scenes of one pool from its own random stream."""
    rng = np.random.default_rng([cfg.seed, _POOL_STREAMS[pool]])
    split = "train" if pool == "train" else "eval"
    style = "striped" if pool == "striped" else "plain"
    scenes = []
    for i in range(n):
        sid = f"{_POOL_PREFIX[pool]}{i:05d}"
        for _attempt in range(1000):
            objs = _sample_objects(rng, cfg, pool)
            if objs is None:
                continue
            bg = int(rng.integers(45, 96))
            sc = _finalise(sid, split, pool, style, bg, objs, rng, cfg)
            if sc is not None:
                break
        else:
            raise ConfigError(f"could not place {pool} scene {sid} after 1000 attempts; "
                              "lower large_size / ood_n_objects or raise image_size")
        scenes.append(dataclasses.replace(sc, counterfactuals=tuple(
            _counterfactuals(sc, rng, cfg))))
    return scenes


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str, s: int) -> np.ndarray:
    """``(s, s)`` boolean mask of a shape filling an ``s``-px square (no anti-aliasing).

    Cached (there are only ``len(SHAPES) * 2`` distinct masks); the result is read-only.
    """
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    e = s - 1  # last pixel index
    c = e / 2.0
    if shape == "circle":
        d.ellipse([0, 0, e, e], fill=255)
    elif shape == "square":
        m = round(0.1 * s)  # a square filling its box looks bigger than a circle
        d.rectangle([m, m, e - m, e - m], fill=255)
    elif shape == "triangle":
        d.polygon([(c, 0), (e, e), (0, e)], fill=255)
    elif shape == "diamond":
        d.polygon([(c, 0), (e, c), (c, e), (0, c)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = c if k % 2 == 0 else 0.45 * c
            ang = np.deg2rad(-90 + 36 * k)
            pts.append((c + r * np.cos(ang), c + r * np.sin(ang)))
        d.polygon(pts, fill=255)
    elif shape == "cross":
        th = max(2, round(0.36 * s))
        a = (s - th) // 2
        d.rectangle([a, 0, a + th - 1, e], fill=255)
        d.rectangle([0, a, e, a + th - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask = np.asarray(im) > 0
    mask.setflags(write=False)
    return mask


def render_scene(scene: Scene, image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene.

    Args:
        scene: the scene description.
        image_size: side in pixels.

    Returns:
        ``(image, masks)``: ``image`` is ``(H, W, 3)`` uint8 RGB; ``masks[k]`` is the
        ``(H, W)`` boolean mask of object ``k``. Objects never overlap, so every mask
        pixel has exactly the object's colour.
    """
    W = image_size
    bg = scene.background
    if scene.style == "striped":
        yy, xx = np.mgrid[0:W, 0:W]
        stripes = ((xx + yy) // 4) % 2 == 0  # thin diagonal stripes: a texture never in training
        grey = np.where(stripes, bg + 22, bg - 22).astype(np.uint8)
        img = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        img = np.full((W, W, 3), bg, dtype=np.uint8)
    masks = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        m = np.zeros((W, W), dtype=bool)
        m[y0:y1, x0:x1] = _shape_mask(o.shape, x1 - x0)
        img[m] = COLOURS[o.colour]
        masks.append(m)
    return img, masks


def crop_window(box: Sequence[int], image_size: int, crop_size: int) -> tuple[int, int, int, int]:
    """Square grounding-crop window ``[x0, y0, x1, y1)`` centred on ``box``, inside the image.

    A fixed window (not a box resized to a fixed size) keeps the object's absolute size,
    which referring expressions ("the large red circle") depend on, and a little context.
    """
    cx = (box[0] + box[2]) // 2
    cy = (box[1] + box[3]) // 2
    x0 = min(max(cx - crop_size // 2, 0), image_size - crop_size)
    y0 = min(max(cy - crop_size // 2, 0), image_size - crop_size)
    return (x0, y0, x0 + crop_size, y0 + crop_size)


def _tight_box(mask: np.ndarray) -> list[int]:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


# --------------------------------------------------------------------------- tasks

Cand = tuple[str, str, "Scene | None"]  # (text, image path, scene to render for that path)


@dataclass
class _Item:
    """One query with its positive and hard negatives, before becoming a row."""

    scene: Scene
    qry_text: str
    qry_img: str
    pos: Cand
    hard: list[Cand]
    target: int | None = None  # object index, for tasks about one object


@dataclass
class _Ctx:
    """What a task needs beyond one scene: the pool and the label vocabulary."""

    cfg: ScenesConfig
    pool: list[Scene]
    labels: list[str]
    _crops: list[tuple[Scene, int]] | None = None

    @property
    def crops(self) -> list[tuple[Scene, int]]:
        if self._crops is None:
            self._crops = [(sc, k) for sc in self.pool for k in range(len(sc.objects))]
        return self._crops


def _t(text: str) -> Cand:
    return (text, "", None)


def _shuffled(rng: np.random.Generator, xs: Sequence[Any]) -> list[Any]:
    return [xs[i] for i in rng.permutation(len(xs))]


def _dominant(sc: Scene) -> int | None:
    """The largest object: the only one, or the single large one among several."""
    if len(sc.objects) == 1:
        return 0
    large = [k for k, o in enumerate(sc.objects) if o.size == "large"]
    return large[0] if len(large) == 1 else None


def _items_dominant(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    k = _dominant(sc)
    if k is None:
        return []
    o = sc.objects[k]
    present = _shuffled(rng, sorted({x.label for x in sc.objects} - {o.label}))
    swaps = [f"{c} {o.shape}" for c in COLOURS if c != o.colour]
    swaps += [f"{o.colour} {s}" for s in SHAPES if s != o.shape]
    swaps = [s for s in _shuffled(rng, swaps) if s in ctx.labels][:4]
    qry = f"{_P}\nRepresent the given image for classification by its largest object."
    return [_Item(sc, qry, sc.image_path, _t(o.label), [_t(x) for x in present + swaps], k)]


def _items_count(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    n = len(sc.objects)
    near = [NUMBER_WORDS[m - 1] for m in (n - 1, n + 1) if 1 <= m <= len(NUMBER_WORDS)]
    qry = f"{_P}\nRepresent the given image for counting its objects."
    return [_Item(sc, qry, sc.image_path, _t(_count_text(NUMBER_WORDS[n - 1])),
                  [_t(_count_text(w)) for w in _shuffled(rng, near)])]


def _count_text(w: str) -> str:
    return w + (" object" if w == "one" else " objects")


def _colour_questions(sc: Scene) -> list[tuple[int, str, str]]:
    """(object, question, answer) for objects nameable without their colour."""
    out = []
    objs = sc.objects
    for k, o in enumerate(objs):
        if sum(x.shape == o.shape for x in objs) == 1:
            desc = f"the {o.shape}"
        elif sum(x.shape == o.shape and x.size == o.size for x in objs) == 1:
            desc = f"the {o.size} {o.shape}"
        else:
            continue
        out.append((k, f"What colour is {desc}?", o.colour))
    return out


def _relation_questions(sc: Scene, margin: float) -> list[tuple[int, str, str]]:
    """(answer object, question, answer) for "What is left of the red circle?" questions.

    Asked only when exactly one object stands in the relation and no object is in the
    ambiguous band, so the answer is unambiguous.
    """
    objs = sc.objects
    pair_count = _pair_counts(objs)
    out = []
    for r, ref in enumerate(objs):
        if pair_count[ref.pair] == 1:
            desc = f"the {ref.colour} {ref.shape}"
        elif sum(x.pair == ref.pair and x.size == ref.size for x in objs) == 1:
            desc = f"the {ref.size} {ref.colour} {ref.shape}"
        else:
            continue
        for (axis, sign), word in _REL_WORDS.items():
            others = [k for k in range(len(objs)) if k != r]
            if any(_ambiguous(objs[k], ref, axis, margin) for k in others):
                continue
            hits = [k for k in others if relation(objs[k], ref, axis, margin) == word]
            if len(hits) == 1:
                out.append((hits[0], f"What is {word} {desc}?", objs[hits[0]].label))
    return out


_VQA_PREFIX = f"{_P}\nRepresent the given image with the following question: "


def _items_vqa_colour(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    items = []
    for k, q, a in _colour_questions(sc):
        present = _shuffled(rng, sorted({o.colour for o in sc.objects} - {a}))
        items.append(_Item(sc, _VQA_PREFIX + q, sc.image_path, _t(a),
                           [_t(c) for c in present], k))
    return items


def _items_vqa_relation(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    items = []
    for k, q, a in _relation_questions(sc, ctx.cfg.relation_margin):
        present = _shuffled(rng, sorted({o.label for o in sc.objects} - {a}))
        items.append(_Item(sc, _VQA_PREFIX + q, sc.image_path, _t(a),
                           [_t(x) for x in present], k))
    return items


def _items_t2i(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    qry = f"Find me an everyday image that matches the given caption: {sc.caption}"
    hard = [(_IMG_TGT, cf.image_path, cf) for cf in _shuffled(rng, sc.counterfactuals)]
    return [_Item(sc, qry, "", (_IMG_TGT, sc.image_path, None), hard)]


def _items_i2t(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    qry = f"{_P}\nFind an image caption describing the given everyday image."
    hard = [_t(cf.caption) for cf in _shuffled(rng, sc.counterfactuals)]
    return [_Item(sc, qry, sc.image_path, _t(sc.caption), hard)]


def _items_grounding(sc: Scene, rng: np.random.Generator, ctx: _Ctx) -> list[_Item]:
    items = []
    objs = sc.objects
    for k, o in enumerate(objs):
        others = [j for j in range(len(objs)) if j != k]
        # Most confusable first: same colour and shape, then one shared attribute.
        others.sort(key=lambda j: -((objs[j].colour == o.colour) + (objs[j].shape == o.shape)
                                    + 0.5 * (objs[j].size == o.size)))
        qry = (f"{_P}\nSelect the portion of the image that isolates the object labeled "
               f"as \"{sc.expressions[k]}\"")
        items.append(_Item(sc, qry, sc.image_path, (_CROP_TGT, sc.crop_path(k), None),
                           [(_CROP_TGT, sc.crop_path(j), None) for j in others], k))
    return items


def _random_from(rng: np.random.Generator, xs: Sequence[Any], k: int,
                 accept: Callable[[Any], bool]) -> list[Any]:
    out = []
    for i in rng.permutation(len(xs)):
        if len(out) >= k:
            break
        if accept(xs[i]):
            out.append(xs[i])
    return out


def _rand_labels(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    return [_t(x) for x in _random_from(rng, ctx.labels, k, lambda x: (x, "") not in seen)]


def _rand_counts(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    words = [_count_text(w) for w in NUMBER_WORDS]
    return [_t(x) for x in _random_from(rng, words, k, lambda x: (x, "") not in seen)]


def _rand_colours(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                  seen: set[tuple[str, str]]) -> list[Cand]:
    return [_t(x) for x in _random_from(rng, list(COLOURS), k, lambda x: (x, "") not in seen)]


def _rand_images(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    # A random image is a valid negative only if the caption is false for it: captions
    # list every object with all attributes, so a different multiset suffices.
    ms = item.scene.multiset
    got = _random_from(rng, ctx.pool, k, lambda s: s.multiset != ms
                       and (_IMG_TGT, s.image_path) not in seen)
    return [(_IMG_TGT, s.image_path, None) for s in got]


def _rand_captions(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                   seen: set[tuple[str, str]]) -> list[Cand]:
    ms = item.scene.multiset
    out: list[Cand] = []
    texts = {t for t, _ in seen}
    for s in _random_from(rng, ctx.pool, len(ctx.pool), lambda s: s.multiset != ms):
        if len(out) >= k:
            break
        if s.caption not in texts:
            texts.add(s.caption)
            out.append(_t(s.caption))
    return out


def _rand_crops(item: _Item, rng: np.random.Generator, ctx: _Ctx, k: int,
                seen: set[tuple[str, str]]) -> list[Cand]:
    # Crops of other images showing the same colour-shape pair would look like a second
    # correct answer, so they are excluded.
    label = item.scene.objects[item.target].label  # type: ignore[index]
    got = _random_from(rng, ctx.crops, k, lambda sk: sk[0] is not item.scene
                       and sk[0].objects[sk[1]].label != label
                       and (_CROP_TGT, sk[0].crop_path(sk[1])) not in seen)
    return [(_CROP_TGT, s.crop_path(j), None) for s, j in got]


_ItemsFn = Callable[[Scene, np.random.Generator, _Ctx], list[_Item]]
_RandFn = Callable[[_Item, np.random.Generator, _Ctx, int, set], list[Cand]]
_TASKS: dict[str, tuple[_ItemsFn, _RandFn, int | None]] = {
    # task: (items, random candidates, max candidates the task can offer)
    "dominant": (_items_dominant, _rand_labels, None),
    "count": (_items_count, _rand_counts, len(NUMBER_WORDS)),
    "vqa_colour": (_items_vqa_colour, _rand_colours, len(COLOURS)),
    "vqa_relation": (_items_vqa_relation, _rand_labels, None),
    "t2i": (_items_t2i, _rand_images, None),
    "i2t": (_items_i2t, _rand_captions, None),
    "grounding": (_items_grounding, _rand_crops, None),
}


@dataclass(frozen=True)
class DatasetSpec:
    """One Scenes data set: which task, on which pool, and how it is described."""

    name: str
    meta_task: str  # "classification" | "vqa" | "retrieval" | "grounding"
    split: str  # "IND" (train and eval) | "OOD" (eval only)
    task: str  # key of the task (item builder) used
    pool: str  # eval pool; IND data sets also get train rows from the "train" pool
    description: str
    novel_targets_only: bool = False  # keep only rows whose target object is held out


def dataset_specs() -> list[DatasetSpec]:
    """The Scenes data sets, in a fixed order (the order of ``datasets.json``)."""
    return [
        DatasetSpec("Scenes-Dominant", "classification", "IND", "dominant", "eval",
                    "colour-shape label of the largest object (other present objects are "
                    "hard negatives)"),
        DatasetSpec("Scenes-Count", "classification", "IND", "count", "eval",
                    "number of objects (1-4)"),
        DatasetSpec("Scenes-VQA-Colour", "vqa", "IND", "vqa_colour", "eval",
                    "'What colour is the circle?'; colours of other objects are hard "
                    "negatives"),
        DatasetSpec("Scenes-VQA-Relation", "vqa", "IND", "vqa_relation", "eval",
                    "'What is left of the red circle?' answered by a colour-shape label"),
        DatasetSpec("Scenes-T2I", "retrieval", "IND", "t2i", "eval",
                    "caption -> image; counterfactual images (colours swapped, layout "
                    "mirrored, one attribute changed) are hard negatives"),
        DatasetSpec("Scenes-I2T", "retrieval", "IND", "i2t", "eval",
                    "image -> caption; counterfactual captions are hard negatives"),
        DatasetSpec("Scenes-Grounding", "grounding", "IND", "grounding", "eval",
                    "referring expression -> object crop; crops of the other objects of "
                    "the same image are hard negatives"),
        DatasetSpec("Scenes-Dominant-Novel", "classification", "OOD", "dominant", "novel",
                    "largest object has a colour-shape pair held out of training"),
        # Counting is tested OOD on an unseen style with the trained counts (1-4): a
        # "crowded" variant (5 objects) would ask for a label never seen as a positive,
        # which no contrastive model can produce (it stays at chance by construction).
        DatasetSpec("Scenes-Count-Striped", "classification", "OOD", "count", "striped",
                    "counting (1-4 objects) on a striped background never seen in training"),
        DatasetSpec("Scenes-VQA-Colour-Striped", "vqa", "OOD", "vqa_colour", "striped",
                    "colour questions on a striped background never seen in training"),
        DatasetSpec("Scenes-T2I-Novel", "retrieval", "OOD", "t2i", "novel",
                    "caption -> image for scenes with a held-out colour-shape pair"),
        DatasetSpec("Scenes-I2T-Novel", "retrieval", "OOD", "i2t", "novel",
                    "image -> caption for scenes with a held-out colour-shape pair"),
        DatasetSpec("Scenes-Grounding-Novel", "grounding", "OOD", "grounding", "novel",
                    "grounding of objects with a held-out colour-shape pair",
                    novel_targets_only=True),
        DatasetSpec("Scenes-Grounding-Striped", "grounding", "OOD", "grounding", "striped",
                    "grounding on a striped background never seen in training"),
    ]


def _n_candidates(spec: DatasetSpec, cfg: ScenesConfig) -> int:
    cap = _TASKS[spec.task][2]
    return min(cfg.n_candidates, cap) if cap else cfg.n_candidates


def _items_for(spec: DatasetSpec, scenes: list[Scene], rng: np.random.Generator,
               ctx: _Ctx) -> list[_Item]:
    items_fn = _TASKS[spec.task][0]
    heldout = set(ctx.cfg.heldout_pairs)
    out: list[_Item] = []
    for sc in scenes:
        its = items_fn(sc, rng, ctx)
        if spec.novel_targets_only:
            its = [it for it in its if sc.objects[it.target].pair in heldout]  # type: ignore[index]
        if len(its) > ctx.cfg.max_rows_per_image:
            # Cap so that scenes with many objects / questions do not dominate.
            keep = sorted(rng.choice(len(its), ctx.cfg.max_rows_per_image, replace=False))
            its = [its[i] for i in keep]
        out.extend(its)
    return out


def _train_rows(spec: DatasetSpec, items: list[_Item], rng: np.random.Generator, ctx: _Ctx,
                renders: dict[str, Scene]) -> list[dict]:
    rand_fn = _TASKS[spec.task][1]
    rows = []
    for it in items:
        seen = {it.pos[:2]}
        negs = [c for c in it.hard if c[:2] not in seen] or rand_fn(it, rng, ctx, 1, seen)
        neg: Cand = negs[0] if negs else ("", "", None)
        if neg[2] is not None:
            renders.setdefault(neg[2].id, neg[2])
        rows.append({"qry": it.qry_text, "qry_image_path": it.qry_img,
                     "pos_text": it.pos[0], "pos_image_path": it.pos[1],
                     "neg_text": neg[0], "neg_image_path": neg[1]})
    return rows


def _eval_rows(spec: DatasetSpec, items: list[_Item], rng: np.random.Generator, ctx: _Ctx,
               renders: dict[str, Scene], n: int) -> list[dict]:
    rand_fn = _TASKS[spec.task][1]
    if len(items) > ctx.cfg.eval_rows:
        keep = sorted(rng.choice(len(items), ctx.cfg.eval_rows, replace=False))
        items = [items[i] for i in keep]
    rows = []
    for it in items:
        cands: list[Cand] = [it.pos]
        seen = {it.pos[:2]}
        for c in it.hard:
            if len(cands) < n and c[:2] not in seen:
                cands.append(c)
                seen.add(c[:2])
        if len(cands) < n:
            for c in rand_fn(it, rng, ctx, n - len(cands), seen):
                cands.append(c)
                seen.add(c[:2])
        if len(cands) < n:
            raise ConfigError(f"{spec.name}: only {len(cands)} distinct candidates for a "
                              f"row of {it.scene.id}, need n_candidates={n}; raise "
                              "n_eval_images / n_ood_images or lower n_candidates")
        # The positive stays first (MMEB convention); negatives are shuffled so no
        # negative type sits at a fixed position.
        cands = [cands[0]] + _shuffled(rng, cands[1:])
        for c in cands:
            if c[2] is not None:
                renders.setdefault(c[2].id, c[2])
        rows.append({"qry_text": it.qry_text, "qry_img_path": it.qry_img,
                     "tgt_text": [c[0] for c in cands], "tgt_img_path": [c[1] for c in cands]})
    return rows


# --------------------------------------------------------------------------- output


def _qa_pairs(sc: Scene, margin: float) -> list[dict]:
    n = len(sc.objects)
    qa = [{"image": sc.image_path, "question": "How many objects are in the image?",
           "answer": NUMBER_WORDS[n - 1]},
          {"image": sc.image_path, "question": "Describe the image.", "answer": sc.caption}]
    for _, q, a in _colour_questions(sc) + _relation_questions(sc, margin):
        qa.append({"image": sc.image_path, "question": q, "answer": a})
    return qa


def _write_png(arr: np.ndarray, path: Path, level: int) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=level)


def _render_all(scenes: Sequence[Scene], out: Path, cfg: ScenesConfig, with_crops: set[str],
                progress: bool = False) -> tuple[list[dict], int]:
    """Render scenes, write images (and crops) and return their PAD records."""
    records = []
    n_crops = 0
    W = cfg.image_size
    # disable=None: tqdm shows the bar only on a terminal, never in logs or CI output.
    for sc in tqdm(scenes, desc="Scenes: rendering", unit="img",
                   disable=None if progress else True):
        img, masks = render_scene(sc, W)
        _write_png(img, out / sc.image_path, cfg.png_compress_level)
        regions = []
        for k, (o, m) in enumerate(zip(sc.objects, masks)):
            box = _tight_box(m)
            regions.append({"label": o.label, "score": 1.0, "box": box, "mask": rle_encode(m),
                            "expression": sc.expressions[k],
                            "attributes": {"shape": o.shape, "colour": o.colour,
                                           "size": o.size}})
            if sc.id in with_crops:
                x0, y0, x1, y1 = crop_window(box, W, cfg.crop_size)
                _write_png(np.ascontiguousarray(img[y0:y1, x0:x1]), out / sc.crop_path(k),
                           cfg.png_compress_level)
                n_crops += 1
        records.append({"image": sc.image_path, "width": W, "height": W,
                        "tags": sorted({o.label for o in sc.objects}), "regions": regions})
    return records, n_crops


def generate_scenes(cfg: ScenesConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Generate the Scenes benchmark into ``out_dir`` (the image root of every row).

    Layout (a contract; all image paths in every file are relative to ``out_dir``):

    * ``images/{train,eval}/<id>.png``; counterfactual hard negatives are
      ``<id>-{swap,mirror,attr}.png`` next to their scene.
    * ``crops/{train,eval}/<id>_<k>.png``: grounding crop of object ``k``.
    * ``train/<Dataset>.jsonl``: MMEB training rows, fields :data:`TRAIN_FIELDS`
      (strings, ``""`` when absent; one hard negative each), IND data sets only.
    * ``eval/<Dataset>.jsonl``: MMEB eval rows, fields :data:`EVAL_FIELDS`; the first
      candidate is the positive; all rows of a data set have the same candidate count.
    * ``datasets.json``: ``{name: {meta_task, split, n_candidates, chance, description,
      has_train}}``.
    * ``captions.json`` / ``captions_eval.json``: ``[{id, image, caption, blip_caption}]``
      for every training / eval image (counterfactuals included).
    * ``qa.json``: ``[{image, question, answer}]`` from the training scenes.
    * ``pad.jsonl``: one PAD record (SPEC §4) per image, train and eval (tell them apart
      by the ``images/train/`` or ``images/eval/`` prefix); regions carry ``label,
      score, box [x0, y0, x1, y1)`` (exclusive end), ``mask`` (COCO RLE),
      ``expression, attributes``.
    * ``scenes.json``: the returned summary (config, seed, counts); written last, so
      its presence marks a complete generation.

    Args:
        cfg: the configuration.
        out_dir: output folder; created if needed. Existing files are overwritten.
        progress: show a progress bar while rendering (only on a terminal).

    Returns:
        The summary written to ``scenes.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    for sub in ("images/train", "images/eval", "crops/train", "crops/eval", "train", "eval"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    pools = {"train": _sample_pool(cfg, "train", cfg.n_train_images),
             "eval": _sample_pool(cfg, "eval", cfg.n_eval_images)}
    # Only the OOD pools some data set uses are drawn and rendered.
    for p in dict.fromkeys(spec.pool for spec in dataset_specs()):
        if p not in pools:
            pools[p] = _sample_pool(cfg, p, cfg.n_ood_images)
    logger.info("sampled %d scenes in %.1fs", sum(map(len, pools.values())),
                time.perf_counter() - t0)

    heldout = set(cfg.heldout_pairs)
    all_labels = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    seen_labels = [lab for lab in all_labels if tuple(lab.split(" ")) not in heldout]
    renders: dict[str, Scene] = {}
    for pool in pools.values():
        for sc in pool:
            renders[sc.id] = sc
    with_crops = set(renders)  # every primary scene gets crops; counterfactuals do not

    datasets_meta: dict[str, dict] = {}
    counts: dict[str, dict[str, int]] = {}
    for idx, spec in enumerate(dataset_specs()):
        rng = np.random.default_rng([cfg.seed, _DATASET_STREAM_BASE + idx])
        # Novel-pool data sets may show held-out labels; all others never use them, so
        # no training text names a held-out pair either.
        labels = all_labels if spec.pool == "novel" else seen_labels
        n = _n_candidates(spec, cfg)
        n_train = 0
        if spec.split == "IND":
            ctx = _Ctx(cfg, pools["train"], labels)
            rows = _train_rows(spec, _items_for(spec, pools["train"], rng, ctx), rng, ctx,
                               renders)
            write_jsonl(out / "train" / f"{spec.name}.jsonl", rows)
            n_train = len(rows)
        ctx = _Ctx(cfg, pools[spec.pool], labels)
        rows = _eval_rows(spec, _items_for(spec, pools[spec.pool], rng, ctx), rng, ctx,
                          renders, n)
        if not rows:
            raise ConfigError(f"{spec.name}: no eval rows; raise n_eval_images/n_ood_images")
        write_jsonl(out / "eval" / f"{spec.name}.jsonl", rows)
        datasets_meta[spec.name] = {"meta_task": spec.meta_task, "split": spec.split,
                                    "n_candidates": n, "chance": 1.0 / n,
                                    "description": spec.description,
                                    "has_train": spec.split == "IND"}
        counts[spec.name] = {"train_rows": n_train, "eval_rows": len(rows)}
    logger.info("built rows for %d data sets in %.1fs", len(counts), time.perf_counter() - t0)

    pad, n_crops = _render_all(list(renders.values()), out, cfg, with_crops, progress)
    write_jsonl(out / "pad.jsonl", pad)
    logger.info("rendered %d images and %d crops in %.1fs", len(renders), n_crops,
                time.perf_counter() - t0)

    def caps(split: str) -> list[dict]:
        return [{"id": sc.id, "image": sc.image_path, "caption": sc.caption,
                 "blip_caption": sc.blip_caption}
                for sc in renders.values() if sc.split == split]

    atomic_write_json(out / "captions.json", caps("train"))
    atomic_write_json(out / "captions_eval.json", caps("eval"))
    atomic_write_json(out / "qa.json", [qa for sc in pools["train"]
                                        for qa in _qa_pairs(sc, cfg.relation_margin)])
    atomic_write_json(out / "datasets.json", datasets_meta)
    n_images = {s: sum(sc.split == s for sc in renders.values()) for s in ("train", "eval")}
    summary = {
        "name": "Scenes",
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "pools": {p: len(v) for p, v in pools.items()},
        "images": n_images,
        "crops": n_crops,
        "datasets": counts,
    }
    summary = json.loads(json.dumps(summary))  # tuples -> lists: return what the file holds
    atomic_write_json(out / "scenes.json", summary)
    logger.info("Scenes benchmark written to %s in %.1fs (%d train / %d eval images)",
                out, time.perf_counter() - t0, n_images["train"], n_images["eval"])
    return summary
