"""Shared-prefix forward: the tokens every row of a batch starts with, computed once.

Queries usually begin with the same instruction ("Find me an everyday image that matches
the given caption: ..."), ~40% of a short query's tokens. Under causal attention a token's
states depend only on the tokens before it, so the prefix's keys and values are the same in
every row: :func:`shared_prefix_forward` runs the language model on the prefix **once** (one
row), then on each row's suffix with that key/value cache broadcast to the batch and the
suffix's own positions. Same maths as the plain forward (float rounding only: other matrix
shapes); under autograd the prefix's gradient is the sum over the rows (the broadcast's
backward), so it also serves a training forward.

Applies to text-only batches (no pixel inputs: image tokens have 3-D positions and encoder
features), right padding, every row with at least one token after the prefix, no dropout
active in the language model (one prefix for all rows would draw one mask), no gradient
checkpointing; :func:`shared_prefix_len` returns 0 otherwise, and the caller runs the plain
forward. The adapter says whether its family can (:attr:`BackboneAdapter.shared_prefix_ok`).
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from fam.backbones.batch import EncodedBatch
from fam.backbones.fastpath import checkpointing, dropout_active, pooled_rows_only

__all__ = ["MIN_PREFIX", "shared_prefix_len", "shared_prefix_forward"]

#: Fewest shared tokens worth a second (one-row) forward.
MIN_PREFIX = 4
#: Inputs a text-only batch of a family with ``shared_prefix_ok`` may carry (per row, (B, L)).
_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "position_ids"}


def shared_prefix_len(adapter: Any, batch: EncodedBatch) -> int:
    """How many leading tokens all rows share, when the shared-prefix forward applies to
    ``batch`` (module docstring) and the prefix has at least :data:`MIN_PREFIX` tokens; else 0."""
    inputs = batch.inputs
    if (not getattr(adapter, "shared_prefix_ok", False) or adapter.padding_side != "right"
            or set(inputs) - _TEXT_KEYS or batch.batch_size < 2
            or bool(batch.has_image.any())):
        return 0
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    # Positions must be the plain 0..n-1 of each row (the suffix continues at P).
    types = inputs.get("mm_token_type_ids")
    if types is not None and bool(types.any()):
        return 0
    # Each row keeps at least its last real token (the pooled one) in the suffix.
    limit = int(attn.sum(1).min()) - 1
    if limit < MIN_PREFIX:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(0) & attn[:, :limit].bool().all(0)
    differ = (~same).nonzero()
    n = int(differ[0]) if differ.numel() else limit
    lm = adapter.language_model()
    if n < MIN_PREFIX or checkpointing(lm) or dropout_active(lm):
        return 0
    if "position_ids" in inputs:
        pos = inputs["position_ids"]
        if not bool((pos[:, :n] == torch.arange(n, device=pos.device)).all()):
            return 0
    return n


def shared_prefix_forward(adapter: Any, batch: EncodedBatch, n: int,
                          pooled_modules: Sequence[nn.Module] = ()) -> torch.Tensor:
    """The language model's last hidden state (B, L, d) of a text-only ``batch`` whose rows
    share their first ``n`` tokens (from :func:`shared_prefix_len`), the prefix computed once.

    ``pooled_modules``: as :func:`fam.backbones.fastpath.pooled_rows_only` (the suffix pass
    computes them at the pooled rows only; the caller then reads only those rows)."""
    from transformers import DynamicCache

    lm = adapter.language_model()
    ids, attn = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    B, L = ids.shape
    pos = torch.arange(L, device=ids.device)
    # Explicit positions (3-D for multimodal RoPE families): never the model's own guess,
    # which may carry position offsets remembered from an earlier image batch.
    dims = getattr(adapter, "position_id_dims", 0)

    def positions(rows: int, a: int, b: int) -> torch.Tensor:
        p = pos[a:b].view(1, -1).expand(rows, -1)
        return p.unsqueeze(0).expand(dims, -1, -1) if dims else p

    # transformers renamed ``past_key_values`` to ``cache`` (5.x; the old name still works).
    key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    cache = DynamicCache()
    head = lm(input_ids=ids[:1, :n], attention_mask=attn[:1, :n], position_ids=positions(1, 0, n),
              use_cache=True, return_dict=True, **{key: cache})
    shared = DynamicCache(ddp_cache_data=[(layer.keys.expand(B, -1, -1, -1),
                                           layer.values.expand(B, -1, -1, -1))
                                          for layer in cache.layers])
    with pooled_rows_only(pooled_modules, batch.eos_index - n):
        tail = lm(input_ids=ids[:, n:], attention_mask=attn, position_ids=positions(B, n, L),
                  use_cache=True, return_dict=True, **{key: shared})
    last = head.last_hidden_state
    return torch.cat([last.expand(B, -1, -1), tail.last_hidden_state], 1)
