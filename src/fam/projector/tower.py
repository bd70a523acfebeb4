"""Contrastive pretraining of a LLaVA checkpoint's vision tower (CLIP / SigLIP style).

LLaVA's projector is trained on top of a CLIP tower that was pretrained contrastively and
is then frozen. The tiny Scenes LLaVA has no such tower, so :class:`TowerModel` pairs the
checkpoint's own vision tower (a ``CLIPVisionModel``) with a small text encoder and
trains both with an image-text contrastive loss (:mod:`fam.losses.tower`):

* image embedding: the tower's pooled output (post-LayerNorm CLS of the last layer, as
  CLIP) through a linear projection;
* text embedding: a tiny ``CLIPTextModel`` over the checkpoint's own tokenizer, pooled at
  the EOS token, through a linear projection;
* loss: CLIP's symmetric InfoNCE or SigLIP's pairwise sigmoid, learnable temperature.

Built on transformers' ``CLIPModel``, whose ``vision_model`` has the same module layout as
LLaVA's vision tower: :func:`export_vision_tower` copies the trained
weights back into the LLaVA checkpoint key for key, and the checkpoint's vision tower is
then frozen by every later stage.

The stage ``fam train tower`` (:class:`TowerRecipe`, config
:class:`fam.config.TowerConfig`) trains it on a LLaVA caption file and exports the input
checkpoint with the trained tower.

Example:
    >>> tower = TowerModel.from_llava(adapter, text_hidden=64)          # doctest: +SKIP
    >>> out = tower(pixel_values, input_ids, attention_mask)            # doctest: +SKIP
    >>> export_vision_tower(tower, adapter)                              # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fam.backbones import load_backbone
from fam.config import TowerConfig
from fam.config.stages import TOWER_LOSSES
from fam.data.captions import CaptionSample, load_captions
from fam.data.images import load_image
from fam.errors import ConfigError
from fam.losses.tower import (CLIP_INIT_LOG_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE,
                              tower_loss)
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.trainer import TrainResult
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["TOWER_LOSSES", "TowerBatch", "TowerModel", "TowerModule", "TowerRecipe",
           "export_vision_tower", "llava_vision_tower", "run_tower", "tower_objective"]


def llava_vision_tower(hf_model: nn.Module) -> nn.Module:
    """The CLIP vision transformer inside a LLaVA model.

    transformers 5 stores LLaVA's ``vision_tower`` as a ``CLIPVisionModel`` whose modules
    (``embeddings``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``) sit directly on it,
    exactly the layout of ``CLIPModel.vision_model``; older versions nest them one level
    down in ``vision_tower.vision_model``. Both are handled.
    """
    m = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    for owner in (getattr(m, "model", None), m):
        tower = getattr(owner, "vision_tower", None) if owner is not None else None
        if tower is None:
            continue
        tower = getattr(tower, "vision_model", tower)
        if hasattr(tower, "embeddings") and hasattr(tower, "encoder"):
            return tower
    raise ConfigError(f"{type(m).__name__} has no CLIP vision_tower: the tower stage needs a "
                      "LLaVA-style checkpoint with a CLIP vision tower")


class TowerModel(nn.Module):
    """CLIP/SigLIP image-text model around a LLaVA vision config (module docstring).

    Args:
        vision_config: the LLaVA checkpoint's ``vision_config`` (a ``CLIPVisionConfig``).
        vocab_size: tokenizer size of the text encoder.
        eos_token_id / pad_token_id: the tokenizer's EOS (pooling position) and pad ids.
        text_hidden: text-encoder width; ``text_layers``: its depth.
        projection_dim: joint embedding width.
        loss: "clip" | "siglip".
        max_text_tokens: text positions of the text encoder.
    """

    def __init__(self, vision_config: Any, vocab_size: int, eos_token_id: int, pad_token_id: int,
                 text_hidden: int = 64, text_layers: int = 2, projection_dim: int = 64,
                 loss: str = "clip", max_text_tokens: int = 64):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel
        if loss not in TOWER_LOSSES:  # also checked by TowerConfig; direct callers too
            raise ValueError(f"tower loss {loss!r}: expected one of {TOWER_LOSSES}")
        text = dict(vocab_size=vocab_size, hidden_size=text_hidden,
                    intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                    num_attention_heads=max(1, text_hidden // 32),
                    max_position_embeddings=max_text_tokens, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, bos_token_id=eos_token_id)
        vision = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config)
        vision.pop("model_type", None)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
        self.clip = CLIPModel(cfg)
        self.loss_kind = loss
        init = CLIP_INIT_LOG_SCALE if loss == "clip" else SIGLIP_INIT_LOG_SCALE
        with torch.no_grad():
            self.clip.logit_scale.fill_(init)
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS)) if loss == "siglip" else None
        self.eos_token_id = int(eos_token_id)
        self.max_text_tokens = int(max_text_tokens)

    @classmethod
    def from_llava(cls, adapter: Any, **kwargs: Any) -> "TowerModel":
        """A tower model whose vision side starts from ``adapter``'s vision tower weights."""
        src_tower = llava_vision_tower(adapter.hf_model)  # a clear error on other families
        tok = adapter.tokenizer
        model = cls(adapter.config.vision_config, len(tok), int(tok.eos_token_id),
                    int(tok.pad_token_id), **kwargs)
        model.clip.vision_model.load_state_dict(src_tower.state_dict())
        return model

    def encode_text(self, texts: list[str], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Tokenise captions with an EOS appended (the pooling position), cut to
        ``max_text_tokens`` with the EOS kept."""
        rows = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][:self.max_text_tokens - 1]
            rows.append(list(ids) + [self.eos_token_id])
        n = max(len(r) for r in rows)
        pad = int(tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, P)`` image and text embeddings (not normalised)."""
        img = self.clip.get_image_features(pixel_values=pixel_values)
        txt = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return img, txt

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        img, txt = self.embed(pixel_values, input_ids, attention_mask)
        return tower_loss(self.loss_kind, img, txt, self.clip.logit_scale, self.logit_bias)


@torch.no_grad()
def export_vision_tower(tower: TowerModel, adapter: Any) -> None:
    """Copy the trained vision weights into ``adapter``'s LLaVA vision tower (in place)."""
    dst = llava_vision_tower(adapter.hf_model)
    missing, unexpected = dst.load_state_dict(tower.clip.vision_model.state_dict(), strict=True)
    if missing or unexpected:  # strict=True raises first; kept for clarity of intent
        raise ValueError(f"vision tower keys differ: missing {missing}, unexpected {unexpected}")
    log.info("tower: copied %d vision tensors into the LLaVA checkpoint",
             len(tower.clip.vision_model.state_dict()))


# ----------------------------------------------------------------------------- the stage


@dataclass
class TowerBatch:
    """A collated batch: ``pixel_values`` (B, 3, H, W), ``input_ids`` / ``attention_mask``
    (B, L) of the captions (EOS-terminated)."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "TowerBatch":
        return TowerBatch(self.pixel_values.to(device), self.input_ids.to(device),
                          self.attention_mask.to(device))


class TowerModule(nn.Module):
    """The stage's module: the LLaVA adapter (frozen; kept for the export) and the
    :class:`TowerModel` (trainable). ``forward`` → ``{"image", "text", "log_scale"[,
    "bias"]}``: the two embeddings and the learnable temperature (and SigLIP bias)."""

    def __init__(self, adapter: Any, tower: TowerModel):
        super().__init__()
        self.adapter = adapter
        self.tower = tower

    def forward(self, batch: TowerBatch, step: int = 0) -> dict[str, torch.Tensor]:
        img, txt = self.tower.embed(batch.pixel_values, batch.input_ids, batch.attention_mask)
        out = {"image": img, "text": txt, "log_scale": self.tower.clip.logit_scale}
        if self.tower.logit_bias is not None:
            out["bias"] = self.tower.logit_bias
        return out


def tower_objective(kind: str):
    """The stage's loss over :class:`TowerModule`'s outputs (taken by keyword)."""

    def loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor,
             bias: torch.Tensor | None = None, *, batch: Any = None, step: int = 0,
             ) -> dict[str, torch.Tensor]:
        return tower_loss(kind, image, text, log_scale, bias)
    return loss


class TowerRecipe(Recipe):
    """``fam train tower``: the LLaVA's vision tower and a tiny text encoder train on
    image-caption pairs; the export is the input checkpoint with the trained tower."""

    cfg: TowerConfig
    name = "tower"

    def module(self) -> TowerModule:
        cfg = self.cfg
        adapter = load_backbone(cfg.model, **cfg.backbone.load_options())
        for p in adapter.model.parameters():
            p.requires_grad_(False)
        tower = TowerModel.from_llava(adapter, text_hidden=cfg.text_hidden,
                                      text_layers=cfg.text_layers,
                                      projection_dim=cfg.projection_dim, loss=cfg.loss,
                                      max_text_tokens=cfg.max_text_tokens)
        n = sum(p.numel() for p in tower.parameters())
        log.info("tower: %s loss, %d trainable parameters (vision tower + text encoder)",
                 cfg.loss, n)
        return TowerModule(adapter, tower)

    def build(self) -> StageParts:
        cfg = self.cfg
        module = self.module()
        root = cfg.image_root or str(Path(cfg.captions).parent)
        samples = load_captions(cfg.captions, root)
        adapter, tower = module.adapter, module.tower

        def collate(rows: list[CaptionSample]) -> TowerBatch:
            images = [load_image(s.image, source=s.source, line=s.line, field=s.field)
                      for s in rows]
            pix, _ = adapter.process_images(images)
            txt = tower.encode_text([s.target for s in rows], adapter.tokenizer)
            return TowerBatch(pix["pixel_values"], txt["input_ids"], txt["attention_mask"])

        log.info("tower: %d image-caption pairs from %s", len(samples), cfg.captions)
        return StageParts(module, tower_objective(cfg.loss), samples, collate,
                          to_device=lambda b, d: b.to(d))

    def export(self, module: TowerModule, final: Path, result: TrainResult) -> None:
        export_vision_tower(module.tower, module.adapter)
        module.adapter.model.eval()
        module.adapter.save_pretrained(final)
        atomic_write_json(Path(final).parent / "tower.json", {
            "loss": self.cfg.loss, "steps": result.steps,
            "final_metrics": result.final_metrics})


def run_tower(cfg: TowerConfig) -> Path:
    """Pretrain the tower; returns ``<run.out_dir>/model`` (the LLaVA with the new tower)."""
    return run_stage(cfg)
