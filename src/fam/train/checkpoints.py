"""Resumable training checkpoints: written atomically and durably, read without unpickling.

A checkpoint is a folder ``<out>/checkpoints/step-N`` holding

- ``trainable.safetensors``: the full (unsharded) trainable tensors, all finite;
- ``optimizer.pt``: optimizer state, scheduler state and RNG states, made only of tensors,
  numbers, strings and containers, so it loads with ``torch.load(weights_only=True)`` —
  PyTorch's restricted unpickler, which refuses any other object (a crafted file cannot
  run code);
- ``state.json`` (written last): step, stage name, the stage's resolved config (input
  paths absolute) and the number of processes, compared on a rerun (:mod:`fam.train.rerun`).

The folder is written under a temporary name, every file and the folder are fsync'd, and it
is renamed into place (then the parent is fsync'd), so a crash or ``kill -9`` at any point
leaves either the old set of checkpoints or the new one, never a half-written folder that
looks complete. Reading validates everything before anything is applied; a checkpoint that
fails validation is reported with the offending file and the caller falls back to an older
one (:func:`newest_loadable`).
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fam.errors import FamError
from fam.utils.checkpoint import atomic_dir

log = logging.getLogger(__name__)

PARAMS_FILE = "trainable.safetensors"
EXTRA_FILE = "optimizer.pt"
STATE_FILE = "state.json"


class CheckpointError(FamError):
    """A checkpoint folder is unreadable, incomplete or does not fit this run."""


@dataclass
class Checkpoint:
    """A validated checkpoint, ready to apply.

    Attributes:
        path: the checkpoint folder.
        step: optimizer steps taken when it was written.
        params: full trainable tensors by parameter name.
        optimizer: the optimizer's state dict (full, unsharded).
        scheduler: the LR scheduler's state dict.
        rng: RNG states as plain tensors/numbers (see :func:`capture_rng`).
        meta: the rest of ``state.json`` (stage name, config).
    """

    path: Path
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    meta: dict[str, Any]


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and numbers (no pickled objects)."""
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = rng["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["gauss"]))
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


# ---------------------------------------------------------------------------- listing
def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that look complete (have ``state.json``), oldest first."""
    if not root.exists():
        return []
    dirs = [d for d in root.iterdir()
            if d.is_dir() and re.fullmatch(r"step-\d+", d.name) and (d / STATE_FILE).exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


# ---------------------------------------------------------------------------- write
def non_finite(params: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or inf."""
    return [n for n, t in params.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def write_checkpoint(path: Path, step: int, params: dict[str, torch.Tensor],
                     optimizer: dict[str, Any], scheduler: dict[str, Any],
                     meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically and durably.

    Raises:
        CheckpointError: a tensor is not finite (a diverged model is never saved).
    """
    from safetensors.torch import save_file

    bad = non_finite(params)
    if bad:
        raise CheckpointError(f"refusing to save step {step}: {len(bad)} of {len(params)} "
                              f"tensors are not finite (e.g. {bad[0]})")
    with atomic_dir(path) as tmp:
        save_file(params, str(tmp / PARAMS_FILE))
        torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": capture_rng()},
                   tmp / EXTRA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
    return path


# ---------------------------------------------------------------------------- read
def read_checkpoint(path: Path, expected: dict[str, torch.Size] | None = None) -> Checkpoint:
    """Read and validate a checkpoint folder without applying it.

    Args:
        path: the ``step-N`` folder.
        expected: parameter name -> shape the run needs (None: no check).

    Raises:
        CheckpointError: naming the file that is truncated, corrupt, unsafe (a pickle
            with arbitrary objects is refused by the restricted loader, never executed),
            incomplete, non-finite, or shaped for another model.
    """
    from safetensors.torch import load_file

    state_path = path / STATE_FILE
    try:
        meta = json.loads(state_path.read_text())
        step = int(meta.pop("step"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state_path}: unreadable ({e})") from None
    try:
        params = load_file(str(path / PARAMS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path / PARAMS_FILE}: unreadable ({e})") from None
    try:
        extra = torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
        opt, sched, rng = extra["optimizer"], extra["scheduler"], extra["rng"]
        rng["torch"], rng["python"]["state"], rng["numpy"]["keys"]  # noqa: B018 - presence
    except Exception as e:  # noqa: BLE001 - the restricted unpickler raises several types
        raise CheckpointError(f"{path / EXTRA_FILE}: unreadable or not a fam checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if expected is not None:
        missing = sorted(set(expected) - set(params))
        if missing:
            raise CheckpointError(f"{path / PARAMS_FILE}: does not match this model, missing "
                                  f"{missing[:3]} (was it written by another config?)")
        shaped = [n for n, s in expected.items() if params[n].shape != s]
        if shaped:
            n = shaped[0]
            raise CheckpointError(f"{path / PARAMS_FILE}: {n} has shape "
                                  f"{tuple(params[n].shape)}, this model needs {tuple(expected[n])}")
    bad = non_finite(params)
    if bad:
        raise CheckpointError(f"{path / PARAMS_FILE}: {len(bad)} tensors are not finite "
                              f"(e.g. {bad[0]})")
    return Checkpoint(path, step, params, opt, sched, rng, meta)


def newest_loadable(root: Path, expected: dict[str, torch.Size] | None = None,
                    read: Callable[..., Checkpoint] = read_checkpoint) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that validates, warning about each skipped one.

    Returns None when there is none at all.

    Raises:
        CheckpointError: checkpoints exist but none is usable (naming each and why), so a
            run never silently starts over on top of a folder whose work it cannot read.
    """
    found = list_checkpoints(root)
    problems = []
    for path in reversed(found):
        try:
            return read(path, expected)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            problems.append(str(e))
    if found:
        raise CheckpointError(
            f"no usable checkpoint in {root}: " + "; ".join(problems) +
            ". Remove the bad folders to resume from an older one, or set run.resume=false "
            "to start over")
    return None
