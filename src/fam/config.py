"""Typed configuration: dataclasses are the single source of truth.

Experiments live in YAML files (``configs/*.yaml``) whose keys mirror the dataclass fields;
``key=value`` overrides on the command line (torchtune style, dotted for nesting:
``optim.lr=1e-4 lora.r=16``) are applied on top. Unknown keys are errors, values are
converted to the field's type.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fam.errors import ConfigError

T = TypeVar("T")


@dataclass
class OptimConfig:
    lr: float = 2e-4  # peak learning rate (VLM2Vec LoRA runs use 2e-5..2e-4; tiny models like more)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (PyTorch default)
    warmup_ratio: float = 0.05  # fraction of steps with linear warm-up (VLM2Vec: 0.05)
    schedule: str = "cosine"  # decay after warm-up: "cosine" | "linear" | "constant"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    batch_size: int = 32  # pairs per optimizer step (per process)
    steps: int = 200  # optimizer steps for the stage
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class LoraConfig:
    enabled: bool = False  # LoRA on the language model's linear layers (papers: on)
    r: int = 8  # rank (FAM/VLM2Vec: 8)
    alpha: int = 16  # scaling numerator (papers use 2r..64)
    dropout: float = 0.05  # dropout on the LoRA branch
    use_dora: bool = False  # DoRA (weight-decomposed LoRA) via peft


@dataclass
class RunConfig:
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


@dataclass
class VeinConfig:
    """VEIN (SPEC §3; the official code and every difference: docs/vein.md)."""

    enabled: bool = False  # add the VEIN reconstruction loss (SPEC §3)
    weight: float = 1.0  # λ in L_adapt = L_task + λ L_rec (paper: 1), over the global batch
    mask_ratio: float = 0.3  # γ, fraction of image tokens masked (paper best: 0.3)
    layers: list[int] = field(default_factory=list)  # [] = paper: last three up to 3B params, else last
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


@dataclass
class AdaptConfig:
    """Stage 2 / VLM2Vec baseline: contrastive adaptation on query/target pairs."""

    model: str = ""  # checkpoint dir or hub id to start from
    train_dir: str = ""  # MMEB-format training data (jsonl/parquet files or subset folders)
    image_root: str = ""  # root the rows' image paths are relative to (default: train_dir's parent)
    subsets: list[str] = field(default_factory=list)  # restrict to these subsets (empty: all)
    max_per_subset: int = 0  # cap rows per subset (0: no cap)
    temperature: float = 0.02  # τ of InfoNCE (VLM2Vec/FAM: 0.02)
    hard_negatives: bool = True  # use the data's neg_* fields as extra negatives
    mask_duplicates: bool = True  # identical targets of other rows are not negatives (VLM2Vec: no)
    max_text_tokens: int = 128  # text tokens per item (images never cut)
    gradcache_chunk: int = 0  # GradCache chunk size in pairs (0: off; Gao et al. 2021)
    full_finetune: bool = False  # train all LM weights instead of LoRA
    freeze_vision: bool = True  # keep the vision tower frozen (VLM2Vec: frozen)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))
    vein: VeinConfig = field(default_factory=VeinConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class Stage0Config:
    """Generative pre-training of a tiny LVLM (next-token loss on captions and answers)."""

    model: str = ""  # checkpoint dir to start from (a tiny preset written by `fam model tiny`)
    captions: str = ""  # LLaVA pre-training caption JSON (image, caption / blip_caption)
    qa: str = ""  # optional JSON list of {image, question, answer}
    image_root: str = ""  # root of the image paths (default: the caption file's folder)
    prompt: str = "Describe the image."  # instruction before the caption
    max_text_tokens: int = 64  # text tokens per sample
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=32, steps=300))
    run: RunConfig = field(default_factory=RunConfig)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is typing.Union or str(origin) == "types.UnionType":
        for a in args:
            if a is type(None) and value is None:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except (ConfigError, ValueError, TypeError):
                continue
        raise ConfigError(f"{key}: cannot convert {value!r} to {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_convert(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + u for u in unknown)}; "
                          f"valid keys here: {sorted(names)}")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        f = defaults[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict) and \
                f.default_factory is not dataclasses.MISSING:
            # Nested section: start from the field's own default (a stage may default
            # e.g. optim.lr differently from OptimConfig), then apply the given keys.
            v = _deep_merge(to_dict(f.default_factory()), v)
        kwargs[k] = _convert(v, tp, prefix + k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a config dataclass."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, raw = ov.split("=", 1)
        val = yaml.safe_load(raw) if raw != "" else ""
        cur = data
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        cur[parts[-1]] = val
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then apply ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
