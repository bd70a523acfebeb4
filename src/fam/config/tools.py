"""Configs of the tools around training: the FAM probes and the memory planner."""
from __future__ import annotations

from dataclasses import dataclass

from fam.config.checks import Validated, choice, fail, integers, number, text

__all__ = ["ProbeConfig", "PlanConfig", "PLAN_PRECISIONS"]

#: Bytes per element of the precisions the planner models.
PLAN_PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ProbeConfig(Validated):
    """Settings of the FAM probes (defaults follow the Scenes/VLM2Vec prompts; method.md §5)."""

    # VLM2Vec/FAM image prompt, for the whole image and for the crops
    image_instruction: str = "Represent the given image."
    # retrieval prompt before a referring expression (VLM2Vec's T2I instruction)
    text_instruction: str = "Find me an everyday image that matches the given caption: "
    # image + text input of the attention probe (the Scenes grounding query)
    attention_prompt: str = ("Select the portion of the image that isolates the object "
                             "labeled as \"{expression}\"")
    margin: float = 0.15  # crop margin, as a fraction of the box's larger side (≥ min_margin_px)
    min_margin_px: int = 2  # pixels of context kept around even the smallest box
    split: str = "eval"  # pad.jsonl records under images/<split>/
    max_images: int = 64  # images probed (crops: all their objects)
    attention_images: int = 32  # images used for the attention probe
    top_layers: int = 3  # how many vision-centric layers to name
    batch_size: int = 16  # items per forward
    seed: int = 0  # picks the mismatched pairings

    def check(self, prefix: str) -> None:
        if "{expression}" not in self.attention_prompt:
            fail(prefix + "attention_prompt", self.attention_prompt,
                 "must contain {expression} (where the object's expression goes)")
        number(prefix + "margin", self.margin, 0.0)
        text(prefix + "split", self.split, "the Scenes split to probe (eval)")
        integers(self, prefix, min_margin_px=0, max_images=1, attention_images=1, top_layers=1,
                 batch_size=1, seed=0)


@dataclass
class PlanConfig(Validated):
    """A training configuration to estimate (``fam plan``)."""

    batch: int = 32  # rows (pairs) per step per device
    chunk: int = 0  # GradCache chunk (0: off)
    image_size: int = 336  # square image side in pixels (MMEB: 336)
    text_tokens: int = 32  # text tokens per sequence (instruction + content + EOS)
    image_sides: int = 1  # sequences per row that carry an image (query and/or target)
    sequences: int = 2  # sequences per row (query + target; 3 with hard negatives)
    lora_rank: int = 8  # 0: full fine-tune of the LM
    lora_dropout: float = 0.05  # > 0 keeps a dropout copy of every LoRA input
    weight_precision: str = "bf16"  # dtype of the frozen weights
    precision: str = "bf16"  # activation dtype (autocast / model dtype)
    gradient_checkpointing: bool = False
    attn: str = "sdpa"  # "sdpa" | "eager" (eager keeps the L×L attention probabilities)

    def check(self, prefix: str) -> None:
        integers(self, prefix, batch=1, chunk=0, image_size=1, text_tokens=1, sequences=1,
                 image_sides=0, lora_rank=0)
        if self.image_sides > self.sequences:
            fail(prefix + "image_sides", self.image_sides,
                 f"must be <= {prefix}sequences={self.sequences}")
        number(prefix + "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        choice(prefix + "weight_precision", self.weight_precision, PLAN_PRECISIONS)
        choice(prefix + "precision", self.precision, PLAN_PRECISIONS)
        choice(prefix + "attn", self.attn, ("sdpa", "eager"))
