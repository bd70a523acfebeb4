"""What a benchmark needs to know about its device: versions, bf16 peak, FLOP counting, timing.

**bf16 dense peaks** (:data:`BF16_PEAK_TFLOPS`): the vendor's dense (no 2:4 sparsity) BF16
tensor-core throughput, from NVIDIA's datasheets, where the headline figure is the sparse
one and the dense one is half of it (H100 SXM: "1,979 teraFLOPS*" BF16 with sparsity →
989.4 dense; the same on H200 and GH200, which use the H100's GH100 silicon). A device not
in the table gets no MFU (the report says so) rather than a guessed one.

**FLOPs** are counted, not estimated: :func:`count_flops` runs a callable under
``torch.utils.flop_counter.FlopCounterMode``, which adds ``2·m·n·k`` for every matrix
multiply, convolution and attention kernel (``scaled_dot_product_attention`` forward and
backward) that actually executes — padding tokens, GradCache's extra forward, the input
gradients through frozen weights and the LoRA/VEIN weight gradients included;
element-wise work (norms, activations, softmax) is not counted.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["BF16_PEAK_TFLOPS", "bf16_peak", "environment", "count_flops", "sync", "Stopwatch"]

_H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (BF16 with sparsity ÷ 2)"
_H200_SHEET = "NVIDIA H200 Tensor Core GPU datasheet (BF16 with sparsity ÷ 2)"
_A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOPS dense)"
_L40S_SHEET = "NVIDIA L40S datasheet (BF16 362.05 TFLOPS dense)"
#: (pattern on ``torch.cuda.get_device_name()``, label, dense BF16 TFLOPS, source); the
#: first match wins, so specific variants come before the family name.
BF16_PEAK_TFLOPS: tuple[tuple[str, str, float, str], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0, _H100_SHEET),
    (r"H100.*NVL", "H100 NVL", 835.0, _H100_SHEET),
    (r"H200.*NVL", "H200 NVL", 835.0, _H200_SHEET),
    (r"GH200", "GH200", 989.4, _H100_SHEET),
    (r"H100", "H100 SXM", 989.4, _H100_SHEET),
    (r"H200", "H200 SXM", 989.4, _H200_SHEET),
    (r"A100", "A100", 312.0, _A100_SHEET),
    (r"L40S", "L40S", 362.05, _L40S_SHEET),
    (r"\bL4\b", "L4", 121.0, "NVIDIA L4 datasheet (BF16 with sparsity 242 ÷ 2)"),
    (r"\bA10\b", "A10", 125.0, "NVIDIA A10 datasheet (BF16 with sparsity 250 ÷ 2)"),
)


def bf16_peak(device_name: str) -> dict[str, Any] | None:
    """The dense bf16 peak of a device name, or None when the device is not in the table."""
    for pattern, label, tflops, source in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return {"label": label, "tflops": tflops, "source": source}
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, bf16 support, attention kernels and the bf16 peak of this process."""
    cuda = device.type == "cuda"
    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "peft": _version("peft"), "fam": _version("fam"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        env.update({
            "device_name": name, "compute_capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "bf16": "native" if torch.cuda.is_bf16_supported() else "unsupported",
            "sdpa_backends": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                              "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                              "math": torch.backends.cuda.math_sdp_enabled(),
                              "cudnn": torch.backends.cuda.cudnn_sdp_enabled()},
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        })
    else:
        cap = torch.backends.cpu.get_cpu_capability()
        native = cap in ("AVX512_BF16", "AMX") or "amx" in cap.lower()
        env.update({
            "device_name": _cpu_name(), "cpu_capability": cap,
            "bf16": "native" if native else
            f"emulated ({cap}: no bf16 instructions; PyTorch computes bf16 GEMMs correctly "
            "but slowly)",
        })
    env["attention"] = ["sdpa"] + (["flash_attention_2"] if cuda and env["flash_attn"] else [])
    env["bf16_peak"] = bf16_peak(env["device_name"]) if cuda else None
    if env["bf16_peak"] is None:
        env["bf16_peak_note"] = (f"no dense bf16 peak known for {env['device_name']!r}: "
                                 "MFU omitted (fam.bench.device.BF16_PEAK_TFLOPS)")
    return env


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul/conv/attention kernels ``fn()`` executes (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch(contextlib.AbstractContextManager):
    """``with Stopwatch(device) as w: ...`` → ``w.seconds``, device work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
