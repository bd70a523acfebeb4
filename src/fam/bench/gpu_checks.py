"""Correctness on the device (``fam bench gpu``, section ``checks``): each check can fail.

1. **GradCache = the full batch, with dropout RNG replay.** A tiny Qwen2-VL in float32 on
   the device, LoRA dropout 0.1, VEIN on two layers (random masks), hard negatives, uneven
   chunks. Dropout and VEIN masks are drawn from the device's RNG (CUDA's Philox on a GPU),
   so the one-forward full batch would draw *other* random numbers than chunked forwards;
   the reference therefore keeps the graph of every chunk's forward (the random draws
   GradCache's first pass makes) and back-propagates once — the full-batch loss and
   gradient for those draws. GradCache must match it: relative gradient error
   ``‖g_gc − g_ref‖ / ‖g_ref‖ ≤ 1e-4`` and loss ``≤ 1e-5`` relative. Why these: both runs
   execute the same float32 kernels on the same chunks; only the order in which chunk
   contributions are summed differs (a few roundings of ~6e-8 each per element), so 1e-4
   is three orders of magnitude above the expected error yet far below the effect of
   other dropout draws — measured in the same check as the distance between the reference
   at two seeds (``dropout_effect``), which must exceed 100× the tolerance for the check
   to be meaningful. The RNG must also continue where the first pass left it.
2. **bf16 MAC within tolerance of fp32.** The exact MAC loss (:func:`fam.losses.mac.mac_loss`)
   on the same inputs, rounded to bf16 vs kept in fp32. bf16 keeps 8 significant bits: unit
   roundoff u = 2⁻⁸ ≈ 3.9e-3 for an element's round trip (input rounding 2⁻⁹, the bf16
   result of the pooling bmm 2⁻⁹); pooled means, scores and cross-entropies are float32
   from there on. The gradients w.r.t. bf16 inputs are stored in bf16, so each gradient
   element carries a relative error of about u by itself: tolerance ``‖Δg‖/‖g‖ ≤ 2e-2``
   (≈ 5u) per input. A score is a dot product of unit-norm vectors over τ, a mean over
   many independent roundings, so the loss and each term err far less than u: tolerance
   ``|ΔL|/L ≤ 5e-3`` (≈ u). Measured on the CPU at (16, 48, 8, 64) … (128, 757, 64, 512):
   gradients 2.5e-3 … 4.9e-3, losses ≤ 6e-4.
3. **One-process process group + gather-with-grad round trip.** ``init_process_group``
   (``nccl`` on CUDA, ``gloo`` on the CPU; a file store, a 60 s timeout), then
   :func:`fam.distributed.gather_with_grad` with ``always=True`` (the collective runs
   even with one rank): values equal, the gradient reaches the local slice ×W (W = 1);
   :func:`~fam.distributed.gather_no_grad` of a bool mask (sent as uint8) equal; barrier;
   destroy.
"""
from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fam.bench.gradcache import CORPUS
from fam.config import GpuBenchConfig, LoraConfig
from fam.data.mmeb import TrainPair
from fam.data.types import MMItem
from fam.model import EmbeddingModel, apply_lora

log = logging.getLogger(__name__)

__all__ = ["gradcache_check", "mac_bf16_check", "distributed_check", "checks_section",
           "GRADCACHE_TOL", "MAC_BF16_TOL"]

GRADCACHE_TOL = {"grad_rel": 1e-4, "loss_rel": 1e-5, "dropout_effect_min": 1e-2}
MAC_BF16_TOL = {"loss_rel": 5e-3, "grad_rel": 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _grads(module: torch.nn.Module) -> torch.Tensor:
    """All trainable parameters' gradients as one float64 vector; clears them."""
    flat = torch.cat([p.grad.detach().double().flatten() for p in module.parameters()
                      if p.requires_grad and p.grad is not None])
    module.zero_grad(set_to_none=True)
    return flat


def _check_module(device: torch.device, image_size: int):
    from fam.backbones import build_tiny
    from fam.losses.vein import VeinHead
    from fam.train.adapt import ContrastiveLoss, ContrastiveModule
    adapter = build_tiny("qwen2_vl", size="xs", corpus=CORPUS, vocab_size=400, seed=0,
                         image_size=image_size, device=device)
    emb = EmbeddingModel(adapter)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    apply_lora(emb, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1))
    head = VeinHead(adapter.hidden_size, [-1, -2], num_layers=emb.num_layers + 1, gamma=0.3,
                    dropout=0.1)
    module = ContrastiveModule(emb, head).to(device).train()
    return module, ContrastiveLoss(0.05, vein_weight=0.7)


def gradcache_check(cfg: GpuBenchConfig, device: torch.device, paths: list[Path]) -> dict[str, Any]:
    """Check 1 of the module docstring."""
    from fam.train import gradcache as gc
    from fam.train.adapt import PairCollator
    module, loss = _check_module(device, 56)
    n = cfg.check_batch
    words = " ".join(CORPUS[:2]).split()
    pairs = [TrainPair(MMItem("<|image_1|>\nRepresent the given image.", paths[i % len(paths)])
                       if i % 4 != 3 else MMItem(f"Find: {' '.join(words[i % 5:i % 5 + 3])}"),
                       MMItem(" ".join(words[i % 7:i % 7 + 2 + i % 4])),
                       MMItem(f"not {words[i % 9]} {i}") if i % 2 == 0 else None,
                       "bench", "bench", i + 1) for i in range(n)]
    batch = PairCollator(module.embedder.adapter, True, {"bench": "classification"})(pairs)
    batch = batch.to(device)
    chunk = cfg.check_chunk

    def reference(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        outs = [module(c, 0) for c in batch.split(chunk)]
        value = loss(**gc.combine(outs), batch=batch, step=0)["loss"]
        value.backward()
        return value.detach(), _grads(module), torch.rand(4, device=device)

    ref_loss, ref_grad, ref_after = reference(123)
    _, other_grad, _ = reference(124)
    torch.manual_seed(123)
    terms = gc.gradcache_step(module, loss, batch, 0, chunk)
    got = _grads(module)
    after = torch.rand(4, device=device)
    res = {"device": str(device), "dtype": "float32", "rows": n, "chunk": chunk,
           "hard_negative_rows": int(batch.neg_rows.numel()),
           "loss_rel_err": abs(float(terms["loss"] - ref_loss)) / abs(float(ref_loss)),
           "grad_rel_err": _rel(got, ref_grad), "dropout_effect": _rel(other_grad, ref_grad),
           "rng_continues": bool(torch.equal(after, ref_after)),
           "rec_loss": float(terms.get("rec_loss", float("nan"))), "tolerance": GRADCACHE_TOL}
    res["passed"] = (res["grad_rel_err"] <= GRADCACHE_TOL["grad_rel"]
                     and res["loss_rel_err"] <= GRADCACHE_TOL["loss_rel"]
                     and res["dropout_effect"] >= GRADCACHE_TOL["dropout_effect_min"]
                     and res["rng_continues"] and res["rec_loss"] > 0)
    return res


def mac_bf16_check(cfg: GpuBenchConfig, device: torch.device) -> dict[str, Any]:
    """Check 2 of the module docstring."""
    from fam.bench.mac import make_inputs
    from fam.losses.mac import mac_loss
    b, n, t, d = cfg.check_mac_shape
    xs, im, tm = make_inputs(b, n, t, d, str(device), seed=1)

    def run(inputs):
        out = mac_loss(*inputs, im, tm, gather=False)
        out["loss"].backward()
        return {k: float(v.detach()) for k, v in out.items()}, [x.grad.double() for x in inputs]

    ref_terms, ref_grads = run(xs)
    low = [x.detach().to(torch.bfloat16).requires_grad_() for x in xs]
    terms, grads = run(low)
    names = ("e_img", "e_txt", "img_tokens", "txt_tokens")
    res = {"shape": {"B": b, "N": n, "T": t, "d": d}, "device": str(device),
           "terms_fp32": ref_terms, "terms_bf16": terms,
           "loss_rel_err": {k: abs(terms[k] - ref_terms[k]) / max(abs(ref_terms[k]), 1e-30)
                            for k in ref_terms},
           "grad_rel_err": {k: _rel(g, r) for k, g, r in zip(names, grads, ref_grads)},
           "tolerance": MAC_BF16_TOL}
    res["passed"] = (max(res["loss_rel_err"].values()) <= MAC_BF16_TOL["loss_rel"]
                     and max(res["grad_rel_err"].values()) <= MAC_BF16_TOL["grad_rel"])
    return res


def distributed_check(device: torch.device, root: Path) -> dict[str, Any]:
    """Check 3 of the module docstring."""
    import torch.distributed as dist

    from fam.distributed import gather_no_grad, gather_with_grad
    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    store = root / "pg_store"
    store.unlink(missing_ok=True)
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60), **kw)
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(4, 8, generator=g, device=device, requires_grad=True)
        upstream = torch.randn(4, 8, generator=g, device=device)
        y = gather_with_grad(x, always=True)
        y.backward(upstream)
        mask = torch.tensor([True, False, True, True], device=device)
        gathered = gather_no_grad(mask, always=True)
        values = gather_no_grad(x.detach(), always=True)  # the received copy, not x itself
        dist.barrier()
        res = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
               "gather_with_grad_values_equal": bool(torch.equal(y.detach(), x.detach())),
               "gathered_copy_equal": bool(torch.equal(values, x.detach())),
               "grad_equal": bool(torch.equal(x.grad, upstream * dist.get_world_size())),
               "bool_mask_equal": bool(torch.equal(gathered, mask))
               and gathered.dtype == torch.bool}
    finally:
        dist.destroy_process_group()
    res["seconds"] = time.perf_counter() - t0
    res["passed"] = all(v for k, v in res.items() if k.endswith("equal"))
    return res


def checks_section(cfg: GpuBenchConfig, device: torch.device, paths: list[Path],
                   root: Path) -> dict[str, Any]:
    """The three checks; one failing raises nothing — its ``passed`` is False."""
    out: dict[str, Any] = {}
    for name, fn in (("gradcache_rng_replay", lambda: gradcache_check(cfg, device, paths)),
                     ("mac_bf16_vs_fp32", lambda: mac_bf16_check(cfg, device)),
                     ("process_group_round_trip", lambda: distributed_check(device, root))):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as err:  # noqa: BLE001 - a broken check is reported, the rest still run
            log.exception("check %s failed to run", name)
            out[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"[:500]}
        out[name]["seconds"] = time.perf_counter() - t0
    out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict))
    return out
