"""Memory planner: estimate the peak memory of a training configuration (``fam plan``).

The estimate is analytic (no model is built), so it works for Qwen2-VL-2B/7B on a laptop:

    peak = weights + trainable states + step memory
    weights            = P_total · bytes(weight dtype)
    trainable states   = P_train · (bytes(param) [grad] + 8 [AdamW m, v in fp32])
    step memory        = activations(rows in flight) + GradCache overhead + vision transient

**Activations** (saved for backward), per token per LM layer, in elements, for a
Qwen2/Llama block (RMSNorm, GQA attention with sdpa, SwiGLU MLP) with LoRA on all seven
linears (frozen base weights keep no inputs; LoRA's A keeps its input):

    a_layer = 8·d + 2·kv + 4·I                 (norm in/out ×2, q/k/v/out for attention,
                                                 gate, up, act(gate), down input)
            + (6·d + I)            if LoRA dropout > 0 (each LoRA input is its own copy)
            + h·L                  if eager attention (the L×L probabilities, per token)

    activations = rows · tokens_per_row · layers · a_layer · bytes(activation dtype)

``tokens_per_row`` sums the row's sequences (query: image tokens + text; target: text;
negative when used). With gradient checkpointing only each layer's input (d per token) is
kept, plus one layer's ``a_layer`` during its recomputation. Frozen vision towers keep
nothing for backward (no parameter there wants a gradient); their forward leaves a
transient of about one vision layer, ``patches · (8·e + 2·e·mlp_ratio)`` elements per image.
``rows in flight`` is the batch, or the GradCache chunk; GradCache adds ``O(B·d + B²)``
(representations, cached gradients, score matrix).

This is a model, not a measurement: it ignores allocator slack, fused-kernel workspaces
and framework overheads. ``tests/bench/test_plan.py`` checks it against measured peaks on tiny
models (within ±50%, ranking of configurations right).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fam.config import PlanConfig
from fam.config.tools import PLAN_PRECISIONS as BYTES
from fam.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ModelShape", "PlanConfig", "KNOWN_SHAPES", "estimate", "largest_chunk",
           "shape_from_checkpoint", "resolve_shape", "format_plan"]



@dataclass(frozen=True)
class ModelShape:
    """Shapes of a Qwen2-VL-like LVLM (language model + ViT vision tower)."""

    hidden: int  # d, LM hidden size
    layers: int  # LM decoder layers
    heads: int  # attention heads
    kv_heads: int  # key/value heads (GQA)
    intermediate: int  # I, MLP width
    vocab: int  # vocabulary size
    tie_embeddings: bool  # lm_head shares the input embedding
    vision_depth: int  # ViT blocks
    vision_embed: int  # e, ViT width
    vision_mlp_ratio: float  # ViT MLP width / e
    patch_size: int = 14  # pixels per patch side
    merge_size: int = 2  # patches merged per side into one LM token

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def lm_params(self) -> int:
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = d * d + 2 * d * kv + d * d + (d + 2 * kv) + 3 * d * i + 2 * d  # +qkv bias, norms
        emb = self.vocab * d * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + emb + d

    def vision_params(self) -> int:
        e, m = self.vision_embed, int(self.vision_embed * self.vision_mlp_ratio)
        per_block = 4 * e * e + 4 * e + 2 * e * m + m + e + 4 * e
        patch = 3 * 2 * self.patch_size ** 2 * e  # temporal patch 2
        q = e * self.merge_size ** 2
        merger = q * q + q + q * self.hidden + self.hidden + 2 * e
        return self.vision_depth * per_block + patch + merger

    def params(self) -> int:
        return self.lm_params() + self.vision_params()

    def lora_params(self, r: int) -> int:
        """LoRA (rank r) on q, k, v, o, gate, up, down of every LM layer."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = r * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + i) + (i + d))
        return self.layers * per_layer

    def image_tokens(self, image_size: int) -> int:
        """LM tokens of one square image (Qwen2-VL: (side/patch)² patches, merged 2×2)."""
        side = max(1, round(image_size / (self.patch_size * self.merge_size))) * self.merge_size
        return (side // self.merge_size) ** 2

    def patches(self, image_size: int) -> int:
        return self.image_tokens(image_size) * self.merge_size ** 2


#: Published configurations (Hugging Face config.json of Qwen/Qwen2-VL-2B-Instruct and
#: Qwen/Qwen2-VL-7B-Instruct).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen2-VL-2B": ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                              vocab=151936, tie_embeddings=True, vision_depth=32,
                              vision_embed=1280, vision_mlp_ratio=4.0),
    "Qwen2-VL-7B": ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                              vocab=152064, tie_embeddings=False, vision_depth=32,
                              vision_embed=1280, vision_mlp_ratio=4.0),
}


def _seq_tokens(shape: ModelShape, cfg: PlanConfig) -> tuple[int, int]:
    """(tokens of all sequences of one row, longest sequence)."""
    img = shape.image_tokens(cfg.image_size) + 2  # + vision start/end
    with_img = cfg.text_tokens + img
    per_row = cfg.image_sides * with_img + (cfg.sequences - cfg.image_sides) * cfg.text_tokens
    return per_row, with_img if cfg.image_sides else cfg.text_tokens


def estimate(shape: ModelShape, cfg: PlanConfig) -> dict[str, Any]:
    """Estimated memory (bytes) of one training step, by component.

    Returns:
        dict with ``weights``, ``trainable_states``, ``activations``, ``vision_transient``,
        ``gradcache``, ``step`` (activations + transient + GradCache + grads: the growth
        during a step) and ``total``; plus ``params``, ``trainable_params``,
        ``tokens_per_row`` and ``rows_in_flight``.
    """
    if cfg.precision not in BYTES or cfg.weight_precision not in BYTES:
        raise ConfigError(f"precision must be one of {sorted(BYTES)}; got {cfg.precision!r} / "
                          f"{cfg.weight_precision!r}")
    act_b, w_b = BYTES[cfg.precision], BYTES[cfg.weight_precision]
    d, kv, i, n_layers = shape.hidden, shape.kv_dim, shape.intermediate, shape.layers
    params = shape.params()
    trainable = shape.lora_params(cfg.lora_rank) if cfg.lora_rank > 0 else shape.lm_params()
    # LoRA weights are created in fp32 by our trainer; full fine-tune keeps the weight dtype.
    t_b = 4 if cfg.lora_rank > 0 else w_b
    weights = (params * w_b) + (trainable * t_b if cfg.lora_rank > 0 else 0)
    grads = trainable * t_b
    states = grads + trainable * 8  # AdamW m and v in fp32
    tokens, longest = _seq_tokens(shape, cfg)
    rows = min(cfg.chunk, cfg.batch) if cfg.chunk > 0 else cfg.batch
    a_layer = 8 * d + 2 * kv + 4 * i
    if cfg.lora_rank == 0:
        a_layer += 6 * d + i  # frozen-free linears keep their inputs for weight grads
    elif cfg.lora_dropout > 0:
        a_layer += 6 * d + i
    if cfg.attn == "eager":
        a_layer += shape.heads * longest
    if cfg.gradient_checkpointing:
        acts = rows * tokens * (n_layers * d + a_layer) * act_b
    else:
        acts = rows * tokens * n_layers * (a_layer + d) * act_b  # + the layer output kept
    e = shape.vision_embed
    vis = rows * cfg.image_sides * shape.patches(cfg.image_size) * \
        (8 * e + 2 * int(e * shape.vision_mlp_ratio)) * act_b
    gc = (4 * cfg.batch * cfg.sequences * d + 3 * cfg.batch * cfg.batch) * 4 if cfg.chunk > 0 else 0
    step = acts + vis + gc + grads
    total = weights + states + acts + vis + gc
    return {"weights": weights, "trainable_states": states, "activations": acts,
            "vision_transient": vis, "gradcache": gc, "step": step, "total": total,
            "params": params, "trainable_params": trainable, "tokens_per_row": tokens,
            "rows_in_flight": rows}


def largest_chunk(shape: ModelShape, cfg: PlanConfig, budget_bytes: float) -> int:
    """Largest GradCache chunk (≤ batch) whose estimated total fits ``budget_bytes``; 0 if none."""
    best = 0
    lo, hi = 1, max(1, cfg.batch)
    while lo <= hi:  # total is monotone in the chunk
        mid = (lo + hi) // 2
        if estimate(shape, replace(cfg, chunk=mid))["total"] <= budget_bytes:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def shape_from_checkpoint(path: str | Path) -> ModelShape:
    """Read a Qwen2-VL-family ``config.json`` (a checkpoint directory or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise ConfigError(f"{p}: no config.json; give a checkpoint directory or one of "
                          f"{sorted(KNOWN_SHAPES)}")
    cfg = json.loads(f.read_text())
    text = cfg.get("text_config", cfg)
    vis = cfg.get("vision_config", {})
    try:
        return ModelShape(
            hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
            heads=int(text["num_attention_heads"]),
            kv_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
            intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=int(vis.get("depth", 0)), vision_embed=int(vis.get("embed_dim", 1)),
            vision_mlp_ratio=float(vis.get("mlp_ratio", 4.0)),
            patch_size=int(vis.get("patch_size", 14)),
            merge_size=int(vis.get("spatial_merge_size", 2)))
    except KeyError as e:
        raise ConfigError(f"{f}: missing field {e} (only Qwen2-VL-style configs are "
                          "supported by the planner)") from None


def resolve_shape(model: str) -> ModelShape:
    """A known name (case-insensitive, e.g. ``qwen2-vl-2b``) or a checkpoint directory."""
    for name, shape in KNOWN_SHAPES.items():
        if model.lower() in (name.lower(), name.lower() + "-instruct",
                             f"qwen/{name.lower()}-instruct"):
            return shape
    return shape_from_checkpoint(model)


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def format_plan(shape: ModelShape, cfg: PlanConfig, est: dict[str, Any],
                budget_gib: float | None = None) -> str:
    lines = [f"params {est['params'] / 1e9:.2f} B, trainable {est['trainable_params'] / 1e6:.2f} M, "
             f"{est['tokens_per_row']} tokens per row, {est['rows_in_flight']} rows in flight",
             f"  weights           {_gib(est['weights'])}",
             f"  trainable states  {_gib(est['trainable_states'])} (grads + AdamW)",
             f"  activations       {_gib(est['activations'])}",
             f"  vision transient  {_gib(est['vision_transient'])}",
             f"  GradCache         {_gib(est['gradcache'])}",
             f"  total (estimate)  {_gib(est['total'])}"]
    if budget_gib:
        c = largest_chunk(shape, cfg, budget_gib * 2 ** 30)
        lines.append(f"largest GradCache chunk within {budget_gib:g} GiB: "
                     f"{c if c else 'none (the weights and states alone do not fit)'}")
    return "\n".join(lines)
