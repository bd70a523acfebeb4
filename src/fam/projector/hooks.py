"""Hooks on the projector of a LLaVA-style model: find it, tap its input and output.

LLaVA's vision tower flattens its conv patch grid row by row and the model scatters the
projected tokens into the ``<image>`` positions in sequence order, so the ``n``-th image
token is grid cell ``(n // G_w, n % G_w)`` (raster order), after the CLS token when
``vision_feature_select_strategy == "full"`` (:func:`fam.projector.regions.token_layout`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from fam.errors import ConfigError

__all__ = ["projector_module", "ProjectorTap", "vision_tokens"]


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The ``multi_modal_projector`` of a LLaVA-style model (peft wrappers are unwrapped).

    Raises:
        ConfigError: the model has no ``multi_modal_projector`` (e.g. Qwen2-VL, whose
            merger sits inside the vision tower).
    """
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (getattr(m, "model", None), m):
        proj = getattr(owner, "multi_modal_projector", None) if owner is not None else None
        if proj is not None:
            return proj
    mt = getattr(getattr(m, "config", None), "model_type", type(m).__name__)
    raise ConfigError(f"model_type {mt!r} has no multi_modal_projector: projector training "
                      "and the alignment report need a LLaVA-style checkpoint "
                      "(vision tower → multi_modal_projector → LLM)")


class ProjectorTap:
    """Context manager recording the input and output of every call of a module.

    Used on ``multi_modal_projector``: its input is the vision-tower features as fed to the
    projector ``(B, N, d_v)``, its output the projected tokens ``(B, N, d)`` in raster order
    (see the module docstring). The recorded tensors keep their autograd graph.

    Example:
        >>> with ProjectorTap(projector_module(model)) as tap:
        ...     loss = adapter.generative_loss(batch, labels)
        >>> tokens = tap.output          # (B, N, d)
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._handle: Any = None

    def _hook(self, mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.inputs.append(args[0] if args else None)
        self.outputs.append(out)

    def __enter__(self) -> "ProjectorTap":
        self.inputs.clear()
        self.outputs.clear()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._handle.remove()
        return False

    def _one(self, seq: list[torch.Tensor], what: str) -> torch.Tensor:
        if len(seq) != 1:
            raise RuntimeError(f"ProjectorTap: the projector ran {len(seq)} times in the "
                               f"block, expected exactly once to read its {what}")
        return seq[0]

    @property
    def input(self) -> torch.Tensor:
        """``(B, N, d_v)`` features fed to the projector in the single recorded call."""
        return self._one(self.inputs, "input")

    @property
    def output(self) -> torch.Tensor:
        """``(B, N, d)`` projected tokens of the single recorded call."""
        return self._one(self.outputs, "output")


@torch.no_grad()
def vision_tokens(adapter: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision tokens of images before and after the projector (vision tower + projector only).

    Args:
        adapter: a LLaVA-style backbone adapter.
        images: PIL images.

    Returns:
        ``(before, after)``: ``(B, N, d_v)`` projector inputs and ``(B, N, d)`` projector
        outputs, float32 on the CPU, raster token order.
    """
    pix, _ = adapter.process_images(list(images))
    pv = pix["pixel_values"].to(adapter.device, adapter.dtype)
    hf = adapter.hf_model
    with ProjectorTap(projector_module(hf)) as tap:
        hf.model.get_image_features(pixel_values=pv)
    return tap.input.float().cpu(), tap.output.float().cpu()
