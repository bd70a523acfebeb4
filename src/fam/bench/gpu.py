"""``fam bench gpu``: one prepared command that measures what matters on one GPU, in minutes.

Run ``fam bench gpu [--tiny] [--out DIR]``; it writes ``DIR/gpu_bench.json`` and
``DIR/gpu_bench.md`` (a markdown table) after *every* section, so a run cut short still
leaves its results, and ``DIR/worker.log``. Sections (:data:`fam.config.GPU_BENCH_SECTIONS`):

* ``environment`` — device, versions (torch, CUDA, cuDNN, NCCL, transformers, peft,
  flash-attn), bf16 support, attention kernels, the device's dense bf16 peak
  (:mod:`fam.bench.device`);
* ``adapt`` — a LoRA adaptation step of a Qwen2-VL-2B-shaped model (random bf16 weights):
  GradCache at each chunk, hard negatives, VEIN; step time, tokens/s, peak memory, FLOPs
  and MFU (:mod:`fam.bench.gpu_steps`); flash-attention-2 too when installed;
* ``align`` — the same for a MAC alignment step;
* ``mac`` — ``fam bench mac`` (:mod:`fam.bench.mac`, fresh processes) at the paper's scale in
  bf16: the official-form and fully masked references' measured peak memory and time vs
  the exact form's, or the memory at which each ran out;
* ``encode`` — image and text items/s and the preprocessing share;
* ``checks`` — correctness on the device (:mod:`fam.bench.gpu_checks`).

**Hang-proof by construction.** The sections run in a worker process that announces each
section's start and result on stdout; this process watches it with a per-section limit
(``GpuBenchConfig.section_timeout_s``) and an overall budget (``budget_s``). A section that
overruns is killed and recorded as ``timeout``, a crashed worker as ``error`` (with the
tail of its log), and a fresh worker continues with the remaining sections; sections that
cannot start before the budget ends are ``skipped``. ``--tiny`` runs the very same code at
tiny sizes (:meth:`GpuBenchConfig.tiny`), on CUDA when present, else on the CPU.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fam.config import GpuBenchConfig
from fam.config.tools import GPU_BENCH_SECTIONS
from fam.errors import FamError
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["run_gpu_bench", "format_markdown", "SECTIONS"]

SECTIONS = GPU_BENCH_SECTIONS
_MARK = "@@fam-bench-gpu@@ "
_STARTUP_S = 120  # a fresh worker's imports and CUDA initialisation, before its first section


# ---------------------------------------------------------------------------- worker
def _run_section(name: str, ws, env: dict[str, Any]) -> dict[str, Any]:
    from fam.bench import gpu_checks, gpu_steps
    peak = (env.get("bf16_peak") or {}).get("tflops")
    if name == "adapt":
        return gpu_steps.adapt_section(ws, peak)
    if name == "align":
        return gpu_steps.align_section(ws, peak)
    if name == "mac":
        from fam.bench.mac import paper_scale_estimate, run_bench
        b, n, t, d = ws.cfg.mac_shape
        limit = ws.cfg.section_timeout_s["mac"] / 2
        row = run_bench([(b, n, t, d)], str(ws.device), ws.cfg.mac_repeats, dtype="bfloat16",
                        timeout=limit)[0]
        est = paper_scale_estimate(b, n, t, d, 2)
        return {**row, "naive_similarity_tensor_bytes_computed": est["naive_bytes"]}
    if name == "encode":
        return gpu_steps.encode_section(ws)
    if name == "checks":
        return gpu_checks.checks_section(ws.cfg, ws.device, ws.image_paths(), ws.root)
    raise ValueError(f"unknown section {name!r}")


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(_MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def worker_main(spec: dict[str, Any]) -> None:
    """Run ``spec["sections"]`` in order, announcing each start and result (module docstring)."""
    import torch

    from fam.bench.device import environment
    from fam.bench.gpu_steps import Workspace
    cfg = GpuBenchConfig(**spec["config"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        # An indexed device: NCCL binds to it, and the MAC workers inherit it as "cuda:i".
        device = torch.device("cuda", device.index if device.index is not None
                              else torch.cuda.current_device())
        torch.cuda.set_device(device)
    env = environment(device)
    root = Path(spec["work_dir"])
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(cfg, device, root)
    for name in spec["sections"]:
        _emit({"event": "start", "section": name})
        t0 = time.perf_counter()
        try:
            result = env if name == "environment" else _run_section(name, ws, env)
            status = "ok"
        except Exception as err:  # noqa: BLE001 - reported; the next sections still run
            logging.getLogger(__name__).exception("section %s failed", name)
            result, status = {"error": f"{type(err).__name__}: {err}"[:1000]}, "error"
        _emit({"event": "done", "section": name, "status": status,
               "seconds": time.perf_counter() - t0, "result": result})


# ---------------------------------------------------------------------------- watchdog
class _Worker:
    """A worker process whose announcements arrive on a queue (None: it exited)."""

    def __init__(self, spec: dict[str, Any], log_file):
        src_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fam.bench.gpu", "--_worker", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
            start_new_session=True)  # its own process group: killed with its children
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                self.events.put(json.loads(line[len(_MARK):]))
        self.events.put(None)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_gpu_bench(cfg: GpuBenchConfig, out_dir: str | Path, device: str, tiny: bool,
                  sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Run the sections under the watchdog; write JSON and markdown after each one.

    Returns:
        The results: ``config``, ``device``, ``tiny``, ``sections`` (name →
        ``{"status": "ok"|"error"|"timeout"|"skipped", "seconds", "result"}``),
        ``checks_passed`` and ``wall_s``.
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "worker.log"
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget_s
    res: dict[str, Any] = {"command": "fam bench gpu" + (" --tiny" if tiny else ""),
                           "tiny": tiny, "device": device, "config": asdict(cfg),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t_start
        checks = res["sections"].get("checks")
        # None: not run (yet); a checks section that errored or timed out did not pass.
        res["checks_passed"] = None if checks is None else \
            checks["status"] == "ok" and bool(checks["result"].get("passed"))
        atomic_write_json(out / "gpu_bench.json", res)
        atomic_write_text(out / "gpu_bench.md", format_markdown(res))

    pending = list(sections)
    work = out / "work"  # the worker's images and store; removed at the end
    with open(log_path, "w", encoding="utf-8") as log_file:
        while pending and time.perf_counter() < deadline:
            worker = _Worker({"config": asdict(cfg), "device": device, "sections": pending,
                              "work_dir": str(work)}, log_file)
            current = None
            limit = time.perf_counter() + _STARTUP_S + cfg.section_timeout_s[pending[0]]
            while pending:
                try:
                    ev = worker.events.get(timeout=max(min(limit, deadline) -
                                                       time.perf_counter(), 0.01))
                except queue.Empty:  # the section (or the start-up) overran: kill, record
                    name = current or pending[0]
                    worker.kill()
                    why = "budget" if time.perf_counter() >= deadline else "section limit"
                    res["sections"][name] = {"status": "timeout", "seconds": None, "result": {
                        "error": f"killed after exceeding the {why} "
                                 f"({cfg.section_timeout_s[name]} s section, "
                                 f"{cfg.budget_s} s budget)", "log_tail": _log_tail(log_path)}}
                    pending.remove(name)
                    save()
                    break
                if ev is None:  # the worker died (a crash, or killed by the OOM killer)
                    name = current or pending[0]
                    res["sections"][name] = {"status": "error", "seconds": None, "result": {
                        "error": f"worker exited with code {worker.proc.wait()} during this "
                                 "section", "log_tail": _log_tail(log_path)}}
                    pending.remove(name)
                    save()
                    break
                if ev["event"] == "start":
                    current = ev["section"]
                    limit = time.perf_counter() + cfg.section_timeout_s[current]
                    log.info("fam bench gpu: %s ...", current)
                    continue
                res["sections"][ev["section"]] = {k: ev[k] for k in ("status", "seconds",
                                                                     "result")}
                pending.remove(ev["section"])
                log.info("fam bench gpu: %s %s in %.1f s", ev["section"], ev["status"],
                         ev["seconds"])
                current = None
                save()
            try:
                worker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            worker.kill()
    for name in pending:
        res["sections"][name] = {"status": "skipped", "seconds": None,
                                 "result": {"error": f"the {cfg.budget_s} s budget ran out"}}
    save()
    shutil.rmtree(work, ignore_errors=True)
    return res


def device_for(tiny: bool) -> str:
    """``cuda`` when a CUDA device is visible; else ``cpu`` for ``--tiny``, else an error."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if tiny:
        return "cpu"
    raise FamError("fam bench gpu: no CUDA device is visible (torch.cuda.is_available() is "
                   "False); install a CUDA build of torch (docs/gpu.md), or run "
                   "`fam bench gpu --tiny` to check the same code at tiny size on the CPU")


# ---------------------------------------------------------------------------- report
def _gb(x: float | None) -> str:
    """Bytes in GB (MB below 0.1 GB: tiny runs)."""
    if x is None:
        return "—"
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s:.1f} TFLOP/s" if flops_per_s >= 0.1 else \
        f"{flops_per_s * 1e3:.2f} GFLOP/s"


def _short(x: Any) -> Any:
    """Floats to 3 significant digits, recursively (the checks' table)."""
    if isinstance(x, float):
        return float(f"{x:.3g}")
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    return x


def _count(x: float) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e9 else f"{x / 1e6:.2f} M"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _step_rows(name: str, sec: dict[str, Any]) -> list[str]:
    r = sec.get("result") or {}
    rows = []
    for run in r.get("runs", []):
        label = f"{name}: B={r['batch']}, chunk {run['chunk']}, {run['attn_implementation']}"
        if run.get("oom"):
            rows.append(f"| {label} | OOM at {_gb(run.get('allocated_at_oom_bytes'))} | | | | |")
            continue
        total = run.get("peak_total_bytes")
        rows.append(f"| {label} | {run['step_s']:.2f} s | {run['tokens_per_s']:,.0f} | "
                    f"{_gb(run['peak_step_bytes'])}" + (f" ({_gb(total)} with weights)"
                                                        if total else "") +
                    f" | {_rate(run['achieved_tflops'])} | {_pct(run.get('mfu'))} / "
                    f"{_pct(run.get('mfu_model'))} |")
    return rows


def format_markdown(res: dict[str, Any]) -> str:
    """The report: environment, a table of the measurements, the checks, section status."""
    secs = res["sections"]
    env = (secs.get("environment") or {}).get("result") or {}
    peak = env.get("bf16_peak")
    lines = [f"# `{res['command']}` on {env.get('device_name', res['device'])}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers "
             f"{env.get('transformers')}, peft {env.get('peft')}, flash-attn "
             f"{env.get('flash_attn')}; bf16: {env.get('bf16')}; dense bf16 peak: "
             + (f"{peak['tflops']} TFLOPS ({peak['source']})" if peak else
                env.get("bf16_peak_note", "unknown")), ""]
    adapt = (secs.get("adapt") or {}).get("result") or {}
    if adapt.get("model"):
        m, tok = adapt["model"], adapt["tokens"]
        lines += [f"Model: Qwen2-VL shape `{m['shape']}` ({_count(m['params'])} parameters, "
                  f"{m['dtype']}, random weights), LoRA r={adapt['lora_rank']} "
                  f"({_count(m['lora_params'])} trainable), VEIN layers "
                  f"{adapt['vein_layers']}, {adapt['image_size']}² images, hard negatives. "
                  f"Adapt batch: {tok['lm_tokens']:,} language tokens "
                  f"({tok['lm_tokens_padded']:,} padded), {tok['patches']:,} image patches; "
                  f"collate {adapt['collate_s']:.1f} s.", ""]
    lines += ["| step | time | tokens/s | peak memory (step) | achieved | MFU / MFU without "
              "GradCache's extra forward |", "|---|---|---|---|---|---|"]
    for name in ("adapt", "align"):
        lines += _step_rows(name, secs.get(name) or {})
    mac = (secs.get("mac") or {}).get("result") or {}
    if "exact_peak_bytes" in mac:
        def cell(v: str) -> str:
            if mac.get(f"{v}_oom"):
                return (f"OOM at {_gb(mac[f'{v}_oom_allocated_bytes'])} "
                        f"(tried to allocate {mac.get(f'{v}_oom_tried_to_allocate')})")
            return f"{mac[f'{v}_time_s'] * 1e3:.1f} ms, peak {_gb(mac[f'{v}_peak_bytes'])}"
        ratio = "".join(
            f"; {r}/exact: {mac[f'{r}_memory_ratio']:.0f}× memory, "
            f"{mac[f'{r}_speed_ratio']:.1f}× time" for r in ("official", "naive")
            if mac.get(f"{r}_memory_ratio") is not None)
        forms = "".join(f"; {r} {cell(r)}" for r in ("official", "naive")
                        if f"{r}_peak_bytes" in mac)
        lines += ["", f"MAC fwd+bwd, bf16, (B, N, T, d) = ({mac['B']}, {mac['N']}, {mac['T']}, "
                      f"{mac['d']}): exact {cell('exact')}{forms}{ratio} "
                      f"(the naive similarity tensor alone, computed: "
                      f"{_gb(mac['naive_similarity_tensor_bytes_computed'])})."]
    enc = (secs.get("encode") or {}).get("result") or {}
    for kind in ("image", "text"):
        if kind in enc:
            e = enc[kind]
            lines.append(f"Encode {kind} items: {e['items_per_s']:,.1f} items/s ({e['items']} "
                         f"items, batch {enc['batch_size']}); preprocessing "
                         f"{_pct(e['preprocess_share'])} of preprocessing + forward.")
    checks = (secs.get("checks") or {}).get("result") or {}
    if checks:
        lines += ["", "| check | passed | measured | tolerance |", "|---|---|---|---|"]
        for name, c in checks.items():
            if isinstance(c, dict):
                measured = {k: c[k] for k in c if k in ("grad_rel_err", "loss_rel_err",
                                                        "dropout_effect", "rng_continues",
                                                        "backend", "error")
                            or k.endswith("_equal")}
                tol = c.get("tolerance", "exact equality")
                lines.append(f"| {name} | {c['passed']} | `{json.dumps(_short(measured))}` | "
                             f"`{json.dumps(tol)}` |")
    lines += ["", "Sections: " + ", ".join(f"{k} {v['status']}" + (
        f" ({v['seconds']:.0f} s)" if v.get("seconds") is not None else "")
        for k, v in secs.items()) + f"; wall {res.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # `python -m fam.bench.gpu --_worker SPEC` runs sections for run_gpu_bench's watchdog;
    # users run `fam bench gpu [--tiny]`.
    if sys.argv[1:2] != ["--_worker"]:
        sys.exit("this module is the benchmark's worker; run `fam bench gpu [--tiny]`")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_main(json.loads(sys.argv[2]))
