"""Configs of the training stages; the method sections they implement are in docs/method.md.

Each stage config names its inputs in ``INPUTS`` (required when the stage runs) and nests
the shared sections of :mod:`fam.config.training`. A stage is registered (name → config
class → recipe) in :mod:`fam.train.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fam.config.checks import Validated, choice, fail, integer, integers, number, text_cap
from fam.config.training import BackboneConfig, LoraConfig, OptimConfig, RunConfig
from fam.errors import ConfigError

__all__ = ["Stage0Config", "AlignConfig", "VeinConfig", "AdaptConfig", "ProjectorConfig",
           "TowerConfig", "SftConfig", "CAbstractorConfig", "PROJECTOR_TYPES", "BETA_SCHEDULES",
           "PATCH_POOLINGS", "C2F_REDUCTIONS", "TOWER_LOSSES", "VEIN_MEMORIES", "VEIN_MASK_INITS",
           "MultiVectorConfig", "MULTIVECTOR_TOKENS", "MULTIVECTOR_SIMILARITIES"]

PROJECTOR_TYPES = ("mlp", "linear", "cabstractor")
#: How β reaches beta_max: a linear ramp (method.md §4) or from the first step.
BETA_SCHEDULES = ("ramped", "constant")
#: ``vein.memory`` and ``vein.mask_init`` values (fam.losses.vein.VEIN_MEMORY / MASK_INITS
#: say what each tests; a test keeps the two equal).
VEIN_MEMORIES = ("unmasked", "embedding")
VEIN_MASK_INITS = ("official", "mae")
#: Region poolings of the patch-alignment loss (fam.losses.patch.POOLINGS; a test keeps
#: the two equal).
PATCH_POOLINGS = ("mean", "coverage", "token")
C2F_REDUCTIONS = ("mean", "sum")
#: Image-text losses of the tower stage (fam.losses.tower).
TOWER_LOSSES = ("clip", "siglip")
#: Token sets and similarities of the multi-vector reading (fam.model.multivector.TOKEN_SETS,
#: fam.losses.maxsim.SIMILARITIES; a test keeps them equal).
MULTIVECTOR_TOKENS = ("content", "image", "text", "all")
MULTIVECTOR_SIMILARITIES = ("maxsim", "meanmaxsim")

_MODEL = "a checkpoint directory or hub id"
_CAPTIONS = "an LLaVA caption JSON ([{image, caption | blip_caption}])"


def _layer(key: str, value: int) -> None:
    """A language-model layer: 1..n from the first, -1..-n from the last (method.md §1)."""
    integer(key, value)
    if value == 0:
        fail(key, value, "layer 0 is the input embeddings, not a model layer; use 1..n or "
                         "-1..-n (-1 = last)")


@dataclass
class Stage0Config(Validated):
    """Generative pre-training of a tiny LVLM (next-token loss on captions and answers)."""

    INPUTS = {"model": _MODEL, "captions": _CAPTIONS}
    PATHS = ("model", "captions", "qa", "image_root")

    model: str = ""  # checkpoint dir to start from (a tiny preset written by `fam model tiny`)
    captions: str = ""  # LLaVA pre-training caption JSON (image, caption / blip_caption)
    qa: str = ""  # optional JSON list of {image, question, answer}
    image_root: str = ""  # root of the image paths (default: the caption file's folder)
    prompt: str = "Describe the image."  # instruction before the caption
    max_text_tokens: int | str | None = 64  # text tokens per sample (none: no limit)
    freeze_vision: bool = False  # keep the vision tower as it is (e.g. after `fam train tower`)
    text_only: bool = False  # no images: only the LLM trains, on captions and on questions after their caption
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # prompt format, image size
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=32, steps=300))
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        text_cap(prefix + "max_text_tokens", self.max_text_tokens)


@dataclass
class AlignConfig(Validated):
    """FAM stage 1 (MAC on image-caption pairs, method.md §2)."""

    INPUTS = {"model": _MODEL, "captions": _CAPTIONS}
    PATHS = ("model", "captions", "image_root")

    model: str = ""  # checkpoint dir or hub id to start from (stage 0 / a pretrained LVLM)
    captions: str = ""  # LLaVA pre-training caption JSON (image, caption / blip_caption)
    image_root: str = ""  # root of the image paths (default: the caption file's folder)
    image_instruction: str = "Represent the given image."  # FAM/VLM2Vec image prompt
    text_instruction: str = "Find me an everyday image that matches the given caption: "
    token_layer: int = -1  # LM layer whose token states feed c2f/fine terms (official: last)
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (w_c, w_c2f, w_f), paper: 1
    c2f_reduction: str = "mean"  # "mean" (paper) | "sum" (official code)
    temperature: float = 0.02  # τ (FAM: 0.02)
    max_text_tokens: int | str | None = 64  # caption tokens per item (none: no limit)
    gradcache_chunk: int = 0  # GradCache chunk size in pairs (0: off); see fam.train.gradcache
    full_finetune: bool = False  # train the LM weights instead of LoRA
    freeze_vision: bool = True  # keep the vision tower frozen
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # prompt format, image size
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, steps=200))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        _layer(prefix + "token_layer", self.token_layer)
        if len(self.weights) != 3:
            fail(prefix + "weights", self.weights, "must be three weights [w_c, w_c2f, w_f]")
        for i, w in enumerate(self.weights):
            number(f"{prefix}weights[{i}]", w, 0.0)
        if not any(self.weights):
            fail(prefix + "weights", self.weights, "at least one MAC term needs a weight > 0")
        choice(prefix + "c2f_reduction", self.c2f_reduction, C2F_REDUCTIONS)
        number(prefix + "temperature", self.temperature, 0.0, low_open=True)
        text_cap(prefix + "max_text_tokens", self.max_text_tokens)
        integer(prefix + "gradcache_chunk", self.gradcache_chunk, 0)


@dataclass
class VeinConfig(Validated):
    """VEIN (method.md §3: the official code fact by fact, every difference, the variants)."""

    enabled: bool = False  # add the VEIN reconstruction loss (method.md §3)
    weight: float = 1.0  # λ in L_adapt = L_task + λ L_rec (paper: 1), over the global batch
    mask_ratio: float = 0.3  # γ, fraction of image tokens masked (paper best: 0.3)
    # LM layers; null (unset) = the paper's default: the last three up to 3B parameters
    # (its 2B model), the last one for larger backbones
    layers: list[int] | None = None
    # "unmasked": the paper's VEIN (decoder memory = the unmasked image tokens); "embedding":
    # inversion (memory = e alone, plus visible_ratio of the tokens): L_rec must use e.
    memory: str = "unmasked"
    visible_ratio: float = 0.0  # memory="embedding": fraction of image tokens also visible
    target_pos: bool = True  # reconstruct V + PE (official code) instead of V
    mask_init: str = "official"  # mask token init: "official" N(0,1) | "mae" N(0,0.02²)
    detach_target: bool = True  # official code detaches the image-token states (targets)
    num_heads: int = 8  # decoder attention heads (official: 8; reduced to a divisor of d)
    dropout: float = 0.0  # decoder dropout (official: 0.1; 0 keeps L_rec deterministic given masks)
    diagnose: bool = True  # log rec_loss_shuffled (e shuffled) and the gradient norms
    eligible_override: dict[str, bool] = field(default_factory=dict)  # dataset -> force on/off

    def check(self, prefix: str) -> None:
        number(prefix + "weight", self.weight, 0.0)
        number(prefix + "mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        if self.layers is not None:
            if not self.layers:
                fail(prefix + "layers", self.layers, "give at least one layer, e.g. [-1], or "
                     "leave it unset (null) for the paper's default")
            for i, layer in enumerate(self.layers):
                _layer(f"{prefix}layers[{i}]", layer)
            if len(set(self.layers)) != len(self.layers):
                fail(prefix + "layers", self.layers, "a layer is listed twice")
        integer(prefix + "num_heads", self.num_heads, 1)
        choice(prefix + "memory", self.memory, VEIN_MEMORIES)
        choice(prefix + "mask_init", self.mask_init, VEIN_MASK_INITS)
        number(prefix + "dropout", self.dropout, 0.0, 1.0, high_open=True)
        number(prefix + "visible_ratio", self.visible_ratio, 0.0, 1.0 - self.mask_ratio)
        if self.visible_ratio > 0 and self.memory != "embedding":
            fail(prefix + "visible_ratio", self.visible_ratio,
                 f"only the inversion variant reads visible tokens besides e; set "
                 f"{prefix}memory=embedding or {prefix}visible_ratio=0")


@dataclass
class MultiVectorConfig(Validated):
    """Late interaction beside the pooled vector (fam.model.multivector, fam.losses.maxsim).

    ``L = pooled_weight · L_pooled + weight · L_late``: ``L_late`` is InfoNCE over MaxSim
    logits of the last layer's token vectors (in-batch targets and hard negatives), so one
    model serves both readings.
    """

    enabled: bool = False  # add the late-interaction InfoNCE (and export the head with the model)
    weight: float = 1.0  # weight of the late-interaction InfoNCE
    pooled_weight: float = 1.0  # weight of the pooled InfoNCE (0: train the token vectors only)
    dim: int = 128  # learned projection width (ColPali: 128, Linear without bias); 0 = none
    tokens: str = "content"  # positions read as vectors: content | image | text | all
    similarity: str = "meanmaxsim"  # maxsim (sum over query tokens) | meanmaxsim (their mean)
    temperature: float = 0.02  # τ of the late-interaction InfoNCE (meanmaxsim lies in [-1, 1])

    def check(self, prefix: str) -> None:
        number(prefix + "weight", self.weight, 0.0)
        number(prefix + "pooled_weight", self.pooled_weight, 0.0)
        if self.enabled and self.weight == 0 and self.pooled_weight == 0:
            fail(prefix + "weight", self.weight, "both losses have weight 0: nothing would "
                 f"train; set {prefix}weight or {prefix}pooled_weight above 0")
        integer(prefix + "dim", self.dim, 0)
        choice(prefix + "tokens", self.tokens, MULTIVECTOR_TOKENS)
        choice(prefix + "similarity", self.similarity, MULTIVECTOR_SIMILARITIES)
        number(prefix + "temperature", self.temperature, 0.0, low_open=True)


@dataclass
class AdaptConfig(Validated):
    """Stage 2 / VLM2Vec baseline: contrastive adaptation on query/target pairs."""

    INPUTS = {"model": _MODEL, "train_dir": "the MMEB-format training data folder or file"}
    PATHS = ("model", "train_dir", "image_root")

    model: str = ""  # checkpoint dir or hub id to start from
    train_dir: str = ""  # MMEB-format training data (jsonl/parquet files or subset folders)
    image_root: str = ""  # root of the rows' image paths (default: found beside train_dir)
    split: str = ""  # split of MMEB-train subset folders: "" = original (VLM2Vec) | diverse_instruction
    subsets: list[str] = field(default_factory=list)  # restrict to these subsets (empty: all)
    max_per_subset: int = 0  # cap rows per subset (0: no cap)
    temperature: float = 0.02  # τ of InfoNCE (VLM2Vec/FAM: 0.02)
    hard_negatives: bool = True  # use the data's neg_* fields as extra negatives
    mask_duplicates: bool = True  # identical targets of other rows are not negatives (VLM2Vec: no)
    # text tokens per item (images never cut): auto (fam: 128, vlm2vec: no limit) | N | none
    max_text_tokens: int | str | None = "auto"
    gradcache_chunk: int = 0  # GradCache chunk size in pairs (0: off; Gao et al. 2021)
    full_finetune: bool = False  # train all LM weights instead of LoRA
    freeze_vision: bool = True  # keep the vision tower frozen (VLM2Vec: frozen)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))
    vein: VeinConfig = field(default_factory=VeinConfig)
    multivector: MultiVectorConfig = field(default_factory=MultiVectorConfig)  # late interaction
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # prompt format, image size
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        integer(prefix + "max_per_subset", self.max_per_subset, 0)
        number(prefix + "temperature", self.temperature, 0.0, low_open=True)
        text_cap(prefix + "max_text_tokens", self.max_text_tokens)
        integer(prefix + "gradcache_chunk", self.gradcache_chunk, 0)
        if not self.full_finetune and not self.lora.enabled:
            raise ConfigError(f"nothing to train: set {prefix}lora.enabled=true or "
                              f"{prefix}full_finetune=true", key=prefix + "lora.enabled")


@dataclass
class CAbstractorConfig(Validated):
    """The C-Abstractor projector (fam.backbones.cabstractor; Honeybee, Cha et al. 2024)."""

    pooled: list[int] = field(default_factory=lambda: [4, 4])  # output token grid (rows, cols)
    depth: int = 3  # residual conv blocks before and after the pooling (Honeybee: 3)
    mlp_depth: int = 2  # readout MLP layers (Honeybee: 2)
    hidden: int = 0  # width of the conv stages; 0 = the LLM's width (Honeybee)

    def check(self, prefix: str) -> None:
        if not isinstance(self.pooled, (list, tuple)) or len(self.pooled) != 2:
            fail(prefix + "pooled", self.pooled, "must be [rows, cols] of the output grid")
        for i, v in enumerate(self.pooled):
            integer(f"{prefix}pooled[{i}]", v, 1)
        integers(self, prefix, depth=0, mlp_depth=1, hidden=0)


@dataclass
class ProjectorConfig(Validated):
    """Projector pre-training with the patch-alignment loss (method.md §4)."""

    INPUTS = {"model": "a LLaVA-style checkpoint directory", "captions": _CAPTIONS}
    PATHS = ("model", "captions", "pad", "image_root")

    model: str = ""  # LLaVA-style checkpoint dir (e.g. a stage-0 model); towers stay frozen
    captions: str = ""  # LLaVA caption JSON ([{image, caption | blip_caption}])
    pad: str = ""  # PAD JSONL with region masks for (some of) the caption images
    image_root: str = ""  # root of all image paths (default: the caption file's folder)
    projector: str = "mlp"  # "mlp" (2-layer GELU, LLaVA default) | "linear" | "cabstractor"
    cabstractor: CAbstractorConfig = field(default_factory=CAbstractorConfig)  # projector=cabstractor
    reinit: bool = True  # start from a fresh projector (paper: projector pre-trained from scratch)
    beta_max: float = 5.0  # final patch-loss weight (paper: 5); 0 = caption-only baseline
    beta_schedule: str = "ramped"  # "ramped" (0 → beta_max over ramp_steps) | "constant"
    ramp_steps: int = 0  # β ramp length in steps; 0 = the whole stage (method.md §4 [choice])
    theta: float = 0.5  # coverage threshold of S_k (paper: 0.5)
    pooling: str = "mean"  # region embedding: "mean" (paper) | "coverage" | "token" [choice]
    prompt: str = "Describe the image."  # instruction before the caption
    max_text_tokens: int | str | None = 64  # text tokens per sample (the image block is never cut)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # prompt format, image size
    # LLaVA-1.5 projector pre-training: lr 1e-3, warm-up 3%, no weight decay
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, batch_size=32, steps=300, warmup_ratio=0.03, weight_decay=0.0))
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        choice(prefix + "projector", self.projector, PROJECTOR_TYPES)
        choice(prefix + "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        choice(prefix + "pooling", self.pooling, PATCH_POOLINGS)
        number(prefix + "beta_max", self.beta_max, 0.0)
        integer(prefix + "ramp_steps", self.ramp_steps, 0)
        number(prefix + "theta", self.theta, 0.0, 1.0, low_open=True)
        text_cap(prefix + "max_text_tokens", self.max_text_tokens)

    def validate(self, prefix: str = "", *, require_inputs: bool = True) -> None:
        super().validate(prefix, require_inputs=require_inputs)
        if require_inputs and self.beta_max > 0 and not self.pad.strip():
            raise ConfigError(f"{prefix}pad is empty: beta_max > 0 needs PAD region masks "
                              f"({prefix}pad=pad.jsonl), or set {prefix}beta_max=0 for the "
                              "caption-only baseline", key=prefix + "pad")


@dataclass
class TowerConfig(Validated):
    """Contrastive pretraining of a LLaVA checkpoint's CLIP vision tower (``fam train tower``).

    The tower trains with a tiny CLIP text encoder on image-caption pairs, CLIP's or
    SigLIP's loss; the exported checkpoint is the input LLaVA with the trained tower (its
    LLM and projector untouched), which later stages keep frozen, as LLaVA keeps CLIP.
    """

    INPUTS = {"model": "a LLaVA-style checkpoint directory (CLIP vision tower)",
              "captions": _CAPTIONS}
    PATHS = ("model", "captions", "image_root")

    model: str = ""  # LLaVA-style checkpoint whose vision tower is pretrained
    captions: str = ""  # LLaVA caption JSON ([{image, caption | blip_caption}])
    image_root: str = ""  # root of the image paths (default: the caption file's folder)
    loss: str = "clip"  # "clip" (symmetric InfoNCE) | "siglip" (pairwise sigmoid)
    text_hidden: int = 64  # width of the tiny CLIP text encoder
    text_layers: int = 2  # its depth
    projection_dim: int = 64  # joint image-text embedding width
    max_text_tokens: int = 64  # positions of the tower's text encoder (caption + EOS)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # image size of the tower
    # a gentle lr: at 2e-3 the patch features collapsed (docs/projector_study.md)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-4, batch_size=64, steps=600, warmup_ratio=0.05, weight_decay=0.1))
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        choice(prefix + "loss", self.loss, TOWER_LOSSES)
        integers(self, prefix, text_hidden=1, text_layers=1, projection_dim=1,
                 max_text_tokens=2)
        if self.optim.batch_size < 2:
            fail(prefix + "optim.batch_size", self.optim.batch_size,
                 "a contrastive loss needs at least 2 pairs per batch")


@dataclass
class SftConfig(Validated):
    """LLaVA-style stage 2 (``fam train sft``): the projector and a LoRA on the language
    model train on instruction data (image, question → answer); the vision tower stays
    frozen. The same settings for every projector make their downstream scores comparable.
    """

    INPUTS = {"model": "a LLaVA-style checkpoint directory (e.g. a projector stage's model)",
              "data": "an instruction JSON ([{image, question, answer}], e.g. sft_train.json)"}
    PATHS = ("model", "data", "image_root")

    model: str = ""  # generative LVLM to fine-tune (its projector and LLM)
    data: str = ""  # JSON list of {image, question, answer} (fam.data.instructions writes it)
    image_root: str = ""  # root of the image paths (default: the data file's folder)
    train_projector: bool = True  # LLaVA stage 2 trains the projector too
    max_text_tokens: int | str | None = 64  # text tokens per sample (none: no limit)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # prompt format, image size
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, batch_size=32, steps=300, warmup_ratio=0.03, weight_decay=0.0))
    run: RunConfig = field(default_factory=RunConfig)

    def check(self, prefix: str) -> None:
        text_cap(prefix + "max_text_tokens", self.max_text_tokens)
        if not self.lora.enabled and not self.train_projector:
            fail(prefix + "lora.enabled", self.lora.enabled,
                 "nothing would train: enable the LoRA or set train_projector=true")
