"""The demo's video and document part (``media.enabled`` in the ``demo`` preset).

Scenes-Video and Scenes-Docs (:mod:`fam.data.scenes.media`) are generated into the demo's
``data/`` beside the image benchmark (``train_media/``, ``eval_media/``, ``media/``), so
every path is relative to that one folder. After the image adaptation (unchanged: the
same stage and batches as the image-only demo and the ablations), the baseline and FAM
each get one more adaptation from their adapted checkpoint on the media stage's rows
(``data/train_mix/``: every Scenes-Video/Docs training row plus a seeded sample of
``image_replay`` rows of each image dataset, so the image tasks are rehearsed), FAM's with
VEIN. Every model is then evaluated on the image benchmark (the MMEB table) and on
``eval_media`` (MMEB-V2 scoring), and the two are combined into MMEB-V2's nine groups,
``image``, ``video``, ``visdoc`` and ``overall`` (:func:`combine_v2`).

Image datasets enter the MMEB-V2 aggregation with hit@1 under VLM2Vec-V2's rule for ties
(pessimistic: a positive tied at the top scores 0), computed from the same evaluation as
the image table (whose ties count at their expected value): a row's expected-tie credit is
1 exactly when its positive is alone at the top, so the pessimistic credit is that credit
rounded down, with no second encoding.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fam.config import DemoMediaConfig
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["prepare_media", "media_train_dir", "image_hit1", "combine_v2", "v2_chance",
           "v2_report", "MIX_DIR"]

MIX_DIR = "train_mix"  #: the media stage's training rows, under the demo's data folder


def prepare_media(data: Path, media: DemoMediaConfig, seed: int) -> Path:
    """Scenes-Video/Docs under ``data`` (``eval_media/`` is returned) unless already there."""
    import dataclasses

    from fam.data.scenes.media import generate_media
    if not (data / "media.json").exists():
        generate_media(dataclasses.replace(media.scenes, seed=seed), data)
    return data / "eval_media"


def media_train_dir(data: Path, replay: int, seed: int) -> Path:
    """``data/train_mix/``: every ``train_media`` file, and of each image training file
    (``train/``) ``replay`` rows drawn without replacement (seeded), kept in file order.
    Written once (``mix.json`` last); a rerun reuses it."""
    from fam.data.scenes.media import MEDIA_DATASETS
    out = data / MIX_DIR
    if (out / "mix.json").exists():
        return out
    rng = np.random.default_rng([seed, 0x313])
    counts: dict[str, int] = {}
    for f in sorted((data / "train").glob("*.jsonl")):
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = sorted(rng.choice(len(lines), min(replay, len(lines)), replace=False)) \
            if replay else []
        if keep:
            atomic_write_text(out / f.name, "".join(lines[i] for i in keep))
            counts[f.stem] = len(keep)
    # The subsets' meta-tasks (VEIN reads them): the benchmark's, and the media sets'.
    infos = json.loads((data / "datasets.json").read_text(encoding="utf-8")) \
        if (data / "datasets.json").is_file() else {}
    for f in sorted((data / "train_media").glob("*.jsonl")):
        text = f.read_text(encoding="utf-8")
        atomic_write_text(out / f.name, text)
        counts[f.stem] = len(text.splitlines())
        infos[f.stem] = {"meta_task": MEDIA_DATASETS[f.stem][1], "split": "IND"}
    atomic_write_json(out / "datasets.json", infos)
    atomic_write_json(out / "mix.json", {"image_replay": replay, "seed": seed, "rows": counts})
    return out


def image_hit1(image: dict[str, Any]) -> dict[str, float]:
    """``{dataset: hit@1 (%)}`` with pessimistic ties from an image evaluation run with
    ``per_row=True`` (expected-tie credits: 1 exactly when the positive is alone on top)."""
    return {name: 100.0 * float(np.mean([c >= 1.0 for c in d["credits"]]))
            for name, d in image["datasets"].items() if d.get("meta_task") is not None}


def combine_v2(image: dict[str, Any], media: dict[str, Any],
               splits: dict[str, str] | None = None) -> dict[str, Any]:
    """One MMEB-V2 result of a model: the image datasets (hit@1, pessimistic ties, from
    :func:`image_hit1`) and every ``eval_media`` dataset (``splits``: their IND/OOD, from
    its ``datasets.json``), with the nine groups, ``image``, ``video``, ``visdoc`` and
    ``overall`` (:func:`fam.eval.mmeb_v2.aggregate_v2`) and the chance level of each
    dataset where defined (hit@1; none for NDCG). Datasets in group order, IND first."""
    from fam.eval.mmeb_v2 import PRIMARY, V2_GROUPS, aggregate_v2
    datasets: dict[str, dict[str, Any]] = {}
    for name, score in image_hit1(image).items():
        d = image["datasets"][name]
        datasets[name] = {"modality": "image", "meta_task": d["meta_task"], "split": d["split"],
                          "metric": PRIMARY["image"], "score": score, "n": d["n"],
                          "chance": d["chance"]}
    for name, d in media["datasets"].items():
        if d.get("modality") is not None:
            datasets[name] = {"modality": d["modality"], "meta_task": d["meta_task"],
                              "split": (splits or {}).get(name), "metric": d["metric"],
                              "score": d["score"], "n": d["n"],
                              "chance": d["chance_hit@1"] if d["metric"] == "hit@1" else None,
                              "metrics": d["metrics"]}
    order = [(m, g) for m, gs in V2_GROUPS.items() for g in gs]
    datasets = dict(sorted(datasets.items(), key=lambda kv: (
        order.index((kv[1]["modality"], kv[1]["meta_task"])), kv[1]["split"] != "IND", kv[0])))
    out: dict[str, Any] = {"metric": dict(PRIMARY), "ties": "pessimistic", "datasets": datasets}
    out.update(aggregate_v2(datasets))
    out["chance"] = v2_chance(datasets)
    return out


def v2_chance(datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Chance of each group, modality and overall: the mean chance of its datasets, where
    every one of them has one (an NDCG dataset has none: its group has none)."""
    from fam.eval.mmeb_v2 import aggregate_v2
    agg = aggregate_v2({n: dict(d, score=d["chance"]) for n, d in datasets.items()
                        if d["chance"] is not None})
    full = aggregate_v2({n: dict(d, score=0.0) for n, d in datasets.items()})
    same = lambda k: agg["n_datasets"][k] == full["n_datasets"][k]  # noqa: E731
    return {"groups": {g: v if same(g) else None for g, v in agg["groups"].items()},
            **{k: agg[k] if same(k) else None for k in ("image", "video", "visdoc", "overall")}}


def v2_report(v2: dict[str, dict[str, Any]]) -> str:
    """The MMEB-V2 table of every model (datasets, nine groups, modalities, overall) with
    the chance column."""
    from fam.eval.mmeb_v2 import format_v2_table
    first = next(iter(v2.values()))
    chance = {"datasets": {n: dict(d, score=d["chance"]) for n, d in first["datasets"].items()},
              **first["chance"]}
    return format_v2_table(list(v2.items()) + [("chance", chance)])
