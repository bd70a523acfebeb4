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

Modules: :mod:`~fam.data.scenes.scene` (objects, relations, texts),
:mod:`~fam.data.scenes.sampling` (pools, counterfactuals), :mod:`~fam.data.scenes.render`
(pixels, masks, crops, PAD records), :mod:`~fam.data.scenes.tasks` (per-task queries and
negatives), :mod:`~fam.data.scenes.datasets` (the 14 data sets, their rows) and
:mod:`~fam.data.scenes.generate` (:func:`generate_scenes`, the files). The configuration
and vocabulary are :class:`fam.config.ScenesConfig` and :mod:`fam.config.scenes`.
"""
from fam.config.scenes import (COLOURS, DEFAULT_HELDOUT_PAIRS, NUMBER_WORDS, SHAPES, SIZES,
                               ScenesConfig)
from fam.data.scenes.datasets import EVAL_FIELDS, TRAIN_FIELDS, DatasetSpec, dataset_specs
from fam.data.scenes.generate import generate_scenes
from fam.data.scenes.render import crop_window, render_scene
from fam.data.scenes.scene import Scene, SceneObject, relation

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "NUMBER_WORDS", "DEFAULT_HELDOUT_PAIRS", "TRAIN_FIELDS",
    "EVAL_FIELDS", "ScenesConfig", "SceneObject", "Scene", "generate_scenes",
    "render_scene", "crop_window", "relation", "dataset_specs", "DatasetSpec",
]
