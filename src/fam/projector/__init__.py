"""Patch-aligned projector training (arXiv 2505.17316): projector modules."""
