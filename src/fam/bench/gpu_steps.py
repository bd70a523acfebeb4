"""The model measurements of ``fam bench gpu``: an adaptation step, a MAC alignment step, encode.

All three run on a Qwen2-VL of the configured shape (``GpuBenchConfig.model_size``: the
published 2B shape with random weights, or a tiny one), built once per worker process
(:class:`Workspace`) in the configured dtype directly on the device, with a LoRA (rank
``lora_rank``, float32 adapter weights) on every language-model linear and everything else
frozen — what ``fam train adapt|align`` trains. Steps run under bf16 autocast, as
``run.precision=bf16`` does.

The data takes the real paths: JPEG files on disk, read and processed by the stage's own
collator (:class:`~fam.train.adapt.PairCollator`, :class:`~fam.train.align.AlignCollator`)
into one global batch; its preprocessing time is reported. Captions have random lengths
(``caption_words``), so padding is realistic; every row has a text hard negative; the query
side (image + instruction) is VEIN-eligible.

**One step** = ``zero_grad``, :func:`fam.train.gradcache.train_step` (GradCache with the
given chunk), AdamW step — the trainer's step without the data loader. Reported: the median
of ``timed_steps`` steps after a warm-up step, the peak memory of the step
(:class:`fam.bench.PeakMemory`: growth during the step; on CUDA also the absolute peak with
weights), tokens/s (real language-model tokens of queries, targets and negatives; padded
tokens too), and FLOPs (:func:`fam.bench.device.count_flops`, one step counted once: the
chunk size does not change them since chunks keep the batch's padded length). MFU is
``step FLOPs / step time / dense bf16 peak``. Because GradCache's first pass is a second
forward, two figures are given: ``mfu`` counts every executed FLOP (hardware utilisation)
and ``mfu_model`` leaves out GradCache's no-grad forward (the FLOPs of the same step
without GradCache). Closed-form cross-check, reported beside the count:
``flops ≈ (f + 1)·2·N_lm·T + f·2·N_vis·P`` with ``f`` forwards (2 under GradCache), ``N_lm``
the language model's linear weights, ``T`` padded language tokens, ``N_vis`` the vision
tower's weights and ``P`` image patches (attention scores, LoRA, VEIN and the merger's
P/4 tokens make up the difference). Flash-attention-2 steps (when ``flash-attn`` is installed)
are rated with the same count: the counter cannot see its kernels, and the model FLOPs are
the same (it skips the padded attention positions, so it executes slightly fewer).
"""
from __future__ import annotations

import contextlib
import logging
import random
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fam.bench import PeakMemory
from fam.bench.device import Stopwatch, count_flops
from fam.bench.gradcache import CORPUS, noise_images
from fam.config import GpuBenchConfig, LoraConfig
from fam.data.captions import CaptionSample
from fam.data.mmeb import TrainPair
from fam.data.types import MMItem
from fam.model import EmbeddingModel, apply_lora, merge_lora

log = logging.getLogger(__name__)

__all__ = ["Workspace", "adapt_section", "align_section", "encode_section", "encode_items",
           "DTYPES", "QUERY", "IMAGE_INSTRUCTION", "TEXT_INSTRUCTION"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
QUERY = "<|image_1|>\nRepresent the given image for classification."
IMAGE_INSTRUCTION = "Represent the given image."
TEXT_INSTRUCTION = "Find me an everyday image that matches the given caption: "
_WORDS = [w for c in CORPUS for w in c.replace(":", "").replace(".", "").split()]


def encode_items(model: EmbeddingModel, items: list[MMItem], batch_size: int) -> torch.Tensor:
    """The encode path measured: ``EmbeddingModel.encode`` (the one line to change when a
    faster path lands; on branch ``export``, ``EmbeddingModel.encode`` itself becomes the
    pipelined ``fam.inference`` path)."""
    return model.encode(items, batch_size=batch_size)


class Workspace:
    """What the sections of one worker process share: config, device, images, the model."""

    def __init__(self, cfg: GpuBenchConfig, device: torch.device, root: Path):
        self.cfg, self.device, self.root = cfg, device, root
        self.dtype = DTYPES[cfg.dtype]
        self._paths: list[Path] | None = None
        self._embedder: EmbeddingModel | None = None
        self.build_s = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the backbone is in bf16 (LoRA and VEIN weights stay float32)."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_paths(self) -> list[Path]:
        """``max(batch, encode_images)`` JPEG files of ``image_size``² noise, written once."""
        if self._paths is None:
            n = max(self.cfg.batch, self.cfg.encode_images)
            folder = self.root / "images"
            folder.mkdir(parents=True, exist_ok=True)
            self._paths = []
            for i, im in enumerate(noise_images(n, self.cfg.image_size)):
                path = folder / f"{i:05d}.jpg"
                im.save(path, quality=90)
                self._paths.append(path)
        return self._paths

    def captions(self, n: int, seed: int) -> list[str]:
        lo, hi = self.cfg.caption_words
        rng = random.Random(seed)
        return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]

    def embedder(self) -> EmbeddingModel:
        """The Qwen2-VL of ``model_size`` with a fresh LoRA, built on the device (once)."""
        if self._embedder is None:
            from fam.backbones import build_tiny
            cfg = self.cfg
            with Stopwatch(self.device) as w:
                adapter = build_tiny("qwen2_vl", size=cfg.model_size, image_size=cfg.image_size,
                                     corpus=CORPUS, vocab_size=400, seed=0,
                                     max_text_tokens=cfg.max_text_tokens, dtype=self.dtype,
                                     device=self.device)
                emb = EmbeddingModel(adapter)
                for p in adapter.model.parameters():
                    p.requires_grad_(False)
                apply_lora(emb, LoraConfig(enabled=True, r=cfg.lora_rank, alpha=2 * cfg.lora_rank,
                                           dropout=cfg.lora_dropout))
                emb.to(self.device)
            self.build_s = w.seconds
            self._embedder = emb
        return self._embedder


def model_summary(ws: Workspace) -> dict[str, Any]:
    """Parameter counts of the workspace's model (for the report and the FLOP formula)."""
    emb = ws.embedder()
    hf = emb.adapter.hf_model
    lm, vis = hf.model.language_model, hf.model.visual
    lm_linear = sum(m.weight.numel() for n, m in lm.named_modules()
                    if isinstance(m, nn.Linear) and "lora_" not in n)
    return {"shape": ws.cfg.model_size, "dtype": ws.cfg.dtype,
            "params": sum(p.numel() for p in hf.parameters()) - _lora_params(emb),
            "lm_linear_params": lm_linear, "vision_params": sum(p.numel() for p in vis.parameters()),
            "lora_params": _lora_params(emb), "hidden": emb.adapter.hidden_size,
            "layers": emb.num_layers, "attn_implementation": hf.config._attn_implementation,
            "build_s": ws.build_s}


def _lora_params(emb: EmbeddingModel) -> int:
    return sum(p.numel() for n, p in emb.named_parameters() if "lora_" in n)


def _token_stats(*sides) -> dict[str, int]:
    """Real and padded language tokens, image tokens and patches of encoded batches."""
    out = {"lm_tokens": 0, "lm_tokens_padded": 0, "image_tokens": 0, "patches": 0}
    for side in sides:
        if side is None:
            continue
        mask = side.inputs["attention_mask"]
        out["lm_tokens"] += int(mask.sum())
        out["lm_tokens_padded"] += int(mask.numel())
        out["image_tokens"] += int(side.image_mask.sum())
        grid = side.inputs.get("image_grid_thw")
        out["patches"] += int(grid.prod(-1).sum()) if grid is not None else 0
    return out


def _peak_entry(meter: PeakMemory, cuda: bool) -> dict[str, Any]:
    grown, method = meter.stop()
    entry = {"peak_step_bytes": int(max(grown, 0)), "memory_method": method}
    if cuda:
        entry["peak_total_bytes"] = int(torch.cuda.max_memory_allocated())
    return entry


def _measure(ws: Workspace, step: Callable[[], dict], label: dict[str, Any]) -> dict[str, Any]:
    """Warm-up step, then ``timed_steps`` timed steps: median time and the largest peak."""
    cuda = ws.cuda
    try:
        step()  # warm-up: kernels, cuBLAS workspaces, AdamW states
        times, peaks, terms = [], [], {}
        for _ in range(ws.cfg.timed_steps):
            meter = PeakMemory(cuda)
            with Stopwatch(ws.device) as w:
                terms = step()
            times.append(w.seconds)
            peaks.append(_peak_entry(meter, cuda))
    except torch.OutOfMemoryError as err:
        if cuda:
            torch.cuda.empty_cache()
        return {**label, "oom": True, "allocated_at_oom_bytes":
                int(torch.cuda.max_memory_allocated()) if cuda else None,
                "error": str(err).strip().splitlines()[0][:300]}
    best = max(peaks, key=lambda p: p["peak_step_bytes"])
    return {**label, "oom": False, "step_s": statistics.median(times), "steps_s": times, **best,
            "loss": float(terms["loss"])}


def _rates(run: dict, tokens: dict, flops: dict, peak_tflops: float | None) -> None:
    if run.get("oom"):
        return
    t = run["step_s"]
    run["tokens_per_s"] = tokens["lm_tokens"] / t
    run["padded_tokens_per_s"] = tokens["lm_tokens_padded"] / t
    run["achieved_tflops"] = flops["step"] / t / 1e12
    if peak_tflops:
        run["mfu"] = flops["step"] / t / (peak_tflops * 1e12)
        run["mfu_model"] = flops["model"] / t / (peak_tflops * 1e12)


def _flops(ws: Workspace, module: nn.Module, loss, batch, chunk: int, tokens: dict,
           summary: dict) -> dict[str, Any]:
    """Executed FLOPs of one GradCache step and of its no-grad first pass (module docstring)."""
    from fam.train.gradcache import train_step

    def step():
        module.zero_grad(set_to_none=True)
        with ws.autocast():
            train_step(module, loss, batch, 0, chunk)

    def first_pass():
        with torch.no_grad(), ws.autocast():
            for c in batch.split(chunk):
                module(c, 0)

    total, pass1 = count_flops(step), count_flops(first_pass)
    module.zero_grad(set_to_none=True)
    f = 2  # forwards per step under GradCache
    formula = (f + 1) * 2 * summary["lm_linear_params"] * tokens["lm_tokens_padded"] + \
        f * 2 * summary["vision_params"] * tokens["patches"]
    return {"step": total, "first_pass": pass1, "model": total - pass1,
            "closed_form": formula, "counted_over_closed_form": total / max(formula, 1),
            "method": "torch.utils.flop_counter.FlopCounterMode: 2·m·n·k per executed matmul, "
                      "convolution and attention kernel, forward and backward (module docstring "
                      "of fam.bench.gpu_steps)"}


def _optimizer(module: nn.Module, cuda: bool) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=cuda)


def _run_steps(ws: Workspace, module: nn.Module, loss, batch, chunks: list[int],
               label: dict[str, Any]) -> list[dict[str, Any]]:
    """One measured configuration per GradCache chunk (fresh AdamW states)."""
    from fam.train.gradcache import train_step
    opt = _optimizer(module, ws.cuda)
    runs = []
    for chunk in chunks:
        def step(chunk=chunk):
            opt.zero_grad(set_to_none=True)
            with ws.autocast():
                terms = train_step(module, loss, batch, 0, chunk)
            opt.step()
            return terms
        runs.append(_measure(ws, step, {"chunk": chunk, **label}))
        log.info("gpu bench step: %s", runs[-1])
    opt.zero_grad(set_to_none=True)
    return runs


def adapt_section(ws: Workspace, peak_tflops: float | None) -> dict[str, Any]:
    """LoRA adaptation step with GradCache, hard negatives and VEIN (module docstring)."""
    from fam.losses.vein import VeinHead
    from fam.train.adapt import ContrastiveLoss, ContrastiveModule, PairCollator
    cfg = ws.cfg
    emb = ws.embedder()
    summary = model_summary(ws)
    vein = VeinHead(emb.adapter.hidden_size, cfg.vein_layers, num_layers=emb.num_layers + 1,
                    gamma=0.3).to(ws.device)
    module = ContrastiveModule(emb, vein).train()
    loss = ContrastiveLoss(0.02, vein_weight=1.0)
    paths = ws.image_paths()[:cfg.batch]
    caps, negs = ws.captions(cfg.batch, 1), ws.captions(cfg.batch, 2)
    pairs = [TrainPair(MMItem(QUERY, p), MMItem(c), MMItem(n), "bench", "bench", i + 1)
             for i, (p, c, n) in enumerate(zip(paths, caps, negs))]
    collate = PairCollator(emb.adapter, hard_negatives=True,
                           vein_meta_task={"bench": "classification"})
    with Stopwatch(torch.device("cpu")) as prep:
        batch = collate(pairs)
    batch = batch.to(ws.device)
    tokens = _token_stats(batch.query, batch.target, batch.neg)
    flops = _flops(ws, module, loss, batch, max(cfg.chunks), tokens, summary)  # fewest ops, same FLOPs
    runs = _run_steps(ws, module, loss, batch, cfg.chunks, {"attn_implementation": "sdpa"})
    fa2 = "not installed (pip install flash-attn) or not on CUDA"
    if ws.cuda and _flash_attn_installed():
        hf = emb.adapter.hf_model
        try:
            hf.set_attn_implementation("flash_attention_2")
            runs += _run_steps(ws, module, loss, batch, [max(cfg.chunks)],
                               {"attn_implementation": "flash_attention_2"})
            fa2 = "measured"
        except Exception as err:  # noqa: BLE001 - the sdpa measurements stand on their own
            log.exception("flash-attention-2 step failed")
            fa2 = f"failed: {type(err).__name__}: {err}"[:500]
        finally:
            hf.set_attn_implementation("sdpa")
    for r in runs:
        _rates(r, tokens, flops, peak_tflops)
    return {"model": summary, "batch": cfg.batch, "image_size": cfg.image_size,
            "hard_negatives": True, "vein_layers": list(vein.layers), "lora_rank": cfg.lora_rank,
            "vein_eligible_rows": int(batch.vein_query.sum() + batch.vein_target.sum()),
            "tokens": tokens, "collate_s": prep.seconds, "flops": flops, "runs": runs,
            "flash_attention_2": fa2}


def _flash_attn_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("flash_attn") is not None


def align_section(ws: Workspace, peak_tflops: float | None) -> dict[str, Any]:
    """MAC alignment step (stage 1) with GradCache on the same model (module docstring)."""
    from fam.train.align import AlignCollator, MACLoss, MACModule
    cfg = ws.cfg
    emb = ws.embedder()
    summary = model_summary(ws)
    module = MACModule(emb, token_layer=-1).train()
    loss = MACLoss()
    caps = ws.captions(cfg.batch, 3)
    samples = [CaptionSample(p, "", c, "bench", i + 1, "caption")
               for i, (p, c) in enumerate(zip(ws.image_paths()[:cfg.batch], caps))]
    collate = AlignCollator(emb.adapter, IMAGE_INSTRUCTION, TEXT_INSTRUCTION)
    with Stopwatch(torch.device("cpu")) as prep:
        batch = collate(samples)
    batch = batch.to(ws.device)
    tokens = _token_stats(batch.images, batch.texts)
    flops = _flops(ws, module, loss, batch, cfg.align_chunk, tokens, summary)
    runs = _run_steps(ws, module, loss, batch, [cfg.align_chunk], {"attn_implementation": "sdpa"})
    for r in runs:
        _rates(r, tokens, flops, peak_tflops)
    return {"model": summary, "batch": cfg.batch, "image_size": cfg.image_size,
            "tokens": tokens, "collate_s": prep.seconds, "flops": flops, "runs": runs}


def encode_section(ws: Workspace) -> dict[str, Any]:
    """Encode throughput of image and text items, and the preprocessing share.

    The LoRA is merged first (an exported model has none). Per kind: end-to-end items/s of
    :func:`encode_items` (reading the JPEGs included), and the two parts of the work timed
    apart on the same batches — preprocessing (``adapter.encode``: read, resize, tokenise,
    pad; CPU) and the forward (on the device) — whose ratio is the preprocessing share.
    """
    cfg = ws.cfg
    emb = ws.embedder()
    merge_lora(emb)
    emb.eval()
    adapter = emb.adapter
    kinds = {"image": [MMItem(QUERY, p) for p in ws.image_paths()[:cfg.encode_images]],
             "text": [MMItem(TEXT_INSTRUCTION + c) for c in ws.captions(cfg.encode_texts, 4)]}
    encode_items(emb, kinds["image"][:2] + kinds["text"][:2], cfg.encode_batch)  # warm-up
    out: dict[str, Any] = {"path": "EmbeddingModel.encode (fam.bench.gpu_steps.encode_items)",
                           "batch_size": cfg.encode_batch, "image_size": cfg.image_size}
    cpu = torch.device("cpu")
    for kind, items in kinds.items():
        with Stopwatch(ws.device) as total:
            emb_out = encode_items(emb, items, cfg.encode_batch)
        batches = []
        with Stopwatch(cpu) as prep:
            for i in range(0, len(items), cfg.encode_batch):
                batches.append(adapter.encode(items[i:i + cfg.encode_batch]))
        with Stopwatch(ws.device) as fwd, torch.no_grad(), ws.autocast():
            for b in batches:
                emb(b.to(ws.device))
        out[kind] = {"items": len(items), "seconds": total.seconds,
                     "items_per_s": len(items) / total.seconds, "preprocess_s": prep.seconds,
                     "forward_s": fwd.seconds,
                     "preprocess_share": prep.seconds / (prep.seconds + fwd.seconds),
                     "embedding_dim": int(emb_out.shape[1]),
                     "finite": bool(torch.isfinite(emb_out).all())}
    return out
