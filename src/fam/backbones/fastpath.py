"""Exact shortcuts in the backbone's forward (same maths, less work).

* :func:`patch_embed_as_matmul`: a patch embedding that is a convolution whose kernel equals
  its stride over pre-cut patches (Qwen2-VL's ``Conv3d``) is a matrix product of each
  flattened patch with the flattened kernel. CPU convolution kernels are many times slower
  than that product (the ``Conv3d`` was ~10% of a tiny Qwen2-VL's image encode), so under
  ``torch.inference_mode`` (the encode path) the embedding runs the product, on the same
  weight parameter (state dict, LoRA, saving unchanged).
* :func:`pooled_rows_only`: an embedding pools one token per sequence (EOS), so the last
  decoder layer's token-wise modules (attention output projection, MLP) are needed at that
  token only; keys and values of every token still enter its attention. Inside the context
  those modules run on the pooled rows alone and the layer's other rows are left as their
  residual input (never read). Saves ~1/num_layers of the forward's work and of the
  activations a training step keeps.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import types
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["patch_embed_as_matmul", "pooled_rows_only"]

#: (token, rows index (B,)) of the pooled_rows_only context active in this thread.
_ACTIVE: contextvars.ContextVar[tuple[object, torch.Tensor] | None] = contextvars.ContextVar(
    "fam_pooled_rows", default=None)
_SHAPES = threading.local()


def _matmul_patch_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_inference_mode_enabled():
        # Training keeps the convolution: its rows do not depend on how many images a call
        # holds, so a GradCache chunk reproduces the full batch's float32 rounding.
        return type(self).forward(self, hidden_states)
    w = self.proj.weight
    return F.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1))


def patch_embed_as_matmul(model: nn.Module) -> int:
    """Run every ``*PatchEmbed`` whose ``proj`` is a bias-free, unpadded ``Conv3d`` with
    kernel = stride as a matrix product (module docstring). Returns how many were changed."""
    n = 0
    for mod in model.modules():
        proj = getattr(mod, "proj", None)
        if (type(mod).__name__.endswith("PatchEmbed") and isinstance(proj, nn.Conv3d)
                and proj.bias is None and tuple(proj.kernel_size) == tuple(proj.stride)
                and all(p == 0 for p in proj.padding) and proj.groups == 1
                and tuple(proj.dilation) == (1, 1, 1)):
            mod.forward = types.MethodType(_matmul_patch_forward, mod)
            n += 1
    return n


def _gather(token: object):
    def pre(module: nn.Module, args: tuple[Any, ...]):
        act = _ACTIVE.get()
        if act is None or act[0] is not token:
            return None
        x = args[0]
        _SHAPES.__dict__[id(module)] = x.shape
        rows = act[1]
        return (x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1),) + args[1:]
    return pre


def _scatter(token: object):
    def post(module: nn.Module, args: tuple[Any, ...], out: Any):
        act = _ACTIVE.get()
        if act is None or act[0] is not token or not torch.is_tensor(out):
            return None
        shape = _SHAPES.__dict__.pop(id(module))
        full = out.new_zeros((*shape[:-1], out.shape[-1]))
        rows = act[1]
        return full.index_put((torch.arange(shape[0], device=out.device), rows), out[:, 0])
    return post


@contextlib.contextmanager
def pooled_rows_only(modules: Sequence[nn.Module], rows: torch.Tensor) -> Iterator[None]:
    """Within the block, ``modules`` (token-wise, input ``(B, L, d)`` first) compute only
    position ``rows[b]`` of each sequence ``b``; their other output rows are zero.

    Only this thread's forwards are affected (other threads may run the same model).
    """
    if not modules:
        yield
        return
    token = object()
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(_gather(token)))
        handles.append(m.register_forward_hook(_scatter(token)))
    ctx = _ACTIVE.set((token, rows))
    try:
        yield
    finally:
        _ACTIVE.reset(ctx)
        for h in handles:
            h.remove()
