"""The one way fam sets torch's intra-op threads (``RunConfig.threads``, ``--threads``)."""
from __future__ import annotations

__all__ = ["use_threads"]


def use_threads(n: int) -> None:
    """Use ``n`` torch intra-op threads; 0 keeps torch's default."""
    if n:
        import torch
        torch.set_num_threads(n)
