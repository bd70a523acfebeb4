"""``fam search``'s query worker: one index and its model kept loaded in a background process.

Started by :func:`fam.serve.search_client.search` as
``python -m fam.serve.search_worker SPEC FOLDER CONFIG`` (JSON arguments); see that module
for the design. The worker

* takes its key's lock (one worker per key; a second says ``{"busy": true}`` and exits);
* loads the index and the model exactly as ``fam search`` does in-process
  (:meth:`fam.index.Index.load`, :func:`fam.index.load_query_model`); a refused index or
  model is one line (``{"error": ...}``, exit 2), as the in-process search prints it;
* listens on its Unix socket (bound under a temporary name, then renamed into place, so a
  client never reaches a half-loaded worker) and says ``{"ready": pid}`` on stdout;
* answers requests one at a time: ``search`` (:func:`fam.index.run_query`, the in-process
  search's own code), ``ping`` and ``stop``;
* before each search compares the fingerprint of the index, model and fam source files
  with the one taken before loading: on a change it answers ``{"stale": true}`` and exits;
* exits after ``idle_s`` without a request, or on SIGTERM, removing its socket.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fam.config import SearchWorkerConfig
from fam.errors import user_error
from fam.serve.search_client import WorkerPaths, WorkerSpec, fingerprint, recv_all

log = logging.getLogger("fam.search_worker")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _say(msg: dict[str, Any]) -> None:
    """One line to the starting client (stdout is a pipe to it until ready)."""
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _lock(path: Path, wait_s: float = 1.0) -> int | None:
    """The key's lock (an fd), waiting ``wait_s`` for a stopping worker; None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


class _Notes(logging.Handler):
    """Warnings logged while loading, for the client to print (it would have seen them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Worker:
    """A loaded index and model answering on a Unix socket."""

    def __init__(self, spec: WorkerSpec, paths: WorkerPaths, cfg: SearchWorkerConfig,
                 lock_fd: int):
        self.spec, self.paths, self.cfg, self.lock_fd = spec, paths, cfg, lock_fd
        self.index = self.model = None
        self.model_path: str | None = spec.model
        self.fingerprint = ""
        self.sock: socket.socket | None = None
        self.inode: int | None = None
        self.started = time.time()
        self.requests = 0

    def _recorded_model(self) -> str | None:
        try:
            obj = json.loads((Path(self.spec.index) / "manifest.json").read_text("utf-8"))
            return obj.get("model_path") if isinstance(obj, dict) else None
        except (OSError, ValueError):
            return None  # Index.load says what is wrong

    def load(self) -> None:
        """Load the index and the model (fam search's calls); fingerprint them first."""
        if self.model_path is None:
            self.model_path = self._recorded_model()
        self.fingerprint = fingerprint(self.spec, self.model_path)
        from fam.index import Index, load_query_model
        self.index = Index.load(self.spec.index, image_root=self.spec.image_root)
        self.model = load_query_model(self.index, self.spec.model)

    def listen(self) -> None:
        """Bind the socket under a temporary name and rename it into place."""
        tmp = self.paths.socket.with_name(f"{self.paths.socket.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        self.sock.listen(16)
        os.replace(tmp, self.paths.socket)
        self.inode = os.stat(self.paths.socket).st_ino

    def serve(self) -> None:
        """Answer until idle, stopped, stale or terminated."""
        assert self.sock is not None
        self.sock.settimeout(self.cfg.idle_s)
        while True:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                log.info("idle for %g s: exiting", self.cfg.idle_s)
                return
            with conn:
                conn.settimeout(60.0)
                try:
                    req = json.loads(recv_all(conn).decode("utf-8"))
                    reply, go_on = self.answer(req)
                except Exception as e:  # noqa: BLE001 - a bad request must not kill it
                    log.exception("request failed")
                    reply, go_on = {"internal": f"{type(e).__name__}: {e}"}, True
                try:
                    conn.sendall(json.dumps(reply).encode("utf-8"))
                except OSError:
                    pass  # the client went away
            if not go_on:
                return

    def answer(self, req: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The reply to one request, and whether to keep serving."""
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "index": self.spec.index, "model": self.model_path,
                    "image_root": self.spec.image_root, "started": self.started,
                    "requests": self.requests}, True
        if op == "stop":
            self.close()
            return {"stopped": os.getpid()}, False
        if op != "search":
            return {"internal": f"unknown request {op!r}"}, True
        if fingerprint(self.spec, self.model_path) != self.fingerprint:
            log.info("the index, the model or fam changed since loading: exiting")
            self.close()
            return {"stale": True}, False
        from fam.index import SearchQuery, run_query
        self.requests += 1
        try:
            note, out = run_query(self.index, self.model, SearchQuery(**req["query"]),
                                  self.spec.model)
        except Exception as e:  # noqa: BLE001 - reported to the client as fam search would
            msg = user_error(e)
            if msg is None:
                log.exception("search failed")
                return {"internal": f"{type(e).__name__}: {e}"}, True
            return {"error": msg}, True
        return {"stderr": note, "stdout": out, "pid": os.getpid()}, True

    def close(self) -> None:
        """Remove the socket (if it is still this worker's) and release the lock."""
        if self.inode is not None:
            try:
                if os.stat(self.paths.socket).st_ino == self.inode:
                    self.paths.socket.unlink()
            except OSError:
                pass
            self.inode = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    spec = WorkerSpec(**json.loads(argv[0]))
    cfg = SearchWorkerConfig(**json.loads(argv[2]))
    cfg.validate()
    paths = WorkerPaths.of(spec, Path(argv[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format=f"[%(process)d] {_FORMAT}",
                        datefmt="%H:%M:%S")
    lock_fd = _lock(paths.lock)
    if lock_fd is None:
        _say({"busy": True})
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    worker = Worker(spec, paths, cfg, lock_fd)
    notes = _Notes()
    logging.getLogger().addHandler(notes)
    try:
        worker.load()
    except Exception as e:  # noqa: BLE001 - the client prints the one line (exit 2)
        msg = user_error(e)
        if msg is None:
            log.exception("loading failed")
            _say({"internal": f"{type(e).__name__}: {e}"})
            return 1
        log.error("%s", msg)
        _say({"error": msg})
        return 2
    finally:
        logging.getLogger().removeHandler(notes)
    try:
        worker.listen()
        log.info("serving %s (model %s) on %s", spec.index, worker.model_path, paths.socket)
        _say({"ready": os.getpid(), "notes": notes.lines})
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the client stops reading: nothing more goes to its pipe
        os.close(devnull)
        worker.serve()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
