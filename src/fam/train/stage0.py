"""Stage 0: generative pre-training of a tiny LVLM (next-token loss on captions and answers).

The papers start from a pretrained generative LVLM (Qwen2-VL, LLaVA). Offline there is none,
so the default pipeline first teaches the tiny random-initialised model to caption images and
answer questions about them, exactly the objective such models are pretrained with. The
result is saved as a normal checkpoint directory that every later stage loads like a real
checkpoint.

Caption data is read in the LLaVA pre-training formats by :mod:`fam.data.captions`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fam.backbones import load_backbone
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import Stage0Config, to_dict
from fam.data.captions import CaptionSample, load_captions, load_qa
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.train.trainer import Trainer

log = logging.getLogger(__name__)


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
    """Next-token loss of the full generative model on (prompt → target) samples."""

    def __init__(self, adapter: BackboneAdapter):
        super().__init__()
        self.adapter = adapter  # a module: registers the model's parameters

    def forward(self, batch: tuple[EncodedBatch, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        enc, labels = batch
        return {"loss": self.adapter.generative_loss(enc, labels)}


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


def run_stage0(cfg: Stage0Config) -> Path:
    """Train the generative model and save it to ``<out_dir>/model``; returns that path."""
    out = Path(cfg.run.out_dir)
    final = out / "model"
    if (final / "config.json").exists() and cfg.run.resume:
        log.info("stage 0: %s already holds a trained model; skipping", final)
        return final
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    adapter = load_backbone(cfg.model, max_text_tokens=cfg.max_text_tokens)
    root = cfg.image_root or str(Path(cfg.captions).parent)
    samples = load_captions(cfg.captions, root, cfg.prompt)
    if cfg.qa:
        samples += load_qa(cfg.qa, root)
    log.info("stage 0: %d samples from %s", len(samples), cfg.captions)
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    module = GenerativeModule(adapter)
    trainer = Trainer(module, samples, lambda ex: build_generative_batch(adapter, ex), cfg.optim,
                      cfg.run, "stage0",
                      to_device=lambda b, d: (b[0].to(d), b[1].to(d)),
                      config_dump=to_dict(cfg))
    trainer.train()
    adapter.model.eval()
    adapter.save_pretrained(final)
    log.info("stage 0: saved the generative model to %s", final)
    return final
