"""``fam search``'s query worker answers as the in-process search does (same ids, scores,
bytes), refuses bad input with the same one line (exit 2), restarts when the index, model or
fam changed, exits when idle or told to, and the client side imports no heavy library.

The worker's request loop is tested in this process (a :class:`Worker` on a thread: no new
interpreter to pay for); one end-to-end test starts real worker processes through
``fam search``."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from fam.cli import main
from fam.config import SearchWorkerConfig
from fam.index import build_index
from fam.serve.search_client import (WorkerPaths, WorkerSpec, WorkerUnavailable, request,
                                     runtime_dir)
from fam.serve.search_worker import Worker, _lock

pytest.importorskip("faiss")

HEAVY = ("torch", "transformers", "numpy", "PIL", "safetensors", "faiss")


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_collection, tiny_dirs):
    items, root = small_collection
    out = tmp_path_factory.mktemp("widx") / "index"
    return build_index(out, items, model=tiny_dirs["qwen2_vl"], image_root=root,
                       query_prompt="Find: ", progress=False)


@pytest.fixture
def rt(monkeypatch):
    """A private worker folder (short: a socket path holds 107 bytes, pytest's tmp_path can
    be longer); one torch thread in workers too (this process uses one), so both paths sum
    in the same order."""
    d = Path(tempfile.mkdtemp(prefix="fam-rt-"))
    monkeypatch.setenv("FAM_RUNTIME_DIR", str(d))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield d
    for sock in d.glob("search-*.sock"):  # a test that failed half-way leaves no worker
        try:
            request(sock, {"op": "stop"}, timeout=10.0)
        except (OSError, WorkerUnavailable):
            pass
    shutil.rmtree(d, ignore_errors=True)


def _queries(root) -> list[list[str]]:
    img = str(root / "img" / "3.png")
    return [["--text", "a red circle", "-k", "5", "--json"],
            ["--image", img, "-k", "4", "--json"],
            ["--text", "a red circle", "--image", img, "-k", "3", "--json"],
            ["--image", img, "--query-prompt", "", "-k", "3", "--json"],
            ["--text", "a blue square", "-k", "13"]]  # the table, every item


def _in_process(capsys, built, q: list[str]) -> tuple[str, str]:
    assert main(["search", "--index", str(built), "--no-worker", *q]) == 0
    out, err = capsys.readouterr()
    return out, err


class _Running:
    """A :class:`Worker` loaded in this process, serving on a thread."""

    def __init__(self, built, idle_s: float = 60.0):
        self.spec = WorkerSpec.from_args(str(built), None, None)
        self.paths = WorkerPaths.of(self.spec)
        fd = _lock(self.paths.lock)
        assert fd is not None
        self.worker = Worker(self.spec, self.paths, SearchWorkerConfig(idle_s=idle_s), fd)
        self.worker.load()
        self.worker.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.serve()
        finally:
            self.worker.close()

    def ask(self, q: dict) -> dict:
        return request(self.paths.socket, {"op": "search", "query": q}, timeout=60.0)


def _query(text="", image=None, k=5, prompt=None, as_json=True, maps=None) -> dict:
    return {"text": text, "image": image, "k": k, "prompt": prompt, "as_json": as_json,
            "maps": maps}


def test_worker_answers_exactly_as_the_in_process_search(built, small_collection, rt, capsys):
    _, root = small_collection
    w = _Running(built)
    img = str(root / "img" / "3.png")
    cases = [(_queries(root)[0], _query("a red circle", None, 5)),
             (_queries(root)[1], _query("", img, 4)),
             (_queries(root)[2], _query("a red circle", img, 3)),
             (_queries(root)[3], _query("", img, 3, prompt="")),
             (_queries(root)[4], _query("a blue square", None, 13, as_json=False))]
    for argv, q in cases:
        out, err = _in_process(capsys, built, argv)
        reply = w.ask(q)
        assert reply["stdout"] == out  # same ids, same scores (printed as repr), same order
        assert err.endswith(reply["stderr"] + "\n")  # (after the progress bars of a load)
    hits = [json.loads(line) for line in w.ask(_query("", img, 4))["stdout"].splitlines()]
    assert hits[0]["id"] == "scene-3" and len(hits) == 4
    ping = request(w.paths.socket, {"op": "ping"}, timeout=10)
    assert ping["requests"] == 6 and ping["index"] == os.path.realpath(built)
    assert request(w.paths.socket, {"op": "stop"}, timeout=10)["stopped"] == os.getpid()
    w.thread.join(10)
    assert not w.thread.is_alive() and not w.paths.socket.exists()


def test_bad_input_is_the_same_one_line_over_either_path(built, small_collection, rt,
                                                         tmp_path, capsys, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["search", "--index", str(built), "--no-worker", "--image", str(bad)]) == 2
    line = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(line) == 1 and str(bad) in line[0]
    caplog.clear()
    assert main(["search", "--index", str(built), "--no-worker", "--text", "red", "--maps",
                 str(tmp_path / "m")]) == 2
    maps_line = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(maps_line) == 1 and "--multivector" in maps_line[0]
    w = _Running(built)
    assert w.ask(_query("", str(bad))) == {"error": line[0]}
    assert w.ask(_query("red", maps=str(tmp_path / "m"))) == {"error": maps_line[0]}
    assert "stdout" in w.ask(_query("a red circle"))  # it keeps serving
    request(w.paths.socket, {"op": "stop"}, timeout=10)
    w.thread.join(10)


def test_worker_says_stale_when_the_index_changed_and_exits_when_idle(built, rt):
    w = _Running(built, idle_s=30.0)
    assert "stdout" in w.ask(_query("a red circle"))
    items = built / "items.jsonl"
    st = items.stat()
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert w.ask(_query("a red circle")) == {"stale": True}
    w.thread.join(10)
    assert not w.thread.is_alive() and not w.paths.socket.exists()
    idle = _Running(built, idle_s=0.5)  # a fresh one, on the changed index
    assert "stdout" in idle.ask(_query("a red circle"))
    idle.thread.join(20)  # exits on its own half a second after the last request
    assert not idle.thread.is_alive() and not idle.paths.socket.exists()
    assert _lock(idle.paths.lock) is not None  # and gave its lock back


def test_an_unusable_worker_folder_falls_back_to_the_in_process_search(
        built, small_collection, tmp_path, monkeypatch, capsys, caplog):
    _, root = small_collection
    q = _queries(root)[1]
    want = _in_process(capsys, built, q)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others could plant a socket there: not used
    monkeypatch.setenv("FAM_RUNTIME_DIR", str(shared))
    with pytest.raises(WorkerUnavailable, match="not a folder private to this user"):
        runtime_dir()
    assert main(["search", "--index", str(built), "--worker", *q]) == 0
    out, err = capsys.readouterr()
    assert out == want[0] and want[1] in err
    assert any("searching in this process" in r.getMessage() for r in caplog.records)
    assert list(shared.iterdir()) == []


def test_worker_is_used_only_when_asked_or_torch_is_not_loaded(built, rt, capsys):
    # This process has torch: the default searches here (nothing to save); so does
    # FAM_SEARCH_WORKER=0 in a fresh `fam search`. No worker starts either way.
    assert main(["search", "--index", str(built), "--text", "a red circle"]) == 0
    assert list(rt.iterdir()) == []
    assert main(["search", "--index", str(built), "--stop-worker"]) == 0
    assert "no query worker" in capsys.readouterr().out


def _fam(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fam", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _heavy_after_search(argv: list[str], env: dict) -> set[str]:
    probe = ("import sys, json\nfrom fam.cli import main\n"
             f"assert main({argv!r}) == 0\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, check=True, timeout=600).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_fam_search_starts_reuses_restarts_and_stops_a_worker_process(
        built, small_collection, tiny_dirs, rt, capsys):
    _, root = small_collection
    env = {**os.environ}
    q = _queries(root)[0]
    want_out, want_err = _in_process(capsys, built, q)
    first = _fam("search", "--index", str(built), *q, env=env)
    assert (first.returncode, first.stdout) == (0, want_out) and want_err in first.stderr
    assert "started a query worker" in first.stderr  # says so, once
    spec = WorkerSpec.from_args(str(built), None, None)
    paths = WorkerPaths.of(spec)
    pid = request(paths.socket, {"op": "ping"}, timeout=10)["pid"]
    # A warm search: the client imports none of the heavy libraries.
    argv = ["search", "--index", str(built), *q]
    assert _heavy_after_search(argv, env) == set()
    warm = _fam("search", "--index", str(built), *q, env=env)
    assert warm.stdout == want_out and "started a query worker" not in warm.stderr
    assert request(paths.socket, {"op": "ping"}, timeout=10)["requests"] == 3
    # The index changed: the next search gets a fresh worker, and the same answer.
    items = built / "items.jsonl"
    st = items.stat()
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = _fam("search", "--index", str(built), *q, env=env)
    assert (again.returncode, again.stdout) == (0, want_out)
    new = request(paths.socket, {"op": "ping"}, timeout=10)["pid"]
    assert new != pid
    stop = _fam("search", "--index", str(built), "--stop-worker", env=env)
    assert stop.returncode == 0 and f"pid {new}" in stop.stdout
    assert not paths.socket.exists()
    # A model the index was not built with: the worker refuses it with the in-process line.
    other = ["search", "--index", str(built), "--model", str(tiny_dirs["llava"]), "--text", "x"]
    cold = _fam(*other, "--no-worker", env=env)
    warm = _fam(*other, env=env)
    assert cold.returncode == warm.returncode == 2
    last = lambda p: p.stderr.strip().splitlines()[-1].split(" ", 1)[1]  # noqa: E731
    assert last(warm) == last(cold) and "search with the model that built it" in last(cold)
    assert len(warm.stderr.strip().splitlines()) == 1


def test_the_worker_is_the_default_of_a_fresh_command_only(monkeypatch):
    from argparse import Namespace

    from fam.cli.deploy import _use_worker
    ns = lambda **kw: Namespace(**{"worker": None, "debug": False, **kw})  # noqa: E731
    monkeypatch.delenv("FAM_SEARCH_WORKER", raising=False)
    assert _use_worker(ns()) is False  # this process has torch: nothing to save
    assert _use_worker(ns(worker=True)) is True
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `fam search`
    assert _use_worker(ns()) is True
    assert _use_worker(ns(worker=False)) is False
    assert _use_worker(ns(debug=True)) is False  # a traceback needs this process
    assert _use_worker(ns(worker=True, debug=True)) is False
    monkeypatch.setenv("FAM_SEARCH_WORKER", "0")
    assert _use_worker(ns()) is False
    assert _use_worker(ns(worker=True)) is True  # the option wins over the environment


def test_worker_serves_a_multivector_index_and_its_maps_as_in_process(
        tmp_path, tiny_dirs, maps_collection, rt, capsys):
    from fam.config import MultiVectorIndexConfig
    items, root = maps_collection
    idx = build_index(tmp_path / "mv", items, model=tiny_dirs["qwen2_vl"], image_root=root,
                      progress=False, multivector=MultiVectorIndexConfig(),
                      query_prompt="Find: ")
    img = str(sorted((root).rglob("*.png"))[0])
    here, there = tmp_path / "maps-here", tmp_path / "maps-there"
    out, err = _in_process(capsys, idx, ["--image", img, "-k", "3", "--json", "--maps",
                                         str(here)])
    w = _Running(idx)
    reply = w.ask(_query("", img, 3, maps=str(there)))
    assert reply["stdout"] == out  # the same MaxSim hits and scores
    assert err.endswith(reply["stderr"].replace(str(there), str(here)) + "\n")
    assert sorted(p.name for p in there.iterdir()) == sorted(p.name for p in here.iterdir())
    assert json.loads((there / "maps.json").read_text()) == \
        json.loads((here / "maps.json").read_text())
    request(w.paths.socket, {"op": "stop"}, timeout=10)
    w.thread.join(10)
