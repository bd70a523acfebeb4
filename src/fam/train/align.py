"""FAM stage 1: Multi-granularity Aligned Contrastive (MAC) training on image-caption pairs.

Each image and each caption is encoded separately (method.md §2): the image as
``<image> Represent the given image.`` and the caption after a retrieval instruction. The
EOS embeddings give the coarse term, the token states of a chosen layer (image tokens of the
image input, caption tokens of the text input) the coarse-to-fine and fine terms, all through
the exact mean-of-normalised-tokens form of :func:`fam.losses.mac.mac_loss`: the module
outputs the four ``(B, d)`` representations, :class:`MACLoss` scores them. As in the
official code, the stage trains a LoRA that is merged into the weights at the end, so
stage 2 starts from a normal checkpoint and puts a fresh LoRA on top.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import AlignConfig
from fam.data.captions import CaptionSample, load_captions
from fam.data.types import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MMItem
from fam.losses.mac import mac_loss_from_pooled, mac_pool
from fam.model import EmbeddingModel, merge_lora
from fam.train.embedder import prepare_embedder
from fam.train.gradcache import chunk_bounds, split_encoded
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.trainer import TrainResult

log = logging.getLogger(__name__)

__all__ = ["AlignBatch", "AlignCollator", "MACModule", "MACLoss", "AlignRecipe", "run_align"]


@dataclass
class AlignBatch:
    images: EncodedBatch
    texts: EncodedBatch

    def to(self, device: torch.device) -> "AlignBatch":
        return AlignBatch(self.images.to(device), self.texts.to(device))

    def split(self, size: int) -> list["AlignBatch"]:
        """Row chunks of at most ``size`` pairs (GradCache)."""
        return [AlignBatch(split_encoded(self.images, s, e), split_encoded(self.texts, s, e))
                for s, e in chunk_bounds(self.images.batch_size, size)]


class AlignCollator:
    """(image, caption) samples -> separately encoded image and text inputs."""

    def __init__(self, adapter: BackboneAdapter, image_instruction: str, text_instruction: str):
        self.adapter = adapter
        self.img_instr = image_instruction
        self.txt_instr = text_instruction

    def __call__(self, samples: Sequence[CaptionSample]) -> AlignBatch:
        # A video caption: the video's tokens are its fine-grained tokens (image_mask).
        imgs = [MMItem(f"{VIDEO_PLACEHOLDER if s.video else IMAGE_PLACEHOLDER}\n{self.img_instr}",
                       s.image, video=s.video, source=s.source, line=s.line, field=s.field)
                for s in samples]
        txts = []
        for s in samples:
            text = self.txt_instr + s.target
            # Only the caption's tokens are text tokens for the c2f/fine terms (method.md §1).
            txts.append(MMItem(text, None, content=(len(self.txt_instr), len(text))))
        return AlignBatch(self.adapter.encode(imgs), self.adapter.encode(txts))


class MACModule(nn.Module):
    """The embedding model; ``forward`` → the four ``(B, d)`` representations MAC needs.

    ``e_img``, ``e_txt`` (EOS embeddings) and ``v_bar``, ``t_bar`` (means of the normalised
    image / caption token states of ``token_layer``; :func:`fam.losses.mac.mac_pool`). MAC
    depends on the encoder only through them, which is what makes it GradCache-able.
    """

    def __init__(self, embedder: EmbeddingModel, token_layer: int = -1):
        super().__init__()
        self.embedder = embedder
        self.layer = embedder.resolve_layer(token_layer)

    def forward(self, batch: AlignBatch, step: int = 0) -> dict[str, torch.Tensor]:
        io = self.embedder(batch.images, [self.layer])
        to = self.embedder(batch.texts, [self.layer])
        # Token states over the whole sequence with the adapter's masks: the exact form of
        # MAC only needs masked means, so no gather into (B, N, d) is necessary.
        v_bar, t_bar = mac_pool(io.hidden_states[self.layer], to.hidden_states[self.layer],
                                io.image_mask, to.text_mask)
        # One dtype for the four score inputs (embeddings are float32; float64 models in tests).
        dt = io.embedding.dtype
        return {"e_img": io.embedding, "e_txt": to.embedding, "v_bar": v_bar.to(dt),
                "t_bar": t_bar.to(dt)}


@dataclass
class MACLoss:
    """``L_align = w_c L_c + w_c2f L_c2f + w_f L_f`` over the module's outputs (method.md §2)."""

    temperature: float = 0.02
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    c2f_reduction: str = "mean"

    def __call__(self, e_img, e_txt, v_bar, t_bar, *, batch=None, step: int = 0,
                 ) -> dict[str, torch.Tensor]:
        terms = mac_loss_from_pooled(e_img, e_txt, v_bar, t_bar, temperature=self.temperature,
                                     weights=self.weights, c2f_reduction=self.c2f_reduction)
        return {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}


class AlignRecipe(Recipe):
    """A fresh LoRA (or the LM weights) trained with MAC, merged into the exported model."""

    cfg: AlignConfig
    name = "align-mac"

    def module(self) -> MACModule:
        cfg = self.cfg
        emb = prepare_embedder(cfg.model, cfg.run, max_text_tokens=cfg.max_text_tokens,
                               full_finetune=cfg.full_finetune, freeze_vision=cfg.freeze_vision,
                               lora=dataclasses.replace(cfg.lora, enabled=True),
                               backbone=cfg.backbone)
        return MACModule(emb, cfg.token_layer)

    def build(self) -> StageParts:
        cfg = self.cfg
        module = self.module()
        samples = load_captions(cfg.captions, cfg.image_root or str(Path(cfg.captions).parent),
                                allow_video=True)
        collate = AlignCollator(module.embedder.adapter, cfg.image_instruction,
                                cfg.text_instruction)
        return StageParts(module, MACLoss(cfg.temperature, tuple(cfg.weights), cfg.c2f_reduction),
                          samples, collate, gradcache_chunk=cfg.gradcache_chunk)

    def export(self, module: MACModule, final: Path, result: TrainResult) -> None:
        merge_lora(module.embedder)  # official code: merge before stage 2 puts a fresh LoRA on top
        module.embedder.adapter.model.eval()
        module.embedder.adapter.save_pretrained(final)


def run_align(cfg: AlignConfig) -> Path:
    """Train stage 1 and save the (LoRA-merged) model to ``<out_dir>/model``."""
    return run_stage(cfg)
