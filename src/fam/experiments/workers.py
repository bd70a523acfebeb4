"""Several processes sharing one experiment folder: file locks on its tasks, and spawned
workers (``fam ablate --workers N``).

A task (a stage-0 model, a MAC stage, a run) is taken by whoever holds its lock, so workers
of one call — or separate calls on the same folder — never train the same thing twice; the
OS releases a lock when its holder exits, however it exits, so a killed experiment leaves
nothing stale and re-running the same command resumes.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from fam.errors import FamError

__all__ = ["try_lock", "run_workers"]


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking ``flock`` on ``path``: yields whether it was taken.

    The OS releases it when the holder exits, however it exits, so a killed ablation leaves
    no stale lock behind.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_workers(n: int, target: Callable[..., Any], args: Sequence[Any],
                what: str = "experiment") -> None:
    """Run ``target(*args)`` in ``n`` spawned processes (fresh interpreters: no inherited
    torch state or threads) and wait for all of them.

    Raises:
        FamError: a worker failed (its traceback is in the log above); one line for the user.
    """
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, name=f"worker{i}", args=tuple(args)) for i in range(n)]
    for i, p in enumerate(procs):
        p.start()
        if i == 0:
            time.sleep(1.0)  # let the first worker take the first task
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise FamError(f"{what} worker(s) {failed} failed (see the log above); finished "
                       f"work is kept: re-run the same command to resume")
