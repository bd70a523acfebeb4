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
* :class:`OutputMemo`: GradCache runs each chunk twice (without, then with autograd); a
  frozen vision tower (no trainable weight, no active dropout: LoRA on the language model)
  computes the same features both times, so the first pass records them and the second
  replays them (:func:`frozen_vision_memo`), ~30% of a tiny Qwen2-VL's image forward.
"""
from __future__ import annotations

import contextlib
import copy
import contextvars
import threading
import types
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["patch_embed_as_matmul", "pooled_rows_only", "OutputMemo", "frozen_vision_memo",
           "checkpointing", "dropout_active"]

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


def checkpointing(lm: nn.Module) -> bool:
    """Whether activation checkpointing is on in a language model (the model or one of its
    ``layers``): the cheap form of transformers' ``is_activation_checkpointing``, which walks
    every module of the whole model (~10 ms a call on a tiny Qwen2-VL)."""
    return bool(getattr(lm, "gradient_checkpointing", False)) or any(
        getattr(m, "gradient_checkpointing", False) for m in getattr(lm, "layers", ()))


def dropout_active(module: nn.Module) -> bool:
    """Whether a forward of ``module`` draws random numbers: in training mode, with an
    ``nn.Dropout`` of p > 0 or a config's ``attention_dropout`` > 0 (the walk over the
    modules happens only in training mode)."""
    if not module.training:
        return False
    if float(getattr(getattr(module, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in module.modules())


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


def _fingerprint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple:
    def one(x: Any) -> Any:
        if torch.is_tensor(x):
            return ("t", tuple(x.shape), x.dtype, x.device, x.data_ptr(), x._version)
        return ("v", x if isinstance(x, (int, float, str, bool, type(None))) else id(x))
    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


class OutputMemo:
    """A module's outputs recorded in one pass (:meth:`record`) and handed back, call by
    call, in a later pass over the same input tensors (:meth:`replay`) instead of computed.

    Only for a module whose output is a function of its inputs alone (frozen, no active
    dropout): the replayed output is then the one the call would compute. A call whose
    inputs are not the recorded call's (other tensors, shapes, an in-place change) is
    computed, and the rest of that key's record dropped.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._runs: dict[Any, list[tuple[tuple, Any]]] = {}

    @contextlib.contextmanager
    def _patched(self, call):
        had = "forward" in self.module.__dict__
        prev = self.module.__dict__.get("forward")
        orig = self.module.forward
        self.module.forward = lambda *a, **k: call(orig, a, k)
        try:
            yield
        finally:
            if had:
                self.module.forward = prev
            else:
                del self.module.forward

    @contextlib.contextmanager
    def record(self, key: Any) -> Iterator[None]:
        """Keep the outputs of the module's calls within the block under ``key``."""
        runs = self._runs.setdefault(key, [])

        def call(orig, a, k):
            out = orig(*a, **k)
            # Shallow copies: callers may set fields of the output object (transformers'
            # get_image_features replaces pooler_output by its per-image split).
            runs.append((_fingerprint(a, k), copy.copy(out)))
            return out
        with self._patched(call):
            yield

    @contextlib.contextmanager
    def replay(self, key: Any) -> Iterator[None]:
        """Within the block, the module's calls return ``key``'s recorded outputs in order
        (then forgotten)."""
        runs = self._runs.pop(key, [])

        def call(orig, a, k):
            if runs and runs[0][0] == _fingerprint(a, k):
                return copy.copy(runs.pop(0)[1])
            runs.clear()
            return orig(*a, **k)
        with self._patched(call):
            yield


def frozen_vision_memo(adapter: nn.Module) -> OutputMemo | None:
    """An :class:`OutputMemo` of the adapter's vision tower when that tower is frozen (no
    parameter requires grad, no dropout active); None otherwise or without a tower."""
    inner = getattr(getattr(adapter, "hf_model", None), "model", None)
    tower = next((m for m in (getattr(inner, n, None) for n in
                              ("visual", "vision_tower", "vision_model"))
                  if isinstance(m, nn.Module)), None)
    if tower is None or any(p.requires_grad for p in tower.parameters()) or dropout_active(tower):
        return None
    return OutputMemo(tower)
