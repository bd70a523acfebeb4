"""Benchmarks that back the efficiency claims of the library (run with ``python -m``)."""

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
