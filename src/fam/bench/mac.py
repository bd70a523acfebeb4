"""Benchmark: exact MAC (method.md §2, O(Bd) memory) vs the forms people run instead.

Run ``fam bench mac [--shapes B,N,T,d ...] [--device cpu|cuda] [--repeats 3]
[--dtype float32|bfloat16] [--json FILE]``.

References (each a (B·N)×(B·T) token-token cosine matrix, the tensor the exact form avoids):

* ``official`` (**the reference; ratios are quoted against it**): the form of the official
  FAM code's ``forward_cross_contrastive_loss``: normalise the token states, zero the padding
  *features* (text, and image when masked) before one ``(B·N)×(B·T)`` matmul, then sum and
  divide by the real-token counts. It is the strongest form a user of the official code
  actually runs: the padding mask costs no extra ``B×N×B×T`` tensor.
* ``naive`` (second row): the same matrix with the padding mask built as a full
  ``B×N×B×T`` tensor and multiplied in afterwards, as research code often writes it. It
  is heavier than the official form, so ratios against it overstate; it is kept to show
  by how much.

Method (honest by construction):

* Each (shape, variant) runs in a **fresh subprocess**, so allocator caches and earlier
  peaks of one variant cannot hide or inflate the other's.
* Every variant computes the loss (and input-gradient norms) on the same seeded inputs;
  the run reports the largest relative difference from the exact form, and ``fam bench
  mac`` exits 1 when they differ beyond :data:`PARITY_RTOL` or a target ratio is missed.
* Peak memory is the extra memory held during one forward+backward pass over the inputs
  that already exist (token states, embeddings, masks), *including* the input gradients.
  On CUDA: ``max_memory_allocated() − memory_allocated()`` before the pass. On CPU (no
  allocator statistics exist): the process's resident-set high-water mark, reset just
  before the pass through ``/proc/self/clear_refs`` (Linux), minus the resident set
  before the pass — i.e. real RAM, as ``top`` would see it. Where the reset is not
  available the ``ru_maxrss`` growth is used (flagged in the report).
* Time is the median wall-clock of ``repeats`` forward+backward passes after a warm-up.
* A variant that runs out of device memory is a measurement too: the worker catches the
  CUDA out-of-memory error and reports the memory allocated when it happened (and the
  size of the allocation that failed), e.g. the naive form at the paper's scale.
"""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fam.config.tools import MAC_BENCH_SHAPES
from fam.losses.mac import mac_loss
from fam.bench import PeakMemory

logger = logging.getLogger(__name__)

__all__ = ["mac_loss_naive", "mac_loss_official_form", "run_bench", "paper_scale_estimate",
           "format_report", "check", "DEFAULT_SHAPES", "DTYPES", "PARITY_RTOL", "VARIANTS",
           "make_inputs"]

DEFAULT_SHAPES = MAC_BENCH_SHAPES  # defined with the CLI's defaults (fam.config.tools)
# The official FAM run (method.md §2): batch 512, Phi-3.5-V image tokens 757, caption 64, d 3072.
PAPER_SCALE = {"B": 512, "N": 757, "T": 64, "d": 3072, "bytes_per_element": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _masks(img_tokens: Tensor, txt_tokens: Tensor, img_mask: Tensor | None,
           txt_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    b, n, _ = img_tokens.shape
    t_len = txt_tokens.shape[1]
    mi = torch.ones(b, n, dtype=img_tokens.dtype, device=img_tokens.device) if img_mask is None \
        else img_mask.to(img_tokens.dtype)
    mt = torch.ones(b, t_len, dtype=txt_tokens.dtype, device=txt_tokens.device) if txt_mask is None \
        else txt_mask.to(txt_tokens.dtype)
    return mi, mt


def _combine(e_img: Tensor, e_txt: Tensor, s_i2t: Tensor, s_t2i: Tensor, s_f: Tensor,
             temperature: float, weights: Sequence[float], c2f_reduction: str) -> dict[str, Tensor]:
    """The three InfoNCE terms from the B×B score matrices (shared by both reference forms)."""
    labels = torch.arange(e_img.shape[0], device=e_img.device)
    coarse = F.cross_entropy(e_img @ e_txt.T / temperature, labels)
    i2t, t2i = F.cross_entropy(s_i2t, labels), F.cross_entropy(s_t2i, labels)
    c2f = i2t + t2i if c2f_reduction == "sum" else 0.5 * (i2t + t2i)
    fine = F.cross_entropy(s_f, labels)
    w_c, w_c2f, w_f = weights
    return {"loss": w_c * coarse + w_c2f * c2f + w_f * fine, "coarse_loss": coarse,
            "c2f_loss": c2f, "fine_loss": fine}


def mac_loss_official_form(img_emb: Tensor, txt_emb: Tensor, img_tokens: Tensor,
                           txt_tokens: Tensor, img_mask: Tensor | None = None,
                           txt_mask: Tensor | None = None, temperature: float = 0.02,
                           weights: Sequence[float] = (1.0, 1.0, 1.0),
                           c2f_reduction: str = "mean") -> dict[str, Tensor]:
    """MAC as the official FAM code computes it (benchmark reference only).

    Like the official ``forward_cross_contrastive_loss``/``forward_text_contrastive_loss``:
    the normalised token features are multiplied by their padding mask *before* the
    ``(B·N)×(B·T)`` matmul, so the padding costs no tensor of that size; the matrix is then
    summed over tokens and divided by the real-token counts. Same arguments and outputs as
    :func:`fam.losses.mac.mac_loss` (no gathering); memory O(B²·N·T).
    """
    b, n, d = img_tokens.shape
    t_len = txt_tokens.shape[1]
    mi, mt = _masks(img_tokens, txt_tokens, img_mask, txt_mask)
    h_img = (F.normalize(img_tokens, dim=-1) * mi[..., None]).reshape(b * n, d)
    h_txt = (F.normalize(txt_tokens, dim=-1) * mt[..., None]).reshape(b * t_len, d)
    e_img, e_txt = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
    sim = (h_img @ h_txt.T).view(b, n, b, t_len)  # (B·N)×(B·T): the one expensive tensor
    s_f = sim.sum(dim=(1, 3)) / (mi.sum(1)[:, None] * mt.sum(1)[None, :]) / temperature
    s_i2t = (e_img @ h_txt.T).view(b, b, t_len).sum(-1) / mt.sum(1)[None] / temperature
    s_t2i = (e_txt @ h_img.T).view(b, b, n).sum(-1) / mi.sum(1)[None] / temperature
    return _combine(e_img, e_txt, s_i2t, s_t2i, s_f, temperature, weights, c2f_reduction)


def mac_loss_naive(img_emb: Tensor, txt_emb: Tensor, img_tokens: Tensor, txt_tokens: Tensor,
                   img_mask: Tensor | None = None, txt_mask: Tensor | None = None,
                   temperature: float = 0.02, weights: Sequence[float] = (1.0, 1.0, 1.0),
                   c2f_reduction: str = "mean") -> dict[str, Tensor]:
    """Naive MAC: the ``(B·N)×(B·T)`` cosine matrix times a full ``B×N×B×T`` padding mask.

    The second, heavier reference (benchmark only): unlike :func:`mac_loss_official_form`
    the mask is applied after the matmul, as a broadcast multiply that materialises a second
    tensor of that size. Same arguments and outputs as :func:`fam.losses.mac.mac_loss`.
    """
    b, n, d = img_tokens.shape
    t_len = txt_tokens.shape[1]
    mi, mt = _masks(img_tokens, txt_tokens, img_mask, txt_mask)
    h_img = F.normalize(img_tokens, dim=-1).reshape(b * n, d)
    h_txt = F.normalize(txt_tokens, dim=-1).reshape(b * t_len, d)
    e_img, e_txt = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
    sim = (h_img @ h_txt.T).view(b, n, b, t_len)  # (B·N)×(B·T): the expensive tensor
    sim = sim * (mi[:, :, None, None] * mt[None, None, :, :])  # mask padding pairs
    s_f = sim.sum(dim=(1, 3)) / (mi.sum(1)[:, None] * mt.sum(1)[None, :]) / temperature
    s_i2t = ((e_img @ h_txt.T).view(b, b, t_len) * mt[None]).sum(-1) / mt.sum(1)[None] / temperature
    s_t2i = ((e_txt @ h_img.T).view(b, b, n) * mi[None]).sum(-1) / mi.sum(1)[None] / temperature
    return _combine(e_img, e_txt, s_i2t, s_t2i, s_f, temperature, weights, c2f_reduction)


VARIANTS = ("exact", "official", "naive")
REFERENCES = ("official", "naive")  # ratios: reference / exact; "official" is the headline
# Largest relative difference allowed between any reference's loss (and input-gradient
# norms) and the exact form's: float32 — the forms sum up to B·N·T products in different
# orders, each rounding at 2^-24 relative, so 1e-4 leaves ~1000 ulps for accumulation;
# bfloat16 — states and products round at 2^-8 relative (bf16's epsilon); 4 × 2^-8 covers
# that rounding entering the loss through a few differently ordered sums.
PARITY_RTOL = {"float32": 1e-4, "bfloat16": 4 * 2.0 ** -8}


def _variant(name: str):
    if name == "exact":
        return lambda *a: mac_loss(*a, gather=False)
    if name == "official":
        return mac_loss_official_form
    if name == "naive":
        return mac_loss_naive
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}.")


def make_inputs(b: int, n: int, t: int, d: int, device: str, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    """Random MAC inputs with realistic padding: ``([e_img, e_txt, H_img, H_txt], img_mask,
    txt_mask)``; the four tensors are leaves that require grad, in ``dtype`` on ``device``."""
    cuda = str(device).startswith("cuda")
    # On CUDA the inputs are drawn on the device (billions of elements at the paper's scale).
    g = torch.Generator(device=device if cuda else "cpu").manual_seed(seed)
    gen = dict(generator=g, device=device if cuda else "cpu")
    xs = [torch.randn(b, d, **gen), torch.randn(b, d, **gen),
          torch.randn(b, n, d, **gen), torch.randn(b, t, d, **gen)]
    xs = [x.to(device=device, dtype=dtype).requires_grad_() for x in xs]
    # Realistic padding: full images, captions of random length in [T/4, T].
    txt_len = torch.randint(max(1, t // 4), t + 1, (b,), generator=torch.Generator().manual_seed(seed))
    txt_mask = (torch.arange(t)[None] < txt_len[:, None]).to(device)
    img_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    return xs, img_mask, txt_mask


def _step(fn, xs, im, tm) -> tuple[Tensor, list[Tensor]]:
    """One forward+backward pass; (loss, input-gradient norms), both left on the device."""
    loss = fn(*xs, im, tm)["loss"]
    loss.backward()
    norms = [torch.linalg.vector_norm(x.grad.float()) for x in xs]
    for x in xs:
        x.grad = None
    return loss.detach(), norms


def _oom_record(err: Exception, before: int) -> dict:
    """What a CUDA out-of-memory error measured: the memory allocated when it happened."""
    msg = str(err)
    tried = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", msg)
    return {"oom": True, "oom_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "oom_tried_to_allocate": tried.group(1) if tried else None,
            "device_total_bytes": int(torch.cuda.get_device_properties(0).total_memory),
            "peak_bytes": int(torch.cuda.max_memory_allocated() - before),
            "error": msg.strip().splitlines()[0][:300]}


def _worker(b: int, n: int, t: int, d: int, variant: str, device: str, repeats: int,
            dtype: str = "float32") -> dict:
    """Measure one (shape, variant) in this (fresh) process."""
    fn = _variant(variant)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dt = DTYPES[dtype]
    # Warm up kernels/thread pools on a tiny problem so lazy initialisation is not counted.
    _step(fn, *make_inputs(4, 8, 4, 16, device, dtype=dt))
    xs, im, tm = make_inputs(b, n, t, d, device, dtype=dt)
    sync()
    row = {"B": b, "N": n, "T": t, "d": d, "variant": variant, "device": device, "dtype": dtype,
           "threads": torch.get_num_threads()}
    meter = PeakMemory(cuda)
    t0 = time.perf_counter()
    try:
        loss, norms = _step(fn, xs, im, tm)
        sync()
    except torch.OutOfMemoryError as err:  # the naive form at the paper's scale may not fit
        for x in xs:
            x.grad = None
        return {**row, **_oom_record(err, meter.before), "time_s": None,
                "memory_method": meter.method}
    first = time.perf_counter() - t0
    peak, method = meter.stop()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        _step(fn, xs, im, tm)
        sync()
        times.append(time.perf_counter() - t0)
    return {**row, "peak_bytes": int(max(peak, 0)), "time_s": statistics.median(times or [first]),
            "memory_method": method, "oom": False, "loss": float(loss),
            "grad_norms": [float(g) for g in norms]}


def _run_in_subprocess(b, n, t, d, variant, device, repeats, dtype: str = "float32",
                       timeout: float | None = None) -> dict:
    src_root = str(Path(__file__).resolve().parents[2])  # .../src, so `fam` imports as here
    env = dict(os.environ)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fam.bench.mac", "--_worker",
           ",".join(map(str, (b, n, t, d))), variant, device, str(repeats), dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"benchmark worker {variant} {(b, n, t, d)} timed out after "
                           f"{timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {variant} {(b, n, t, d)} failed "
                           f"(exit {proc.returncode}; out of memory?):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(shapes: Sequence[tuple[int, int, int, int]] = DEFAULT_SHAPES, device: str = "cpu",
              repeats: int = 3, dtype: str = "float32", timeout: float | None = None,
              variants: Sequence[str] = VARIANTS) -> list[dict]:
    """Time, peak memory and loss of exact MAC and its references, forward+backward, per shape.

    Args:
        shapes: ``(B, N, T, d)`` tuples.
        device: ``"cpu"`` or a CUDA device.
        repeats: timed passes per variant (median reported) after the measured first pass.
        dtype: ``"float32"`` or ``"bfloat16"`` inputs.
        timeout: seconds allowed to each variant's worker (None: no limit).
        variants: which of :data:`VARIANTS` to run (``"exact"`` always runs).

    Returns:
        One dict per shape: ``B, N, T, d, dtype, memory_method, threads`` and, per variant
        ``v``, ``{v}_time_s, {v}_peak_bytes, {v}_oom, {v}_loss, {v}_grad_norms``; per
        reference ``r`` (official, naive), ``{r}_memory_ratio, {r}_speed_ratio`` (reference /
        exact) and ``{r}_loss_rel_diff`` (largest relative difference of its loss and
        gradient norms from the exact form's); ``memory_ratio``/``speed_ratio`` repeat the
        official form's (the headline). A variant that ran out of CUDA memory has no time,
        its ``{v}_peak_bytes`` is the growth reached before the failing allocation,
        ``{v}_oom_allocated_bytes`` the memory allocated then and
        ``{v}_oom_tried_to_allocate`` the failing request; its ratios are None.
    """
    variants = ["exact"] + [v for v in VARIANTS[1:] if v in variants]
    rows = []
    for b, n, t, d in shapes:
        res = {v: _run_in_subprocess(b, n, t, d, v, device, repeats, dtype, timeout)
               for v in variants}
        row = {"B": b, "N": n, "T": t, "d": d, "dtype": dtype, "variants": variants,
               "memory_method": res["exact"]["memory_method"], "threads": res["exact"]["threads"]}
        for v in variants:
            row[f"{v}_time_s"] = res[v]["time_s"]
            row[f"{v}_peak_bytes"] = res[v]["peak_bytes"]
            row[f"{v}_oom"] = bool(res[v].get("oom"))
            row[f"{v}_loss"] = res[v].get("loss")
            row[f"{v}_grad_norms"] = res[v].get("grad_norms")
            for k in ("oom_allocated_bytes", "oom_tried_to_allocate", "device_total_bytes"):
                if k in res[v]:
                    row[f"{v}_{k}"] = res[v][k]
        for r in variants[1:]:
            measured = not (row["exact_oom"] or row[f"{r}_oom"])
            row[f"{r}_memory_ratio"] = row[f"{r}_peak_bytes"] / max(row["exact_peak_bytes"], 1) \
                if measured else None
            row[f"{r}_speed_ratio"] = row[f"{r}_time_s"] / max(row["exact_time_s"], 1e-9) \
                if measured else None
            row[f"{r}_loss_rel_diff"] = _rel_diff(res["exact"], res[r]) if measured else None
        head = "official" if "official" in variants[1:] else (variants[1:] or [None])[0]
        row["memory_ratio"] = row.get(f"{head}_memory_ratio")
        row["speed_ratio"] = row.get(f"{head}_speed_ratio")
        logger.info("MAC bench %s: %s", (b, n, t, d), row)
        rows.append(row)
    return rows


def _rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference between two workers' loss and input-gradient norms."""
    pairs = [(a["loss"], b["loss"])] + list(zip(a["grad_norms"], b["grad_norms"]))
    return max(abs(x - y) / max(abs(x), 1e-30) for x, y in pairs)


def check(rows: list[dict], min_memory_ratio: float = 1.0, min_speed_ratio: float = 1.0
          ) -> list[str]:
    """What failed: references whose loss differs from the exact form's beyond
    :data:`PARITY_RTOL`, and shapes where the exact form is not at least ``min_*_ratio``
    times lighter / faster than the official form. Empty when everything holds."""
    problems = []
    for r in rows:
        shape = f"(B, N, T, d) = ({r['B']}, {r['N']}, {r['T']}, {r['d']})"
        tol = PARITY_RTOL[r["dtype"]]
        for ref in r.get("variants", ["exact", "naive"])[1:]:
            diff = r.get(f"{ref}_loss_rel_diff")
            if diff is not None and not diff <= tol:
                problems.append(f"{shape}: the {ref} form's loss/gradients differ from the exact "
                                f"form's by {diff:.2e} relative (allowed {tol:.2e})")
        for what, want in (("memory", min_memory_ratio), ("speed", min_speed_ratio)):
            got = r.get(f"{what}_ratio")
            if got is not None and got < want:
                problems.append(f"{shape}: target NOT met: {what} ratio official/exact "
                                f"{got:.2f}x < {want:.2f}x")
    return problems


def paper_scale_estimate(B: int = 512, N: int = 757, T: int = 64, d: int = 3072,  # noqa: N803
                         bytes_per_element: int = 2) -> dict:
    """Analytic memory of the naive similarity tensor vs the exact form's score inputs.

    Returns:
        dict with ``naive_elements`` (= (B·N)·(B·T)), ``naive_bytes`` (that matrix alone,
        forward only) and ``exact_bytes``: the four ``(B, d)`` representations plus the
        four ``B×B`` float32 score matrices of the exact form.
    """
    naive_elements = (B * N) * (B * T)
    exact_bytes = 4 * B * d * bytes_per_element + 4 * B * B * 4
    return {"naive_elements": naive_elements, "naive_bytes": naive_elements * bytes_per_element,
            "exact_bytes": exact_bytes}


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(x) < 1024 or unit == "TB":
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TB"


def _cell(r: dict, v: str) -> tuple[str, str]:
    """(time, peak) cells of variant ``v``; an out-of-memory variant says where it failed."""
    if r.get(f"{v}_oom"):
        return "OOM", f"OOM at {r[f'{v}_oom_allocated_bytes'] / 1e9:.1f} GB"
    return f"{r[f'{v}_time_s'] * 1e3:.1f}ms", _fmt_bytes(r[f"{v}_peak_bytes"])


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


_LABEL = {"exact": "exact (fam)", "official": "official form", "naive": "fully masked"}


def format_report(rows: list[dict], device: str) -> str:
    """The printed table (one line per shape and form), the paper-scale estimate and, last,
    the ratios against each reference."""
    dtype = rows[0].get("dtype", "float32")
    lines = [f"MAC forward+backward, {dtype}, device={device}, torch threads={rows[0]['threads']}, "
             f"peak memory method={rows[0]['memory_method']}",
             "references: 'official form' = the official FAM code's forward_cross_contrastive_loss "
             "(padding features zeroed before the (B·N)x(B·T) matmul; what its users run); "
             "'fully masked' = that matrix times a full BxNxBxT mask (heavier; second row)",
             f"{'B':>5} {'N':>5} {'T':>4} {'d':>5} {'form':>14} | {'time':>10} {'peak':>11} | "
             f"{'mem x':>7} {'speed x':>7} {'loss':>10} {'rel diff':>9}"]
    for r in rows:
        for v in r.get("variants", ["exact", "naive"]):
            t, p = _cell(r, v)
            mem = "" if v == "exact" else _ratio(r.get(f"{v}_memory_ratio", r.get("memory_ratio")))
            spd = "" if v == "exact" else _ratio(r.get(f"{v}_speed_ratio", r.get("speed_ratio")))
            loss = r.get(f"{v}_loss")
            diff = r.get(f"{v}_loss_rel_diff")
            lines.append(f"{r['B']:>5} {r['N']:>5} {r['T']:>4} {r['d']:>5} {_LABEL[v]:>14} | "
                         f"{t:>10} {p:>11} | {mem:>7} {spd:>7} "
                         f"{'' if loss is None else f'{loss:.6g}':>10} "
                         f"{'' if diff is None else f'{diff:.1e}':>9}")
    est = paper_scale_estimate(**PAPER_SCALE)
    ps = PAPER_SCALE
    first = rows[0]
    lines += [f"paper scale (B={ps['B']}, N={ps['N']}, T={ps['T']}, d={ps['d']}, bf16): the "
              f"(B·N)×(B·T) matrix = {est['naive_elements']:.3g} elements = "
              f"{est['naive_bytes'] / 1e9:.1f} GB before backward; exact form's score inputs "
              f"= {est['exact_bytes'] / 1e6:.1f} MB (O(Bd))",
              f"(ratios below: reference / exact at B,N,T,d = "
              f"{first['B']},{first['N']},{first['T']},{first['d']}; loss parity allowed "
              f"{PARITY_RTOL[dtype]:.1e} relative)"]
    for ref in first.get("variants", ["exact", "naive"])[1:]:
        mem = first.get(f"{ref}_memory_ratio", first.get("memory_ratio"))
        spd = first.get(f"{ref}_speed_ratio", first.get("speed_ratio"))
        lines.append(f"vs {_LABEL[ref]}: peak memory ratio {_ratio(mem)}, speed ratio {_ratio(spd)}")
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m fam.bench.mac --_worker ...` measures one variant in this fresh process
    # (run_bench's subprocess protocol); users run `fam bench mac`.
    if sys.argv[1:2] != ["--_worker"]:
        sys.exit("this module is the benchmark's worker; run `fam bench mac [--shapes ...]`")
    b, n, t, d = (int(x) for x in sys.argv[2].split(","))
    print(json.dumps(_worker(b, n, t, d, sys.argv[3], sys.argv[4], int(sys.argv[5]),
                             *sys.argv[6:7])))
