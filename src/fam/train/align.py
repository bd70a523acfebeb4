"""FAM stage 1: Multi-granularity Aligned Contrastive (MAC) training on image-caption pairs.

Each image and each caption is encoded separately (method.md §2): the image as
``<image> Represent the given image.`` and the caption after a retrieval instruction. The
EOS embeddings give the coarse term, the token states of a chosen layer (image tokens of the
image input, caption tokens of the text input) the coarse-to-fine and fine terms, all through
the exact mean-of-normalised-tokens form of :func:`fam.losses.mac.mac_loss`. As in the
official code, the stage trains a LoRA that is merged into the weights at the end, so
stage 2 starts from a normal checkpoint and puts a fresh LoRA on top.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import AlignConfig, LoraConfig, to_dict
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.losses.mac import mac_loss_from_pooled, mac_pool
from fam.model import EmbeddingModel, merge_lora
from fam.train.stage0 import CaptionSample, load_captions
from fam.train.gradcache import GradCacheMixin, chunk_bounds, split_encoded
from fam.train.trainer import Trainer, save_on_main_rank

log = logging.getLogger(__name__)


@dataclass
class AlignBatch:
    images: EncodedBatch
    texts: EncodedBatch

    def to(self, device: torch.device) -> "AlignBatch":
        return AlignBatch(self.images.to(device), self.texts.to(device))


class AlignCollator:
    """(image, caption) samples -> separately encoded image and text inputs."""

    def __init__(self, adapter: BackboneAdapter, image_instruction: str, text_instruction: str):
        self.adapter = adapter
        self.img_instr = image_instruction
        self.txt_instr = text_instruction

    def __call__(self, samples: Sequence[CaptionSample]) -> AlignBatch:
        imgs = [MMItem(f"{IMAGE_PLACEHOLDER}\n{self.img_instr}", s.image, source=s.source,
                       line=s.line, field=s.field) for s in samples]
        txts = []
        for s in samples:
            text = self.txt_instr + s.target
            # Only the caption's tokens are text tokens for the c2f/fine terms (method.md §1).
            txts.append(MMItem(text, None, content=(len(self.txt_instr), len(text))))
        return AlignBatch(self.adapter.encode(imgs), self.adapter.encode(txts))


class MACModule(GradCacheMixin, nn.Module):
    """Embedding model trained with the MAC loss; ``forward`` returns its named terms.

    MAC depends on the encoder only through four ``(B, d)`` representations (``e_img``,
    ``e_txt``, ``v̄``, ``t̄``; :func:`fam.losses.mac.mac_pool`), so it is GradCache-able:
    with ``gradcache_chunk > 0`` the Trainer runs :meth:`train_step` (see
    :mod:`fam.train.gradcache`).
    """

    def __init__(self, embedder: EmbeddingModel, token_layer: int = -1,
                 temperature: float = 0.02, weights: Sequence[float] = (1.0, 1.0, 1.0),
                 c2f_reduction: str = "mean", gradcache_chunk: int = 0):
        super().__init__()
        self.embedder = embedder
        self.layer = embedder.resolve_layer(token_layer)
        self.temperature = temperature
        self.weights = tuple(weights)
        self.c2f_reduction = c2f_reduction
        self.gradcache_chunk = gradcache_chunk

    def forward(self, batch: AlignBatch, step: int = 0, mode: str = "loss") -> dict:
        """``mode="loss"``: the named MAC terms. ``mode="reps"``: ``{"reps": {e_img, e_txt,
        v_bar, t_bar}}``, each (B, d) (the GradCache protocol)."""
        io = self.embedder(batch.images, [self.layer])
        to = self.embedder(batch.texts, [self.layer])
        # Token states over the whole sequence with the adapter's masks: the exact form of
        # MAC only needs masked means, so no gather into (B, N, d) is necessary.
        v_bar, t_bar = mac_pool(io.hidden_states[self.layer], to.hidden_states[self.layer],
                                io.image_mask, to.text_mask)
        # One dtype for the four score inputs (embeddings are float32; float64 models in tests).
        dt = io.embedding.dtype
        reps = {"e_img": io.embedding, "e_txt": to.embedding, "v_bar": v_bar.to(dt),
                "t_bar": t_bar.to(dt)}
        if mode == "reps":
            return {"reps": reps, "aux": None, "aux_n": 0}
        terms = self.gc_loss([reps], [batch], 0)
        terms.pop("aux_scale")
        return terms

    def gc_split(self, batch: AlignBatch, size: int) -> list[AlignBatch]:
        return [AlignBatch(split_encoded(batch.images, s, e), split_encoded(batch.texts, s, e))
                for s, e in chunk_bounds(batch.images.batch_size, size)]

    def gc_loss(self, reps, chunks, aux_n: int) -> dict[str, torch.Tensor]:
        cat = {k: torch.cat([r[k] for r in reps]) for k in reps[0]}
        terms = mac_loss_from_pooled(cat["e_img"], cat["e_txt"], cat["v_bar"], cat["t_bar"],
                                     temperature=self.temperature, weights=self.weights,
                                     c2f_reduction=self.c2f_reduction)
        out = {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
        out["aux_scale"] = 0.0
        return out


def run_align(cfg: AlignConfig) -> Path:
    """Train stage 1 and save the (LoRA-merged) model to ``<out_dir>/model``."""
    out = Path(cfg.run.out_dir)
    final = out / "model"
    if (final / "config.json").exists() and cfg.run.resume:
        log.info("align: %s already holds a trained model; skipping", final)
        return final
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    from fam.train.adapt import prepare_embedder, trained_embedder

    def make_embedder() -> EmbeddingModel:
        return prepare_embedder(cfg.model, cfg.run, max_text_tokens=cfg.max_text_tokens,
                                full_finetune=cfg.full_finetune,
                                freeze_vision=cfg.freeze_vision,
                                lora=LoraConfig(**{**cfg.lora.__dict__, "enabled": True}))
    emb = make_embedder()
    adapter = emb.adapter
    root = cfg.image_root or str(Path(cfg.captions).parent)
    samples = load_captions(cfg.captions, root)
    module = MACModule(emb, cfg.token_layer, cfg.temperature, cfg.weights, cfg.c2f_reduction,
                       cfg.gradcache_chunk)
    collate = AlignCollator(adapter, cfg.image_instruction, cfg.text_instruction)
    trainer = Trainer(module, samples, collate, cfg.optim, cfg.run, "align-mac",
                      config_dump=to_dict(cfg))
    trainer.train()
    emb = trained_embedder(trainer, emb, make_embedder)
    adapter = emb.adapter
    merge_lora(emb)  # official code: merge before stage 2 puts a fresh LoRA on top
    adapter.model.eval()
    if save_on_main_rank(lambda: adapter.save_pretrained(final)):
        log.info("align: saved the stage-1 model to %s", final)
    return final
