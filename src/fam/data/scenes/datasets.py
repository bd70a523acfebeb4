"""The 14 Scenes data sets (task × pool) and their MMEB training / evaluation rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fam.config.scenes import ScenesConfig
from fam.data.scenes.scene import Scene
from fam.data.scenes.tasks import TASKS, Cand, Item, TaskContext, shuffled
from fam.errors import ConfigError

#: Exact field sets of MMEB training and eval rows.
TRAIN_FIELDS: tuple[str, ...] = ("qry", "qry_image_path", "pos_text", "pos_image_path",
                                 "neg_text", "neg_image_path")


EVAL_FIELDS: tuple[str, ...] = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


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


def n_candidates(spec: DatasetSpec, cfg: ScenesConfig) -> int:
    cap = TASKS[spec.task][2]
    return min(cfg.n_candidates, cap) if cap else cfg.n_candidates


def items_for(spec: DatasetSpec, scenes: list[Scene], rng: np.random.Generator,
               ctx: TaskContext) -> list[Item]:
    items_fn = TASKS[spec.task][0]
    heldout = set(ctx.cfg.heldout_pairs)
    out: list[Item] = []
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


def train_rows(spec: DatasetSpec, items: list[Item], rng: np.random.Generator, ctx: TaskContext,
                renders: dict[str, Scene]) -> list[dict]:
    rand_fn = TASKS[spec.task][1]
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


def eval_rows(spec: DatasetSpec, items: list[Item], rng: np.random.Generator, ctx: TaskContext,
               renders: dict[str, Scene], n: int) -> list[dict]:
    rand_fn = TASKS[spec.task][1]
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
        cands = [cands[0]] + shuffled(rng, cands[1:])
        for c in cands:
            if c[2] is not None:
                renders.setdefault(c[2].id, c[2])
        rows.append({"qry_text": it.qry_text, "qry_img_path": it.qry_img,
                     "tgt_text": [c[0] for c in cands], "tgt_img_path": [c[1] for c in cands]})
    return rows
