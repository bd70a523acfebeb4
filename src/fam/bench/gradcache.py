"""Benchmark: peak memory of a GradCache training step vs plain steps (method.md §1, GradCache).

Run ``fam bench gradcache [--size s] [--image-size 224] [--batch 256] [--chunk 16]``.

Three configurations of one contrastive training step (ContrastiveModule, tiny random
Qwen2-VL, LoRA r=8, image queries vs caption targets, in-batch negatives), measured in the
same invocation:

* ``B=batch, GradCache chunk``  — what GradCache makes possible;
* ``B=chunk, no GradCache``     — **the reference**: the largest batch the same memory would
  otherwise hold, i.e. what a user without GradCache trains with (the strongest plain
  alternative: same step, same model, nothing recomputed);
* ``B=batch, no GradCache``     — for contrast, and to check that GradCache computes the same
  loss as the full batch.

``fam bench gradcache`` exits 1 when the GradCache peak exceeds ``--max-ratio`` (default
1.5) times the reference's, or when the GradCache and full-batch losses differ by more than
:data:`LOSS_RTOL` relative. The loss check needs ``--lora-dropout 0``: with dropout the
chunked and full forwards draw different masks (GradCache's exact parity with dropout, by RNG
replay, is tested in ``tests/train/test_gradcache.py``).

Method (honest by construction, same as :mod:`fam.bench.mac`):

* Each configuration runs in a **fresh subprocess** (no allocator cache or earlier peak is
  shared). The model, the collated batch (token ids, pixel values) and a warm-up step on
  2 rows exist *before* the measurement; they are not counted.
* Peak memory = extra memory held during one training step (forward(s), backward,
  gradients). On CUDA: ``max_memory_allocated() − memory_allocated()`` before the step. On
  CPU: the resident-set high-water mark (``VmHWM``), reset just before the step through
  ``/proc/self/clear_refs``, minus the resident set before the step — real RAM as ``top``
  sees it, including allocator slack. Without the reset, ``ru_maxrss`` growth is used
  (flagged in the output). glibc's *dynamic* mmap threshold makes freed large blocks stay
  resident and fragment, which inflates the RSS peak of runs with many forwards
  (GradCache); set ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment to pin it (the
  workers inherit it) and see live memory more closely. Measured on the 2-core CPU
  machine (size s, LoRA r=8, B=256, chunk 16): at 112 px, 55.6 vs 48.2 MiB = 1.15x
  (default malloc) and 0.96x (pinned threshold); at 224 px (64 image tokens), 151.8 vs
  77.5 MiB = 1.96x with default malloc, while B=256 without GradCache needed 1750 MiB.
* GradCache's own overhead is the ``(B, d)`` representations, their cached gradients
  and the ``B×B`` score matrix: O(B·d + B²), independent of sequence length and depth.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from fam.bench import PeakMemory

logger = logging.getLogger(__name__)

__all__ = ["run_bench", "format_report", "check", "noise_images", "CORPUS", "LOSS_RTOL"]

# GradCache vs full-batch loss, float32: the same forward split into chunks changes only the
# summation order of matmuls (eps 2^-24 ≈ 6e-8); 1e-5 relative ≈ 170 ulps of headroom.
LOSS_RTOL = 1e-5

CORPUS = ["a red circle left of a blue square", "a small green triangle above a yellow star",
          "Represent the given image.", "Find the image that matches the caption:"]


def noise_images(n: int, size: int, seed: int = 0):
    """``n`` random-noise RGB images (the content does not matter for memory)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _build(size: str, image_size: int, text_tokens: int, device: str, dropout: float = 0.05):
    from fam.backbones import build_tiny
    from fam.config import LoraConfig
    from fam.model import EmbeddingModel, apply_lora
    from fam.train.adapt import ContrastiveModule

    adapter = build_tiny("qwen2_vl", size=size, image_size=image_size, corpus=CORPUS,
                         vocab_size=400, seed=0, max_text_tokens=text_tokens)
    emb = EmbeddingModel(adapter)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    apply_lora(emb, LoraConfig(enabled=True, r=8, alpha=16, dropout=dropout))
    return ContrastiveModule(emb).to(device).train()


def _batch(module, b: int, image_size: int, text_words: int, device: str):
    from fam.data.types import MMItem
    from fam.train.adapt import PairBatch
    adapter = module.embedder.adapter
    words = CORPUS[0].split() + CORPUS[1].split()
    caps = [" ".join(words[(i + k) % len(words)] for k in range(text_words)) for i in range(b)]
    q = adapter.encode([MMItem("<|image_1|>\nRepresent the given image.", Path("x.png"))] * b,
                       noise_images(b, image_size))
    t = adapter.encode([MMItem(c) for c in caps])
    ones = torch.ones(b, dtype=torch.bool)
    ids = torch.arange(b, dtype=torch.long)  # distinct targets: no duplicate masking
    return PairBatch(q, t, None, torch.zeros(0, dtype=torch.long), ones, ones, ids,
                     torch.full((b,), -1, dtype=torch.long)).to(device)


def _worker(b: int, chunk: int, size: str, image_size: int, text_words: int, device: str,
            dropout: float = 0.05) -> dict:
    """Measure one configuration in this (fresh) process."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from fam.train.adapt import ContrastiveLoss
    from fam.train.gradcache import train_step
    module = _build(size, image_size, text_words + 8, device, dropout)
    loss = ContrastiveLoss(0.02)
    # Warm-up on 2 rows: lazy initialisation (thread pools, kernels) is not counted.
    train_step(module, loss, _batch(module, 2, image_size, text_words, device), 0, chunk)
    module.zero_grad(set_to_none=True)
    batch = _batch(module, b, image_size, text_words, device)
    sync()
    meter = PeakMemory(cuda)
    t0 = time.perf_counter()
    terms = train_step(module, loss, batch, 0, chunk)
    sync()
    seconds = time.perf_counter() - t0
    peak, method = meter.stop()
    seq_len = int(batch.query.inputs["input_ids"].shape[1])
    return {"batch": b, "chunk": chunk, "peak_bytes": int(max(peak, 0)), "time_s": seconds,
            "loss": float(terms["loss"]), "memory_method": method, "query_tokens": seq_len,
            "image_tokens": int(batch.query.image_mask[0].sum()),
            "target_tokens": int(batch.target.inputs["input_ids"].shape[1]),
            "threads": torch.get_num_threads(), "lora_dropout": dropout}


def _run_in_subprocess(b: int, chunk: int, size: str, image_size: int, text_words: int,
                       device: str, threads: int, dropout: float = 0.05) -> dict:
    src_root = str(Path(__file__).resolve().parents[2])  # .../src, so `fam` imports as here
    env = dict(os.environ)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "fam.bench.gradcache", "--_worker",
           json.dumps([b, chunk, size, image_size, text_words, device, dropout])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker (batch {b}, chunk {chunk}) failed "
                           f"(exit {proc.returncode}; out of memory?):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(batch: int = 256, chunk: int = 16, size: str = "s", image_size: int = 112,
              text_words: int = 12, device: str = "cpu", threads: int = 2,
              with_full: bool = True, dropout: float = 0.05) -> dict[str, dict]:
    """Peak memory and time of one training step in the three configurations.

    Returns:
        ``{"gradcache": ..., "small": ..., "full": ...}`` (``full`` absent when
        ``with_full`` is False), each a dict with ``batch, chunk, peak_bytes, time_s,
        memory_method, query_tokens, image_tokens, loss, lora_dropout``.
    """
    configs = {"gradcache": (batch, chunk), "small": (chunk, 0)}
    if with_full:
        configs["full"] = (batch, 0)
    out = {}
    for name, (b, c) in configs.items():
        out[name] = _run_in_subprocess(b, c, size, image_size, text_words, device, threads,
                                       dropout)
        logger.info("gradcache bench %s: %s", name, out[name])
    return out


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f} MiB"


def format_report(res: dict[str, dict], size: str, batch: int, chunk: int, device: str,
                  max_ratio: float = 1.5) -> str:
    """The printed table and, last, the peak-memory ratios."""
    g, s = res["gradcache"], res["small"]
    lines = [f"GradCache bench: tiny Qwen2-VL '{size}', LoRA r=8, {g['image_tokens']} image "
             f"tokens ({g['query_tokens']} query tokens), device={device}, "
             f"threads={g['threads']}, peak memory method={g['memory_method']} (extra memory "
             "during one training step)",
             f"{'configuration':<28} | {'peak':>11} | {'step time':>9}"]
    for name, label in (("gradcache", f"B={g['batch']}, GradCache {g['chunk']}"),
                        ("small", f"B={s['batch']}, no GradCache"),
                        ("full", f"B={batch}, no GradCache")):
        if name in res:
            r = res[name]
            lines.append(f"{label:<28} | {_mb(r['peak_bytes']):>11} | {r['time_s']:>8.2f}s")
    ratio = g["peak_bytes"] / max(s["peak_bytes"], 1)
    if "full" in res:
        f = res["full"]
        lines.append(f"peak(B={batch}, no cache) / peak(B={batch}, chunk {chunk}): "
                     f"{f['peak_bytes'] / max(g['peak_bytes'], 1):.1f}x")
    lines.append(f"peak(B={batch}, chunk {chunk}) / peak(B={chunk}, no cache): "
                 f"{ratio:.2f}x (target <= {max_ratio}x: "
                 f"{'met' if ratio <= max_ratio else 'NOT met'})")
    parity = loss_parity(res)
    lines.append("loss GradCache vs full batch: " + (
        "not compared (" + ("no full batch" if "full" not in res else
                            "LoRA dropout draws differ; use --lora-dropout 0") + ")"
        if parity is None else f"{g['loss']:.6g} vs {res['full']['loss']:.6g}, relative "
                               f"difference {parity:.1e} (allowed {LOSS_RTOL:.0e})"))
    return "\n".join(lines)


def loss_parity(res: dict[str, dict]) -> float | None:
    """Relative difference of the GradCache and full-batch losses (None: not comparable)."""
    g, f = res["gradcache"], res.get("full")
    if f is None or g.get("lora_dropout", 0.05) > 0:
        return None
    return abs(g["loss"] - f["loss"]) / max(abs(f["loss"]), 1e-30)


def check(res: dict[str, dict], max_ratio: float = 1.5) -> list[str]:
    """What failed: the peak-memory target, or GradCache's loss differing from the full batch's."""
    g, s = res["gradcache"], res["small"]
    problems = []
    ratio = g["peak_bytes"] / max(s["peak_bytes"], 1)
    if ratio > max_ratio:
        problems.append(f"target NOT met: peak(B={g['batch']}, chunk {g['chunk']}) / "
                        f"peak(B={s['batch']}, no cache) = {ratio:.2f}x > {max_ratio}x")
    parity = loss_parity(res)
    if parity is not None and not parity <= LOSS_RTOL:
        problems.append(f"GradCache loss {g['loss']:.8g} differs from the full batch's "
                        f"{res['full']['loss']:.8g} ({parity:.1e} relative > {LOSS_RTOL:.0e})")
    return problems


if __name__ == "__main__":
    # `python -m fam.bench.gradcache --_worker JSON` measures one configuration in this
    # fresh process (run_bench's subprocess protocol); users run `fam bench gradcache`.
    if sys.argv[1:2] != ["--_worker"]:
        sys.exit("this module is the benchmark's worker; run `fam bench gradcache [...]`")
    print(json.dumps(_worker(*json.loads(sys.argv[2]))))
