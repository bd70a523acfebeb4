"""The one layer-index convention of fam (method.md §1), resolved in one place.

A transformers model returns ``hidden_states`` as a tuple of ``n + 1`` tensors for an
``n``-layer language model: entry 0 is the input embeddings, entry ``k`` the output of
decoder layer ``k``. Every layer index in fam (``AlignConfig.token_layer``,
``VeinConfig.layers``, the probes' layer lists, ``EmbeddingModel(..., layers=)``) is an
index into that tuple: ``1..n`` count from the first layer, ``-1..-n`` from the last
(``-1`` is layer ``n``). Layer 0, the input embeddings, is only accepted where a caller
says so (the VEIN head's generic per-layer interface).
"""
from __future__ import annotations

from fam.errors import ConfigError

__all__ = ["resolve_layer", "negative_layer"]


def resolve_layer(layer: int, num_layers: int, *, allow_input: bool = False) -> int:
    """The ``hidden_states`` index of ``layer``.

    Args:
        layer: ``1..n`` or ``-1..-n`` (``0``: input embeddings, with ``allow_input``).
        num_layers: ``n``, the language model's decoder layers.
        allow_input: accept layer 0.

    Returns:
        An index in ``[1, n]`` (``[0, n]`` with ``allow_input``).

    Raises:
        ConfigError: the layer does not exist (a ``ValueError``).
    """
    idx = layer if layer >= 0 else num_layers + 1 + layer
    low = 0 if allow_input else 1
    if not low <= idx <= num_layers:
        raise ConfigError(f"layer {layer} is out of range for a {num_layers}-layer language "
                          f"model (use {low}..{num_layers} or -1..-{num_layers})")
    return idx


def negative_layer(layer: int, num_layers: int) -> int:
    """The ``-1..-n`` form of a layer (``resolve_layer``'s inverse on ``1..n``)."""
    return resolve_layer(layer, num_layers) - num_layers - 1
