"""LLaVA stage 2 (``fam train sft``): projector + LLM LoRA on instruction data.

The paper (arXiv 2505.17316) measures its patch-aligned projector *after* the same
supervised fine-tuning as the baseline's: the projector and the language model train on
instruction data while the vision tower stays frozen. Here the language model trains
through a LoRA (config ``lora``), the projector fully (``train_projector``), on
``{image, question, answer}`` rows (the Scenes rows of :mod:`fam.data.instructions`: VQA and
referring-expression grounding as box text), with the next-token loss on the answer and
EOS only (:func:`fam.train.stage0.build_generative_batch`). The export merges the LoRA into
the weights and saves a plain checkpoint; :mod:`fam.eval.sft` scores it.

Example:
    >>> run_sft(SftConfig(model="runs/patch-s0/model", data="data/sft_train.json",
    ...                   run=RunConfig(out_dir="runs/sft-patch-s0")))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from pathlib import Path

from fam.backbones import load_backbone
from fam.config import SftConfig
from fam.data.captions import load_qa
from fam.model import apply_lora, merge_lora
from fam.projector.hooks import projector_module
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.stage0 import GenerativeModule, generative_parts
from fam.train.trainer import TrainResult
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["SftRecipe", "run_sft"]


class SftRecipe(Recipe):
    """Projector (full) + LLM (LoRA) on instruction rows; the vision tower frozen."""

    cfg: SftConfig
    name = "sft"

    def module(self) -> GenerativeModule:
        cfg = self.cfg
        adapter = load_backbone(cfg.model, max_text_tokens=cfg.max_text_tokens,
                                **cfg.backbone.load_options())
        for p in adapter.model.parameters():
            p.requires_grad_(False)
        module = GenerativeModule(adapter)
        if cfg.lora.enabled:
            apply_lora(module, cfg.lora)   # peft freezes all but the LoRA weights
        if cfg.train_projector:
            projector_module(adapter.model).requires_grad_(True)
        n = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
        log.info("sft: %d trainable parameters (LoRA %s, projector %s)", n,
                 "on" if cfg.lora.enabled else "off", "on" if cfg.train_projector else "off")
        return module

    def build(self) -> StageParts:
        cfg = self.cfg
        module = self.module()
        root = cfg.image_root or str(Path(cfg.data).parent)
        samples = load_qa(cfg.data, root)
        log.info("sft: %d instruction rows from %s", len(samples), cfg.data)
        return generative_parts(module, samples)

    def export(self, module: GenerativeModule, final: Path, result: TrainResult) -> None:
        merge_lora(module)
        module.adapter.model.eval()
        module.adapter.save_pretrained(final)
        atomic_write_json(Path(final).parent / "sft.json", {
            "steps": result.steps, "final_metrics": result.final_metrics,
            "lora": self.cfg.lora.enabled, "train_projector": self.cfg.train_projector})


def run_sft(cfg: SftConfig) -> Path:
    """Fine-tune and save to ``<run.out_dir>/model`` (LoRA merged); returns that path."""
    return run_stage(cfg)
