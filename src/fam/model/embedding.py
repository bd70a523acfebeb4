"""The embedding model: a generative LVLM turned encoder (method.md §1, the VLM2Vec recipe).

The embedding of an input is the final-layer hidden state of its last real token (EOS
pooling), L2-normalised. The same forward also returns, on request, the token states of
chosen layers with the image/text masks — what MAC (method.md §2) and VEIN (method.md §3) consume.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.backbones.fastpath import pooled_rows_only
from fam.backbones.prefix import shared_prefix_forward, shared_prefix_len
from fam.data.types import MMItem
from fam.utils.layers import resolve_layer

log = logging.getLogger(__name__)


@dataclass
class EmbeddingOutput:
    """What one forward of the embedding model returns.

    Attributes:
        embedding: (B, d) L2-normalised EOS embeddings.
        hidden_states: ``{layer: (B, L, d)}`` for the requested layers (layer index into the
            backbone's ``hidden_states`` tuple: 0 = input embeddings, ``num_layers`` = last).
        image_mask, text_mask: (B, L) bool masks from the adapter.
        eos_index: (B,) long.
        has_image: (B,) bool.
        attentions: per-layer attention maps when asked for (eager attention only).
        last_hidden_state: (B, L, d) the last layer's token states (what the embedding and
            the multi-vector reading, :mod:`fam.model.multivector`, both read).
        attention_mask: (B, L) bool, the real (non-padding) tokens.
    """

    embedding: torch.Tensor
    hidden_states: dict[int, torch.Tensor]
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    eos_index: torch.Tensor
    has_image: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def eos_state(self, layer: int) -> torch.Tensor:
        """(B, d) un-normalised state of the EOS token at ``layer``."""
        h = self.hidden_states[layer]
        return h[torch.arange(h.shape[0], device=h.device), self.eos_index]


def select_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the masked positions of each row to the front, in sequence order.

    Args:
        hidden: (B, L, d) token states.
        mask: (B, L) bool, the positions to keep (e.g. image tokens).

    Returns:
        tokens (B, N, d) with N = max kept per row, and valid (B, N) bool (False = padding).
    """
    mask = mask.bool()
    counts = mask.sum(1)
    n = max(int(counts.max()) if counts.numel() else 0, 1)
    # Stable sort puts the kept positions first without reordering them.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    tokens = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    valid = torch.arange(n, device=hidden.device)[None] < counts[:, None]
    return tokens, valid


class EmbeddingModel(nn.Module):
    """EOS-pooled, L2-normalised embeddings from a backbone adapter.

    Args:
        adapter: the backbone adapter (owns the transformers model).
        normalize: L2-normalise embeddings (VLM2Vec: yes).
    """

    def __init__(self, adapter: BackboneAdapter, normalize: bool = True):
        super().__init__()
        # The adapter is a module holding the HF model (``adapter.model``): registering it
        # makes .parameters()/.train()/.to() reach the model, and a LoRA wrap or merge
        # (which replaces ``adapter.model``) is seen here without any bookkeeping.
        self.adapter = adapter
        self.normalize = normalize

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def resolve_layer(self, layer: int) -> int:
        """The ``hidden_states`` index of ``layer`` (fam's one convention, see
        :func:`fam.utils.layers.resolve_layer`: 1..n or -1..-n, -1 = last)."""
        return resolve_layer(layer, self.num_layers)

    def forward(self, batch: EncodedBatch, layers: Sequence[int] = (),
                output_attentions: bool = False, pooled_only: bool = False) -> EmbeddingOutput:
        """Embed a batch.

        Args:
            batch: from ``adapter.encode`` (already on the model's device).
            layers: hidden-state layers to return besides the embedding (may be negative).
            output_attentions: also return attention maps (needs eager attention).
            pooled_only: the caller reads only ``embedding`` (not ``last_hidden_state``'s
                other rows): the last layer's token-wise modules then run on the EOS row
                alone (exact, less work; :mod:`fam.backbones.fastpath`).
        """
        # All layers' states only when some are asked for: the embedding needs the last one,
        # and keeping num_layers + 1 (B, L, d) tensors alive costs memory for nothing.
        # Only the EOS row of the last layer is pooled: when the caller reads nothing else,
        # its token-wise modules run on that row alone (exact, less work).
        pooled_only = pooled_only and not layers and not output_attentions
        mods = self.adapter.pooled_token_modules() if pooled_only else []
        # Rows sharing their leading tokens (an instruction): those run once. Encoding only:
        # the split forward equals the plain one to float32 rounding (rotary tables and masks),
        # not to float64's, so in training a batch's path would depend on how it is split
        # (DDP ranks, GradCache chunks) and the float64 parity of those would break.
        shared = shared_prefix_len(self.adapter, batch) if pooled_only and not self.training else 0
        if shared:
            out = None
            last = shared_prefix_forward(self.adapter, batch, shared, mods)
        else:
            with pooled_rows_only(mods, batch.eos_index):
                out = self.adapter.forward(batch, output_hidden_states=bool(layers),
                                           output_attentions=output_attentions)
            last = out.last_hidden_state
        idx = torch.arange(last.shape[0], device=last.device)
        emb = last[idx, batch.eos_index]
        if self.normalize:
            # Half precision is upcast (scores are divided by τ = 0.02); float64 stays
            # float64, so exact-maths tests are not rounded through float32 here.
            if emb.dtype in (torch.float16, torch.bfloat16):
                emb = emb.float()
            emb = F.normalize(emb, dim=-1)
        wanted = {self.resolve_layer(l): out.hidden_states[self.resolve_layer(l)] for l in layers}
        return EmbeddingOutput(emb, wanted, batch.image_mask, batch.text_mask, batch.eos_index,
                               batch.has_image, out.attentions if output_attentions else None,
                               last, batch.inputs["attention_mask"].bool())

    def encode(self, items: Sequence[MMItem], batch_size: int = 32, *,
               progress: bool = False) -> torch.Tensor:
        """Embed items for inference/evaluation (no grad, eval mode restored afterwards).

        Runs :class:`fam.model.encode.EncodePipeline` (length-grouped batches, image loading
        and preprocessing overlapped with the forward); results come back in input order.

        Returns:
            (n, d) float32 L2-normalised embeddings on the CPU.
        """
        return self.encode_all(items, batch_size=batch_size, progress=progress)

    def encode_all(self, items: Sequence[MMItem], batch_size: int = 32, progress: bool = False,
                   desc: str = "encode", images=None) -> torch.Tensor:
        """:meth:`encode` with a progress-bar label (what :func:`fam.eval.evaluate` calls);
        ``images``: optional in-memory images aligned with ``items``
        (:meth:`fam.model.encode.EncodePipeline.encode`)."""
        from fam.model.encode import EncodePipeline
        return EncodePipeline(self, batch_size=batch_size, progress=progress,
                              desc=desc).encode(items, images)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA when the model is in half precision; a no-op otherwise."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    import contextlib
    return contextlib.nullcontext()
