"""The task builders: per scene, the queries, positives and hard negatives of each task.

Each task has an item builder (one scene → queries with their positive and hard
negatives) and a random-candidate source (more negatives for evaluation rows); the data
sets of :mod:`fam.data.scenes.datasets` combine a task with a pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fam.config.scenes import COLOURS, NUMBER_WORDS, SHAPES, ScenesConfig
from fam.data.scenes.scene import REL_WORDS, Scene, ambiguous, pair_counts, relation
from fam.data.types import IMAGE_PLACEHOLDER

_P = IMAGE_PLACEHOLDER
_IMG_TGT = f"{_P}\nRepresent the given image."
_CROP_TGT = f"{_P}\nRepresent the given cropped image of the object."
Cand = tuple[str, str, "Scene | None"]  # (text, image path, scene to render for that path)


@dataclass
class Item:
    """One query with its positive and hard negatives, before becoming a row."""

    scene: Scene
    qry_text: str
    qry_img: str
    pos: Cand
    hard: list[Cand]
    target: int | None = None  # object index, for tasks about one object


@dataclass
class TaskContext:
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


def shuffled(rng: np.random.Generator, xs: Sequence[Any]) -> list[Any]:
    return [xs[i] for i in rng.permutation(len(xs))]


def _dominant(sc: Scene) -> int | None:
    """The largest object: the only one, or the single large one among several."""
    if len(sc.objects) == 1:
        return 0
    large = [k for k, o in enumerate(sc.objects) if o.size == "large"]
    return large[0] if len(large) == 1 else None


def _items_dominant(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    k = _dominant(sc)
    if k is None:
        return []
    o = sc.objects[k]
    present = shuffled(rng, sorted({x.label for x in sc.objects} - {o.label}))
    swaps = [f"{c} {o.shape}" for c in COLOURS if c != o.colour]
    swaps += [f"{o.colour} {s}" for s in SHAPES if s != o.shape]
    swaps = [s for s in shuffled(rng, swaps) if s in ctx.labels][:4]
    qry = f"{_P}\nRepresent the given image for classification by its largest object."
    return [Item(sc, qry, sc.image_path, _t(o.label), [_t(x) for x in present + swaps], k)]


def _items_count(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    n = len(sc.objects)
    near = [NUMBER_WORDS[m - 1] for m in (n - 1, n + 1) if 1 <= m <= len(NUMBER_WORDS)]
    qry = f"{_P}\nRepresent the given image for counting its objects."
    return [Item(sc, qry, sc.image_path, _t(count_text(NUMBER_WORDS[n - 1])),
                  [_t(count_text(w)) for w in shuffled(rng, near)])]


def count_text(w: str) -> str:
    return w + (" object" if w == "one" else " objects")


def colour_questions(sc: Scene) -> list[tuple[int, str, str]]:
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


def relation_questions(sc: Scene, margin: float) -> list[tuple[int, str, str]]:
    """(answer object, question, answer) for "What is left of the red circle?" questions.

    Asked only when exactly one object stands in the relation and no object is in the
    ambiguous band, so the answer is unambiguous.
    """
    objs = sc.objects
    pair_count = pair_counts(objs)
    out = []
    for r, ref in enumerate(objs):
        if pair_count[ref.pair] == 1:
            desc = f"the {ref.colour} {ref.shape}"
        elif sum(x.pair == ref.pair and x.size == ref.size for x in objs) == 1:
            desc = f"the {ref.size} {ref.colour} {ref.shape}"
        else:
            continue
        for (axis, sign), word in REL_WORDS.items():
            others = [k for k in range(len(objs)) if k != r]
            if any(ambiguous(objs[k], ref, axis, margin) for k in others):
                continue
            hits = [k for k in others if relation(objs[k], ref, axis, margin) == word]
            if len(hits) == 1:
                out.append((hits[0], f"What is {word} {desc}?", objs[hits[0]].label))
    return out


_VQA_PREFIX = f"{_P}\nRepresent the given image with the following question: "


def _items_vqa_colour(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    items = []
    for k, q, a in colour_questions(sc):
        present = shuffled(rng, sorted({o.colour for o in sc.objects} - {a}))
        items.append(Item(sc, _VQA_PREFIX + q, sc.image_path, _t(a),
                           [_t(c) for c in present], k))
    return items


def _items_vqa_relation(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    items = []
    for k, q, a in relation_questions(sc, ctx.cfg.relation_margin):
        present = shuffled(rng, sorted({o.label for o in sc.objects} - {a}))
        items.append(Item(sc, _VQA_PREFIX + q, sc.image_path, _t(a),
                           [_t(x) for x in present], k))
    return items


def _items_t2i(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    qry = f"Find me an everyday image that matches the given caption: {sc.caption}"
    hard = [(_IMG_TGT, cf.image_path, cf) for cf in shuffled(rng, sc.counterfactuals)]
    return [Item(sc, qry, "", (_IMG_TGT, sc.image_path, None), hard)]


def _items_i2t(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    qry = f"{_P}\nFind an image caption describing the given everyday image."
    hard = [_t(cf.caption) for cf in shuffled(rng, sc.counterfactuals)]
    return [Item(sc, qry, sc.image_path, _t(sc.caption), hard)]


def _items_grounding(sc: Scene, rng: np.random.Generator, ctx: TaskContext) -> list[Item]:
    items = []
    objs = sc.objects
    for k, o in enumerate(objs):
        others = [j for j in range(len(objs)) if j != k]
        # Most confusable first: same colour and shape, then one shared attribute.
        others.sort(key=lambda j: -((objs[j].colour == o.colour) + (objs[j].shape == o.shape)
                                    + 0.5 * (objs[j].size == o.size)))
        qry = (f"{_P}\nSelect the portion of the image that isolates the object labeled "
               f"as \"{sc.expressions[k]}\"")
        items.append(Item(sc, qry, sc.image_path, (_CROP_TGT, sc.crop_path(k), None),
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


def _rand_labels(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    return [_t(x) for x in _random_from(rng, ctx.labels, k, lambda x: (x, "") not in seen)]


def _rand_counts(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    words = [count_text(w) for w in NUMBER_WORDS]
    return [_t(x) for x in _random_from(rng, words, k, lambda x: (x, "") not in seen)]


def _rand_colours(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
                  seen: set[tuple[str, str]]) -> list[Cand]:
    return [_t(x) for x in _random_from(rng, list(COLOURS), k, lambda x: (x, "") not in seen)]


def _rand_images(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
                 seen: set[tuple[str, str]]) -> list[Cand]:
    # A random image is a valid negative only if the caption is false for it: captions
    # list every object with all attributes, so a different multiset suffices.
    ms = item.scene.multiset
    got = _random_from(rng, ctx.pool, k, lambda s: s.multiset != ms
                       and (_IMG_TGT, s.image_path) not in seen)
    return [(_IMG_TGT, s.image_path, None) for s in got]


def _rand_captions(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
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


def _rand_crops(item: Item, rng: np.random.Generator, ctx: TaskContext, k: int,
                seen: set[tuple[str, str]]) -> list[Cand]:
    # Crops of other images showing the same colour-shape pair would look like a second
    # correct answer, so they are excluded.
    label = item.scene.objects[item.target].label  # type: ignore[index]
    got = _random_from(rng, ctx.crops, k, lambda sk: sk[0] is not item.scene
                       and sk[0].objects[sk[1]].label != label
                       and (_CROP_TGT, sk[0].crop_path(sk[1])) not in seen)
    return [(_CROP_TGT, s.crop_path(j), None) for s, j in got]


_ItemsFn = Callable[[Scene, np.random.Generator, TaskContext], list[Item]]
_RandFn = Callable[[Item, np.random.Generator, TaskContext, int, set], list[Cand]]
TASKS: dict[str, tuple[_ItemsFn, _RandFn, int | None]] = {
    # task: (items, random candidates, max candidates the task can offer)
    "dominant": (_items_dominant, _rand_labels, None),
    "count": (_items_count, _rand_counts, len(NUMBER_WORDS)),
    "vqa_colour": (_items_vqa_colour, _rand_colours, len(COLOURS)),
    "vqa_relation": (_items_vqa_relation, _rand_labels, None),
    "t2i": (_items_t2i, _rand_images, None),
    "i2t": (_items_i2t, _rand_captions, None),
    "grounding": (_items_grounding, _rand_crops, None),
}


def qa_pairs(sc: Scene, margin: float) -> list[dict]:
    n = len(sc.objects)
    qa = [{"image": sc.image_path, "question": "How many objects are in the image?",
           "answer": NUMBER_WORDS[n - 1]},
          {"image": sc.image_path, "question": "Describe the image.", "answer": sc.caption}]
    for _, q, a in colour_questions(sc) + relation_questions(sc, margin):
        qa.append({"image": sc.image_path, "question": q, "answer": a})
    return qa
