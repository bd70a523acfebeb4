"""Drawing scenes: object placement, pools (train, eval, OOD) and counterfactual variants.

Every pool draws from its own ``numpy`` stream ``default_rng([seed, stream])``, so resizing
one pool does not change another.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fam.config.scenes import COLOURS, SHAPES, ScenesConfig
from fam.data.scenes.scene import Scene, SceneObject, describe
from fam.errors import ConfigError

_EDGE = 2  # px kept free at the image border so no object touches it


# Random streams (spawn keys of default_rng([seed, key])); fixed numbers so adding a
# data set or resizing a pool never changes another's draws.
_POOL_STREAMS = {"train": 1, "eval": 2, "novel": 3, "crowded": 4, "striped": 5}


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
        sc = describe(f"{base.id}-{kind}", base.split, base.pool, base.style,
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


def sample_pool(cfg: ScenesConfig, pool: str, n: int) -> list[Scene]:
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
            sc = describe(sid, split, pool, style, bg, objs, rng, cfg)
            if sc is not None:
                break
        else:
            raise ConfigError(f"could not place {pool} scene {sid} after 1000 attempts; "
                              "lower large_size / ood_n_objects or raise image_size")
        scenes.append(dataclasses.replace(sc, counterfactuals=tuple(
            _counterfactuals(sc, rng, cfg))))
    return scenes
