"""Benchmark: a bounded load test of ``fam serve`` on 127.0.0.1, dynamic batching vs none.

Run ``fam bench serve [--model DIR] [--clients 32] [--requests 384] [--inputs mixed]
[--repeats 2]``.

The same model is served by a real ``fam serve`` process on a free loopback port: with
dynamic batching (``--max-batch 32``) and serving one request at a time (``--max-batch 1``),
the reference: the same server, model and clients without batching, which is what serving
an embedding model per request (one forward per request) gives a user. The modes alternate
over ``--repeats`` rounds in ABBA order (batched first in even rounds, one-at-a-time first in
odd ones), so drift in the machine's load hits both alike; the report gives each round's
ratio, their median and spread (min–max).
Each time, ``--clients`` concurrent clients (httpx, asyncio) send ``--requests``
``POST /v1/embeddings`` requests in all (one input each: a caption, or a Scenes-like image with
the image instruction as a data URI, or alternately both), after a warm-up. The test is bounded
in count and in time (``--timeout``) and stops by itself; the server is then stopped with
SIGTERM and must exit cleanly (graceful shutdown). Reported per mode: errors, throughput
(requests/s), latency p50/p99, the server's mean batch size; and the throughput ratio.
``fam bench serve`` exits 1 on any error, an unclean shutdown, or a median ratio below
``--min-speedup``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["run_load", "run_bench", "check", "format_report", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; the server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_payloads(kind: str, n: int = 16) -> list[dict]:
    """Request bodies: captions, images (data URIs of drawn scenes), or alternately both."""
    from PIL import Image, ImageDraw

    colours = ["red", "blue", "green", "yellow", "orange", "purple", "cyan", "white"]
    shapes = ["circle", "square", "triangle", "star"]
    out = []
    for i in range(n):
        c, s = colours[i % len(colours)], shapes[i % len(shapes)]
        caption = f"a large {c} {s} left of a small {colours[(i + 3) % 8]} circle"
        if kind == "text" or (kind == "mixed" and i % 2 == 0):
            out.append({"input": caption})
            continue
        im = Image.new("RGB", (112, 112), (20, 20, 20))
        d = ImageDraw.Draw(im)
        d.ellipse([10 + i, 20, 50 + i, 60], fill=c)
        d.rectangle([60, 60 - i, 95, 95 - i], fill=colours[(i + 3) % 8])
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append({"input": {"text": "<|image_1|>\nRepresent the given image.", "image": uri}})
    return out


async def _load(url: str, payloads: list[dict], clients: int, requests: int, timeout: float,
                headers: dict) -> dict:
    # aiohttp (C-accelerated HTTP parsing) as the load generator: a client that spends more CPU
    # per request than the server (httpx's pure-Python stack does, about 5x here) would measure
    # itself, not the server, on a machine with two cores.
    import aiohttp

    bodies = [json.dumps(p).encode() for p in payloads]
    hdrs = {"Content-Type": "application/json", **headers}
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    deadline = time.monotonic() + timeout
    conn = aiohttp.TCPConnector(limit=clients)
    tmo = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=conn, timeout=tmo, headers=hdrs) as c:
        for b in bodies[:4]:  # warm-up (first forwards allocate)
            async with c.post("/v1/embeddings", data=b) as r:
                await r.read()

        async def client():
            for i in counter:
                if time.monotonic() > deadline:
                    errors.append("timeout: the load test ran past --timeout")
                    return
                t0 = time.perf_counter()
                try:
                    async with c.post("/v1/embeddings", data=bodies[i % len(bodies)]) as r:
                        body = await r.read()
                        if r.status != 200 or len(json.loads(body)["data"]) != 1:
                            errors.append(f"HTTP {r.status}: {body[:200]!r}")
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        async with c.get("/health") as r:
            health = json.loads(await r.read())
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))] \
            if latencies else float("nan")

    b = health["batching"]
    return {"requests": requests, "ok": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": wall, "throughput_rps": len(latencies) / wall,
            "p50_ms": pct(50) * 1e3, "p99_ms": pct(99) * 1e3,
            "mean_batch": b["inputs"] / max(b["batches"], 1), "largest_batch": b["largest_batch"]}


def run_load(model: Path, max_batch: int, clients: int, requests: int, inputs: str,
             timeout: float = 300.0, threads: int | None = None, api_key: str | None = None,
             ) -> dict:
    """Start ``fam serve`` on a free loopback port, load it, stop it; the figures."""
    import httpx
    logging.getLogger("httpx").setLevel(logging.WARNING)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fam", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    if api_key:
        env["FAM_API_KEY"] = api_key
    import tempfile
    logf = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"fam serve exited with {proc.returncode}:\n"
                                   f"{logf.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 180:
                raise RuntimeError("fam serve did not answer /health within 180 s")
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        res = asyncio.run(_load(url, sample_payloads(inputs), clients, requests, timeout,
                                headers))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    logf.seek(0)
    out = logf.read()
    logf.close()
    res["server_exit_code"] = proc.returncode
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete, so the exit status
    # is -SIGTERM either way; the server's own log says whether shutdown was graceful.
    res["graceful_shutdown"] = ("Application shutdown complete" in out
                                and "model worker stopped" in out)
    res["max_batch"] = max_batch
    return res


def run_bench(model: Path | None, work: Path, clients: int = 32, requests: int = 384,
              inputs: str = "mixed", max_batch: int = 32, timeout: float = 300.0,
              threads: int | None = None, repeats: int = 2) -> dict:
    """Both modes on the same model, alternated over ``repeats`` rounds (ABBA order).

    Returns:
        ``{model, clients, inputs, repeats, rounds: [{batched, one_at_a_time, speedup}],
        batched, one_at_a_time (the round with the median ratio), speedup (median of the
        rounds' ratios), speedup_min, speedup_max}``.
    """
    import statistics
    if model is None:
        model = work / "model"
        if not (model / "config.json").is_file():
            from fam.backbones import build_tiny
            build_tiny("qwen2_vl", model, size="s", seed=0)
    rounds = []
    for r in range(repeats):
        order = (max_batch, 1) if r % 2 == 0 else (1, max_batch)
        got = {mb: run_load(model, mb, clients, requests, inputs, timeout, threads)
               for mb in order}
        b, s = got[max_batch], got[1]
        rounds.append({"batched": b, "one_at_a_time": s,
                       "speedup": b["throughput_rps"] / max(s["throughput_rps"], 1e-9)})
    ratios = [x["speedup"] for x in rounds]
    mid = sorted(range(len(rounds)), key=lambda i: ratios[i])[(len(rounds) - 1) // 2]
    return {"model": str(model), "clients": clients, "inputs": inputs, "repeats": repeats,
            "rounds": rounds, "batched": rounds[mid]["batched"],
            "one_at_a_time": rounds[mid]["one_at_a_time"],
            "speedup": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios)}


def check(r: dict, min_speedup: float = 1.0) -> list[str]:
    """What failed: errors or an unclean shutdown in any run, or a median ratio below
    ``min_speedup``."""
    problems = []
    for i, rd in enumerate(r.get("rounds") or [r]):
        for mode in ("batched", "one_at_a_time"):
            m = rd[mode]
            if m["errors"] or not m["graceful_shutdown"]:
                problems.append(f"round {i + 1}, {mode}: {m['errors']} error(s), graceful "
                                f"shutdown {m['graceful_shutdown']}")
    if r["speedup"] < min_speedup:
        problems.append(f"target NOT met: batching / one at a time {r['speedup']:.2f}x "
                        f"< {min_speedup:.2f}x")
    return problems


def format_report(r: dict) -> str:
    lines = [f"fam serve load test on 127.0.0.1: {r['clients']} concurrent clients, "
             f"{r['batched']['requests']} requests per mode and round, one {r['inputs']} input "
             f"each, model {r['model']}; reference: the same server serving one request at a "
             f"time; {r.get('repeats', 1)} round(s), modes alternated ABBA",
             f"{'round':<5} {'mode':<22} {'ok':>5} {'errors':>6} {'req/s':>8} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'mean batch':>10} {'graceful stop':>13}"]
    for i, rd in enumerate(r.get("rounds") or [r]):
        for name, m in (("dynamic batching (%d)" % rd["batched"]["max_batch"], rd["batched"]),
                        ("one at a time (1)", rd["one_at_a_time"])):
            lines.append(f"{i + 1:<5} {name:<22} {m['ok']:>5} {m['errors']:>6} "
                         f"{m['throughput_rps']:>8.1f} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} "
                         f"{m['mean_batch']:>10.1f} "
                         f"{'yes' if m['graceful_shutdown'] else 'NO':>13}")
            for e in m["error_examples"]:
                lines.append(f"  error: {e}")
        if "rounds" in r:
            lines.append(f"{'':<5} -> round {i + 1}: {rd['speedup']:.2f}x")
    spread = (f" (rounds: {r['speedup_min']:.2f}x–{r['speedup_max']:.2f}x)"
              if "speedup_min" in r else "")
    lines.append(f"dynamic batching throughput = {r['speedup']:.2f}x one request at a time, "
                 f"median{spread}")
    return "\n".join(lines)
