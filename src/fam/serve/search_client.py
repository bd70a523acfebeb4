"""The client side of ``fam search``'s query worker: the standard library only.

A cold ``fam search`` spends seconds importing torch and transformers and loading the
model before a query that takes milliseconds. The query worker
(:mod:`fam.serve.search_worker`) is a background process that keeps one index and its
model loaded; ``fam search`` starts it on first use and then only sends it the query over
a Unix socket. This module is what ``fam search`` runs: it imports no torch,
transformers or numpy, so a search answered by a running worker costs an interpreter
start and a round trip.

One worker per (index folder, model, image root, fam installation): its socket, lock and
log live in a private folder of this user (``$FAM_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/fam``, else ``/tmp/fam-<uid>``; mode 0700). The worker answers queries
one at a time; it exits after ``idle_s`` without a request, on a stop request
(``fam search --index IDX --stop-worker``), on SIGTERM, and when a file of the index, of
the model or of fam's own code changed since it loaded them (it answers "stale" and the
client starts a fresh worker). Whenever the worker cannot be used, :class:`WorkerUnavailable`
says why and ``fam search`` searches in its own process.

Protocol: one JSON object per connection each way (the request, then the reply), UTF-8.
"""
from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fam.config import SearchWorkerConfig
from fam.errors import FamError

__all__ = ["WorkerSpec", "WorkerUnavailable", "WorkerPaths", "runtime_dir", "search",
           "request", "recv_all", "stop_workers", "fingerprint", "PROTOCOL"]

#: Version of the request/reply format (part of the worker key: an old worker is not reused).
PROTOCOL = 1
#: The longest reply read (hits with their metadata).
MAX_MESSAGE = 64 * 1024 * 1024
#: Libraries whose upgrade makes a running worker stale (fam.serve.search_client.fingerprint).
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "faiss", "PIL", "numpy")
#: A worker log is started afresh past this size.
MAX_LOG_BYTES = 1024 * 1024


class WorkerUnavailable(Exception):
    """The query worker cannot be used (the reason is the message); search in-process."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads: absolute paths (None: the index's recorded model / image root)."""

    index: str
    model: str | None = None
    image_root: str | None = None

    @classmethod
    def from_args(cls, index: str, model: str | None, image_root: str | None) -> "WorkerSpec":
        real = lambda p: os.path.realpath(p) if p is not None else None  # noqa: E731
        # A model that is not a folder is a hub id: kept as given.
        m = real(model) if model is not None and os.path.isdir(model) else model
        return cls(os.path.realpath(index), m, real(image_root))

    def key(self) -> str:
        """The worker's name: the spec, the protocol and this fam installation."""
        import fam
        ident = [PROTOCOL, asdict(self), sys.executable, os.path.dirname(fam.__file__),
                 fam.__version__]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WorkerPaths:
    """A worker's socket, lock and log files."""

    socket: Path
    lock: Path
    log: Path

    @classmethod
    def of(cls, spec: WorkerSpec, folder: Path | None = None) -> "WorkerPaths":
        d = folder if folder is not None else runtime_dir()
        key = spec.key()
        return cls(d / f"search-{key}.sock", d / f"search-{key}.lock", d / f"search-{key}.log")


def runtime_dir() -> Path:
    """This user's private folder for worker sockets (created with mode 0700).

    Raises:
        WorkerUnavailable: the folder cannot be made, or another user could reach it.
    """
    if not hasattr(socket, "AF_UNIX"):
        raise WorkerUnavailable("this platform has no Unix sockets")
    if os.environ.get("FAM_RUNTIME_DIR"):
        d = Path(os.environ["FAM_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "fam"
    else:
        d = Path(tempfile.gettempdir()) / f"fam-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise WorkerUnavailable(f"cannot make the worker folder {d} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerUnavailable(f"{d} is not a folder private to this user (mode "
                                f"{stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}); set "
                                "FAM_RUNTIME_DIR to one")
    if len(os.fsencode(d)) > 64:  # a socket path holds 107 bytes: FOLDER/search-KEY.sock.PID
        raise WorkerUnavailable(f"the worker folder {d} has too long a path for a socket; "
                                "set FAM_RUNTIME_DIR to a shorter one")
    return d


def fingerprint(spec: WorkerSpec, model_path: str | None) -> str:
    """A digest of what a worker's answers depend on: the names, sizes, modification times
    and inodes of the index folder's files, the model folder's files, fam's source files and
    the entry files of the libraries a search runs on. A rebuilt index, a retrained model, an
    edited fam or an upgraded library changes it."""
    import importlib.util

    import fam
    entries: list[Any] = []
    for lib in LIBRARIES:  # located, not imported
        found = importlib.util.find_spec(lib)
        if found is not None and found.origin and os.path.isfile(found.origin):
            s = os.stat(found.origin)
            entries.append([lib, found.origin, s.st_size, s.st_mtime_ns, s.st_ino])
    for folder in (spec.index, model_path):
        if folder is None or not os.path.isdir(folder):
            entries.append(folder)
            continue
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_file():
                    s = e.stat()
                    entries.append([folder, e.name, s.st_size, s.st_mtime_ns, s.st_ino])
    root = os.path.dirname(fam.__file__)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                s = os.stat(os.path.join(dirpath, name))
                entries.append([os.path.relpath(dirpath, root), name, s.st_size, s.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def recv_all(conn: socket.socket) -> bytes:
    """Everything the peer sends until it shuts its side (at most :data:`MAX_MESSAGE`)."""
    chunks, size = [], 0
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise WorkerUnavailable(f"a message over {MAX_MESSAGE} bytes")
    return b"".join(chunks)


def request(path: Path, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the worker at ``path``; its reply.

    Raises:
        FileNotFoundError, ConnectionRefusedError: no worker listens there.
        WorkerUnavailable: the worker did not answer in time or answered nonsense.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise
        except OSError as e:
            raise WorkerUnavailable(f"cannot reach the worker at {path} ({e})") from None
        try:
            s.sendall(json.dumps(message).encode("utf-8"))
            s.shutdown(socket.SHUT_WR)
            data = recv_all(s)
        except (socket.timeout, OSError) as e:
            raise WorkerUnavailable(f"no answer from the worker ({type(e).__name__})") from None
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WorkerUnavailable("the worker's reply is not JSON (it may have died)") from None
    if not isinstance(reply, dict):
        raise WorkerUnavailable("the worker's reply is not a JSON object")
    return reply


def _start(spec: WorkerSpec, paths: WorkerPaths, cfg: SearchWorkerConfig) -> None:
    """Start a worker and wait until it listens (or another starting one does).

    Raises:
        FamError: the worker refused the index or model (the one-line reason, as
            ``fam search`` in-process would give it).
        WorkerUnavailable: it could not start.
    """
    try:
        if paths.log.is_file() and paths.log.stat().st_size > MAX_LOG_BYTES:
            paths.log.unlink()
        log = os.fdopen(os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    except OSError as e:
        raise WorkerUnavailable(f"cannot write the worker log {paths.log} ({e.strerror})") from None
    cmd = [sys.executable, "-m", "fam.serve.search_worker", json.dumps(asdict(spec)),
           str(paths.socket.parent), json.dumps(asdict(cfg))]
    with log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=log, start_new_session=True, close_fds=True)
        except OSError as e:
            raise WorkerUnavailable(f"cannot start the worker ({e.strerror})") from None
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout=cfg.start_timeout_s):
            line = proc.stdout.readline()
    proc.stdout.close()
    try:
        msg = json.loads(line.decode("utf-8")) if line else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        msg = {}
    if "ready" in msg:
        for note in msg.get("notes") or []:  # what loading logged, as in-process
            print(note, file=sys.stderr)
        return
    if "error" in msg:
        proc.wait()
        raise FamError(str(msg["error"]))
    if msg.get("busy"):  # another worker of this key is loading: wait for its socket
        proc.wait()
        deadline = time.monotonic() + cfg.start_timeout_s
        while time.monotonic() < deadline:
            try:
                request(paths.socket, {"op": "ping"}, timeout=10.0)
                return
            except (FileNotFoundError, ConnectionRefusedError, WorkerUnavailable):
                time.sleep(0.05)
        raise WorkerUnavailable("another worker of this index did not start in time")
    if proc.poll() is None:
        raise WorkerUnavailable(f"the worker did not start within {cfg.start_timeout_s:g} s "
                                f"(see {paths.log})")
    raise WorkerUnavailable(f"the worker exited with code {proc.wait()} before answering "
                            f"(see {paths.log})")


def search(spec: WorkerSpec, query: dict[str, Any],
           cfg: SearchWorkerConfig | None = None) -> dict[str, Any]:
    """Answer ``query`` with the worker of ``spec``, starting one when none runs.

    Args:
        spec: what the worker loads.
        query: the fields of :class:`fam.index.SearchQuery` (``image`` an absolute path).
        cfg: idle time and time limits.

    Returns:
        ``{"stderr": line, "stdout": text, "pid": worker, "started": bool}``: what
        ``fam search`` prints, the worker's pid, whether this call started it.

    Raises:
        FamError: the index, model or query was refused (one line, as in-process).
        WorkerUnavailable: no worker could answer; search in-process instead.
    """
    cfg = cfg or SearchWorkerConfig()
    paths = WorkerPaths.of(spec)
    started = False
    for _ in range(3):  # a stale worker is replaced once; a third failure gives up
        try:
            reply = request(paths.socket, {"op": "search", "query": query},
                            cfg.request_timeout_s)
        except (FileNotFoundError, ConnectionRefusedError):
            _start(spec, paths, cfg)
            started = True
            continue
        if reply.get("stale"):
            continue
        if "error" in reply:
            raise FamError(str(reply["error"]))
        if "stdout" in reply and "stderr" in reply:
            return {**reply, "started": started}
        raise WorkerUnavailable(str(reply.get("internal") or "the worker's reply has no hits"))
    raise WorkerUnavailable("the worker kept restarting")


def stop_workers(index: str) -> list[int]:
    """Stop every worker serving the index folder ``index``; their process ids."""
    want = os.path.realpath(index)
    stopped = []
    for sock in sorted(runtime_dir().glob("search-*.sock")):
        try:
            info = request(sock, {"op": "ping"}, timeout=10.0)
            if info.get("index") == want:
                stopped.append(int(request(sock, {"op": "stop"}, timeout=10.0)["stopped"]))
        except (OSError, WorkerUnavailable, KeyError, TypeError, ValueError):
            continue  # a dead worker's socket, or one that stopped meanwhile
    return stopped
