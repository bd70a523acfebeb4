"""Configs of the tools around training: the FAM probes, the memory planner, the GPU bench."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from fam.config.checks import Validated, choice, fail, integers, number, text

__all__ = ["ProbeConfig", "PlanConfig", "PLAN_PRECISIONS", "GpuBenchConfig", "GPU_BENCH_SECTIONS",
           "MAC_BENCH_SHAPES"]

#: Bytes per element of the precisions the planner models.
PLAN_PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
#: ``fam bench mac``'s default (B, N, T, d) shapes (fam.bench.mac.DEFAULT_SHAPES).
MAC_BENCH_SHAPES: tuple[tuple[int, int, int, int], ...] = ((64, 256, 32, 256),
                                                           (128, 256, 32, 256))


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


#: Sections of ``fam bench gpu``, in the order they run (MAC at the paper's scale first, while
#: the device holds no model: its naive form needs every free byte).
GPU_BENCH_SECTIONS = ("environment", "mac", "adapt", "align", "encode", "checks")


@dataclass
class GpuBenchConfig(Validated):
    """Sizes and time limits of ``fam bench gpu`` (defaults: the full run on one H200-class
    device, under 8 minutes; :meth:`tiny`: the same code at tiny size, for CI on a CPU)."""

    model_size: str = "2b"  # Qwen2-VL shape: "2b" (published, random weights) or tiny "xs"|"s"|"m"
    dtype: str = "bfloat16"  # weights of the backbone (LoRA, VEIN: float32 under bf16 autocast)
    batch: int = 256  # global batch of one adaptation / alignment step (one device)
    chunks: list[int] = field(default_factory=lambda: [16, 32])  # GradCache chunks measured
    image_size: int = 448  # square images (448 px = 256 image tokens after the 2×2 merge)
    caption_words: list[int] = field(default_factory=lambda: [8, 24])  # min, max words per caption
    max_text_tokens: int = 64  # text-token cap per sequence
    lora_rank: int = 8
    lora_dropout: float = 0.05
    vein_layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # paper: Qwen2-VL-2B
    timed_steps: int = 2  # timed steps per configuration (median), after one warm-up step
    align_chunk: int = 32  # GradCache chunk of the MAC alignment step
    mac_shape: list[int] = field(default_factory=lambda: [512, 757, 64, 3072])  # B, N, T, d
    mac_repeats: int = 2
    encode_images: int = 256  # image items encoded (448 px JPEGs read from disk)
    encode_texts: int = 1024  # text items encoded
    encode_batch: int = 64
    check_batch: int = 12  # rows of the GradCache-vs-full-batch check (float32, tiny model)
    check_chunk: int = 5  # its GradCache chunk (uneven on purpose: 5, 5, 2)
    check_mac_shape: list[int] = field(default_factory=lambda: [64, 757, 64, 3072])  # bf16 vs fp32
    budget_s: int = 450  # the whole run; sections not started by then are skipped
    section_timeout_s: dict[str, int] = field(default_factory=lambda: {
        "environment": 60, "adapt": 180, "align": 90, "mac": 120, "encode": 90, "checks": 90})

    @classmethod
    def tiny(cls) -> "GpuBenchConfig":
        """The same code at tiny size: seconds on a CPU (``fam bench gpu --tiny``)."""
        return replace(cls(), model_size="xs", batch=8, chunks=[2, 4], image_size=56,
                       caption_words=[3, 8], max_text_tokens=24, vein_layers=[-2, -1],
                       timed_steps=1, align_chunk=4, mac_shape=[16, 48, 8, 64], mac_repeats=1,
                       encode_images=8, encode_texts=16, encode_batch=8, check_batch=6,
                       check_chunk=4, check_mac_shape=[16, 48, 8, 64], budget_s=240,
                       section_timeout_s={"environment": 60, "adapt": 120, "align": 60,
                                          "mac": 90, "encode": 60, "checks": 90})

    def check(self, prefix: str) -> None:
        choice(prefix + "model_size", self.model_size, ("2b", "xs", "s", "m"))
        choice(prefix + "dtype", self.dtype, ("bfloat16", "float32"))
        integers(self, prefix, batch=2, image_size=28, max_text_tokens=1, lora_rank=1,
                 timed_steps=1, align_chunk=1, mac_repeats=1, encode_images=1, encode_texts=1,
                 encode_batch=1, check_batch=2, check_chunk=1, budget_s=1)
        number(prefix + "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if not self.chunks or any(c < 1 or c > self.batch for c in self.chunks):
            fail(prefix + "chunks", self.chunks, f"give GradCache chunks in [1, batch={self.batch}]")
        if len(self.caption_words) != 2 or not 1 <= self.caption_words[0] <= self.caption_words[1]:
            fail(prefix + "caption_words", self.caption_words, "give [min, max] words, 1 <= min <= max")
        if not self.vein_layers:
            fail(prefix + "vein_layers", self.vein_layers, "give at least one layer (e.g. [-1])")
        for name in ("mac_shape", "check_mac_shape"):
            shape = getattr(self, name)
            if len(shape) != 4 or any(x < 2 for x in shape):
                fail(prefix + name, shape, "give B, N, T, d (each >= 2)")
        unknown = set(self.section_timeout_s) ^ set(GPU_BENCH_SECTIONS)
        if unknown:
            fail(prefix + "section_timeout_s", self.section_timeout_s,
                 f"give one limit for each of {list(GPU_BENCH_SECTIONS)}")
        for k, v in self.section_timeout_s.items():
            if v < 1:
                fail(f"{prefix}section_timeout_s.{k}", v, "must be >= 1 second")
