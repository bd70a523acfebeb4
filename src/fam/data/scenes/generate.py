"""``generate_scenes``: the Scenes benchmark written to disk in the MMEB and PAD formats."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from fam.config.scenes import COLOURS, SHAPES, ScenesConfig
from fam.data.scenes.datasets import dataset_specs, eval_rows, items_for, n_candidates, train_rows
from fam.data.scenes.render import render_all
from fam.data.scenes.sampling import sample_pool
from fam.data.scenes.scene import Scene
from fam.data.scenes.tasks import TaskContext, qa_pairs
from fam.errors import ConfigError
from fam.utils.io import atomic_write_json, write_jsonl

logger = logging.getLogger(__name__)

_DATASET_STREAM_BASE = 100


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
    * ``pad.jsonl``: one PAD record (method.md §4) per image, train and eval (tell them apart
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

    pools = {"train": sample_pool(cfg, "train", cfg.n_train_images),
             "eval": sample_pool(cfg, "eval", cfg.n_eval_images)}
    # Only the OOD pools some data set uses are drawn and rendered.
    for p in dict.fromkeys(spec.pool for spec in dataset_specs()):
        if p not in pools:
            pools[p] = sample_pool(cfg, p, cfg.n_ood_images)
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
        n = n_candidates(spec, cfg)
        n_train = 0
        if spec.split == "IND":
            ctx = TaskContext(cfg, pools["train"], labels)
            rows = train_rows(spec, items_for(spec, pools["train"], rng, ctx), rng, ctx,
                               renders)
            write_jsonl(out / "train" / f"{spec.name}.jsonl", rows)
            n_train = len(rows)
        ctx = TaskContext(cfg, pools[spec.pool], labels)
        rows = eval_rows(spec, items_for(spec, pools[spec.pool], rng, ctx), rng, ctx,
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

    pad, n_crops = render_all(list(renders.values()), out, cfg, with_crops, progress)
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
                                        for qa in qa_pairs(sc, cfg.relation_margin)])
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
