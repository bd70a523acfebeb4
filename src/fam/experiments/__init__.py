"""Experiments on the embedded default: the demo, the FAM ablations, the projector comparison.

All three start with the same pipeline, Scenes → tiny model → stage 0
(:mod:`fam.experiments.pipeline`), and read their budgets from YAML presets in
``configs/experiments/`` (:mod:`fam.experiments.presets`) into the typed configs of
:mod:`fam.config.experiments`. Stages run through :func:`fam.train.registry.run_stage`.
"""
