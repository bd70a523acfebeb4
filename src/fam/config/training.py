"""Sections shared by every training stage: optimisation, LoRA, run bookkeeping, inputs."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fam.config.checks import Validated, choice, fail, integer, integers, number, pair_list, text

__all__ = ["OptimConfig", "LoraConfig", "RunConfig", "BackboneConfig", "SCHEDULES", "PRECISIONS",
           "STRATEGIES", "ATTN_IMPLEMENTATIONS", "PROMPT_FORMATS", "IMAGE_RESOLUTIONS"]

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
ATTN_IMPLEMENTATIONS = ("", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                        "flex_attention")
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
#: The prompt formats and named pre-resize values of fam.backbones.options (a test keeps the
#: two equal; config may not import backbones).
PROMPT_FORMATS = ("fam", "vlm2vec")
IMAGE_RESOLUTIONS = ("none", "high", "mid", "low", "cap")
_SIZE = re.compile(r"\d+(x\d+)?")


@dataclass
class OptimConfig(Validated):
    lr: float = 2e-4  # peak learning rate (VLM2Vec LoRA runs use 2e-5..2e-4; tiny models like more)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (PyTorch default)
    warmup_ratio: float = 0.05  # fraction of steps with linear warm-up (VLM2Vec: 0.05)
    schedule: str = "cosine"  # decay after warm-up: "cosine" | "linear" | "constant"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    batch_size: int = 32  # pairs per optimizer step (per process)
    steps: int = 200  # optimizer steps for the stage
    grad_accum: int = 1  # micro-batches per optimizer step

    def check(self, prefix: str) -> None:
        number(prefix + "lr", self.lr, 0.0, low_open=True)
        number(prefix + "weight_decay", self.weight_decay, 0.0)
        pair_list(prefix + "betas", self.betas, 2)
        for i, b in enumerate(self.betas):
            number(f"{prefix}betas[{i}]", b, 0.0, 1.0, high_open=True)
        number(prefix + "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        choice(prefix + "schedule", self.schedule, SCHEDULES)
        number(prefix + "grad_clip", self.grad_clip, 0.0)
        integers(self, prefix, batch_size=1, steps=1, grad_accum=1)
        if self.batch_size % self.grad_accum:
            fail(prefix + "grad_accum", self.grad_accum,
                 f"must divide {prefix}batch_size={self.batch_size} (micro-batches are equal)")


@dataclass
class LoraConfig(Validated):
    enabled: bool = False  # LoRA on the language model's linear layers (papers: on)
    r: int = 8  # rank (FAM/VLM2Vec: 8)
    alpha: int = 16  # scaling numerator (papers use 2r..64)
    dropout: float = 0.05  # dropout on the LoRA branch
    use_dora: bool = False  # DoRA (weight-decomposed LoRA) via peft

    def check(self, prefix: str) -> None:
        integer(prefix + "r", self.r, 1)
        integer(prefix + "alpha", self.alpha, 1)
        number(prefix + "dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass
class RunConfig(Validated):
    out_dir: str = "runs/default"  # where checkpoints, logs and the final model go
    seed: int = 0  # seeds data order, init of new modules and dropout
    log_every: int = 10  # steps between tensorboard/log lines
    save_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    num_workers: int = 0  # DataLoader workers (image decoding); 0 on 2-core machines
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "fp16"
    progress: bool = True  # tqdm progress bars
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    gradient_checkpointing: bool = False  # recompute LM/vision layer activations in backward
    attn_implementation: str = ""  # "" (transformers' default) | "sdpa" | "eager" | "flash_attention_2"
    strategy: str = "ddp"  # under torchrun: "ddp" (replicated) | "fsdp" (FSDP2, shard per decoder layer)
    ddp_find_unused_parameters: bool = True  # DDP: tolerate trainable params without grad (lm_head, idle VEIN)

    def check(self, prefix: str) -> None:
        text(prefix + "out_dir", self.out_dir, "the run's output folder")
        integers(self, prefix, seed=0, log_every=1, save_every=0, keep_checkpoints=1,
                 num_workers=0, threads=0)
        if not _DEVICE.fullmatch(self.device):
            fail(prefix + "device", self.device,
                 "unknown device; use auto, cpu, mps, cuda or cuda:N")
        choice(prefix + "precision", self.precision, PRECISIONS)
        choice(prefix + "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        choice(prefix + "strategy", self.strategy, STRATEGIES)


@dataclass
class BackboneConfig(Validated):
    """How inputs reach the backbone (docs/vlm2vec.md); unset = what the model was saved with."""

    prompt_format: str = ""  # "" (the model's saved format, else fam) | "fam" | "vlm2vec"
    image_resolution: str = ""  # "" (saved, else none) | none | high | mid | low | cap | 336 | 448x336
    min_pixels: int | None = None  # Qwen2-VL processor pixel budget (none: the checkpoint's)
    max_pixels: int | None = None  # e.g. 1280*28*28 = 1003520; none: the checkpoint's

    def check(self, prefix: str) -> None:
        if self.prompt_format:
            choice(prefix + "prompt_format", self.prompt_format, PROMPT_FORMATS)
        res = self.image_resolution.strip().lower()
        if res and res not in IMAGE_RESOLUTIONS and not _SIZE.fullmatch(res):
            fail(prefix + "image_resolution", self.image_resolution,
                 f"use one of {list(IMAGE_RESOLUTIONS)} or a size such as 336 or 448x336")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                integer(prefix + name, getattr(self, name), 1)
        if self.min_pixels is not None and self.max_pixels is not None and \
                self.min_pixels > self.max_pixels:
            fail(prefix + "min_pixels", self.min_pixels,
                 f"must be <= {prefix}max_pixels={self.max_pixels}")

    def load_options(self) -> dict[str, Any]:
        """The keyword options for ``fam.backbones.load_backbone`` (only those set)."""
        out: dict[str, Any] = {}
        if self.prompt_format:
            out["prompt_format"] = self.prompt_format
        if self.image_resolution.strip():
            out["image_resolution"] = self.image_resolution.strip().lower()
        if self.min_pixels is not None:
            out["min_pixels"] = self.min_pixels
        if self.max_pixels is not None:
            out["max_pixels"] = self.max_pixels
        return out
