"""Benchmarks that back the efficiency claims (ratios against a reference measured in the same
run), the shared peak-memory meter, and the memory planner (:mod:`fam.bench.plan`, ``fam plan``).

Each benchmark measures against the strongest thing a user would otherwise run, checks that
its variants compute the same result, and exits 1 when they differ or a target is missed:

* ``fam bench mac`` (:mod:`.mac`): the official FAM code's form (padding features zeroed
  before one (B·N)×(B·T) matmul); the fully masked form as a second row.
* ``fam bench gradcache`` (:mod:`.gradcache`): a plain batch of ``chunk`` rows, the largest
  batch the same memory holds without GradCache.
* ``fam bench encode`` (:mod:`.encode`): a plain loop over length-sorted batches that keeps
  the last layer only (the control), besides the old sequential loop.
* ``fam bench search`` (:mod:`.search`): a float64 brute force (the exact answer) and raw
  float32 FAISS flat search.
* ``fam bench serve`` (:mod:`.serve`): the same server answering one request at a time,
  modes alternated over rounds.
* ``fam bench startup`` (:mod:`.startup`): fixed wall-clock targets, no reference.
"""

from __future__ import annotations

from pathlib import Path


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_cpu_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) so a measurement starts from now (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth between construction and :meth:`stop`, measured honestly.

    CUDA: ``max_memory_allocated`` growth. CPU: growth of the resident-set high-water mark
    (VmHWM after a reset through ``/proc/self/clear_refs``), falling back to ``ru_maxrss``
    growth (which only counts peaks above the process's earlier maximum). Run each
    configuration in a fresh process for comparable numbers.
    """

    def __init__(self, cuda: bool = False):
        import resource

        import torch
        self._resource, self._torch, self.cuda = resource, torch, cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            self.method, self.before = "cuda_max_memory_allocated", torch.cuda.memory_allocated()
        elif reset_cpu_peak() and status_kb("VmRSS") is not None:
            self.method, self.before = "cpu_rss_high_water_mark", status_kb("VmRSS") * 1024
        else:
            self.method = "cpu_ru_maxrss_growth"
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> tuple[int, str]:
        """(peak growth in bytes, method name)."""
        if self.cuda:
            now = self._torch.cuda.max_memory_allocated()
        elif self.method == "cpu_rss_high_water_mark":
            now = status_kb("VmHWM") * 1024
        else:
            now = self._resource.getrusage(self._resource.RUSAGE_SELF).ru_maxrss * 1024
        return now - self.before, self.method


def run_worker(module: str, spec: dict, what: str) -> dict:
    """``python -m <module> --_worker JSON(spec)`` in a fresh process that imports this
    checkout's fam, with ``spec["threads"]`` OpenMP threads; returns the JSON of its last
    stdout line. ``what`` names the measurement in the error when the worker fails."""
    import json
    import os
    import subprocess
    import sys

    src_root = str(Path(__file__).resolve().parents[2])  # .../src, so `fam` imports as here
    env = dict(os.environ)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", module, "--_worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker ({what}) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
