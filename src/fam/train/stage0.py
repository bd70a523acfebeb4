"""Stage 0: generative pre-training of a tiny LVLM (next-token loss on captions and answers).

The papers start from a pretrained generative LVLM (Qwen2-VL, LLaVA). Offline there is none,
so the default pipeline first teaches the tiny random-initialised model to caption images and
answer questions about them, exactly the objective such models are pretrained with. The
result is saved as a normal checkpoint directory that every later stage loads like a real
checkpoint. Caption data is read in the LLaVA pre-training formats by
:mod:`fam.data.captions`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fam.backbones import load_backbone
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import Stage0Config
from fam.data.captions import CaptionSample, load_captions, load_qa
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.trainer import TrainResult

log = logging.getLogger(__name__)

__all__ = ["build_generative_batch", "GenerativeModule", "generative_parts", "next_token_loss",
           "generative_eval_loss", "Stage0Recipe", "run_stage0"]


def build_generative_batch(adapter: BackboneAdapter, samples: list[CaptionSample],
                           ) -> tuple[EncodedBatch, torch.Tensor]:
    """Tokenise ``<image> prompt target<eos>`` with labels on the target and the EOS only."""
    items = []
    for s in samples:
        head = f"{IMAGE_PLACEHOLDER}\n{s.prompt} "
        text = head + s.target
        items.append(MMItem(text, s.image, content=(len(head), len(text)), source=s.source,
                            line=s.line, field=s.field))
    batch = adapter.encode(items)
    ids = batch.inputs["input_ids"]
    keep = batch.text_mask.clone()
    keep[torch.arange(ids.shape[0]), batch.eos_index] = True
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    return batch, labels


class GenerativeModule(nn.Module):
    """The full generative model; ``forward`` → ``{"nll"}``, the batch's next-token loss."""

    def __init__(self, adapter: BackboneAdapter):
        super().__init__()
        self.adapter = adapter  # a module: registers the model's parameters

    def forward(self, batch: tuple[EncodedBatch, torch.Tensor], step: int = 0,
                ) -> dict[str, torch.Tensor]:
        enc, labels = batch
        return {"nll": self.adapter.generative_loss(enc, labels)}


def next_token_loss(nll: torch.Tensor, *, batch=None, step: int = 0) -> dict[str, torch.Tensor]:
    """Stage 0's loss: the mean next-token NLL of the targets (nats/token)."""
    return {"loss": nll}


@torch.no_grad()
def generative_eval_loss(adapter: BackboneAdapter, samples: list[CaptionSample],
                         batch_size: int = 32) -> float:
    """Mean next-token loss (nats/token) on held-out samples: lower = better language model."""
    model = adapter.model
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(samples), batch_size):
            enc, labels = build_generative_batch(adapter, samples[i:i + batch_size])
            enc = enc.to(adapter.device)
            labels = labels.to(adapter.device)
            loss = adapter.generative_loss(enc, labels)
            ntok = int((labels[:, 1:] != -100).sum())
            total += float(loss) * ntok
            n += ntok
    finally:
        model.train(was)
    return total / max(n, 1)


def generative_parts(module: GenerativeModule, samples: list[CaptionSample]) -> StageParts:
    """The parts of a next-token stage (stage 0, SFT): loss, data, collate, device move."""
    adapter = module.adapter
    return StageParts(module, next_token_loss, samples,
                      lambda ex: build_generative_batch(adapter, ex),
                      to_device=lambda b, d: (b[0].to(d), b[1].to(d)))


class Stage0Recipe(Recipe):
    """Every weight of the model trains on (image, prompt → caption / answer) samples."""

    cfg: Stage0Config
    name = "stage0"

    def module(self) -> GenerativeModule:
        adapter = load_backbone(self.cfg.model, max_text_tokens=self.cfg.max_text_tokens,
                                **self.cfg.backbone.load_options())
        for p in adapter.model.parameters():
            p.requires_grad_(True)
        return GenerativeModule(adapter)

    def build(self) -> StageParts:
        cfg = self.cfg
        module = self.module()
        root = cfg.image_root or str(Path(cfg.captions).parent)
        samples = load_captions(cfg.captions, root, cfg.prompt)
        if cfg.qa:
            samples += load_qa(cfg.qa, root)
        log.info("stage 0: %d samples from %s", len(samples), cfg.captions)
        return generative_parts(module, samples)

    def export(self, module: GenerativeModule, final: Path, result: TrainResult) -> None:
        module.adapter.model.eval()
        module.adapter.save_pretrained(final)


def run_stage0(cfg: Stage0Config) -> Path:
    """Train the generative model and save it to ``<out_dir>/model``; returns that path."""
    return run_stage(cfg)
