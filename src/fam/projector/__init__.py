"""Patch-aligned projector training (arXiv 2505.17316) as one unit.

* :mod:`fam.projector.recipe` — the training stage: a fresh projector between frozen
  towers, caption loss + β(t)·patch-alignment loss (``fam train projector``);
* :mod:`fam.projector.hooks` — find the projector, tap its input and output;
* :mod:`fam.projector.regions` — PAD region masks → patch sets and label tokens;
* :mod:`fam.projector.geometry` — masks through exactly the image processor's transform;
* :mod:`fam.projector.cabstractor` — a C-Abstractor-style projector (conv blocks, pooled
  patch grid) and the pooling of region coverage onto its grid;
* :mod:`fam.projector.tower` — contrastive (CLIP/SigLIP) pretraining of the vision tower;
* :mod:`fam.projector.report` — the analysis entry point (``fam analyze alignment``):
  compression, Align(V, W), retrieval, matching pursuit.

Training (recipe, hooks, regions, geometry) never imports :mod:`fam.analysis`; only the
report does. The loss itself is :mod:`fam.losses.patch` and the data format
:mod:`fam.pad`. Method: docs/method.md §4–5.
"""
