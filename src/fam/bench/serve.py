"""Benchmark: a bounded load test of ``fam serve`` on 127.0.0.1, dynamic batching vs none.

Run ``fam bench serve [--model DIR] [--clients 32] [--requests 384] [--inputs mixed]``.

The same model is served twice by a real ``fam serve`` process on a free loopback port: with
dynamic batching (``--max-batch 32``) and serving one request at a time (``--max-batch 1``).
Each time, ``--clients`` concurrent clients (httpx, asyncio) send ``--requests``
``POST /v1/embeddings`` requests in all (one input each: a caption, or a Scenes-like image with
the image instruction as a data URI, or alternately both), after a warm-up. The test is bounded
in count and in time (``--timeout``) and stops by itself; the server is then stopped with
SIGTERM and must exit cleanly (graceful shutdown). Reported per mode: errors, throughput
(requests/s), latency p50/p99, the server's mean batch size; and the throughput ratio.
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

__all__ = ["run_load", "run_bench", "format_report", "free_port"]


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
              threads: int | None = None) -> dict:
    """Both modes on the same model, side by side."""
    if model is None:
        model = work / "model"
        if not (model / "config.json").is_file():
            from fam.backbones import build_tiny
            build_tiny("qwen2_vl", model, size="s", seed=0)
    batched = run_load(model, max_batch, clients, requests, inputs, timeout, threads)
    single = run_load(model, 1, clients, requests, inputs, timeout, threads)
    return {"model": str(model), "clients": clients, "inputs": inputs, "batched": batched,
            "one_at_a_time": single,
            "speedup": batched["throughput_rps"] / max(single["throughput_rps"], 1e-9)}


def format_report(r: dict) -> str:
    lines = [f"fam serve load test on 127.0.0.1: {r['clients']} concurrent clients, "
             f"{r['batched']['requests']} requests per mode, one {r['inputs']} input each, "
             f"model {r['model']}",
             f"{'mode':<22} {'ok':>5} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'mean batch':>10} {'graceful stop':>13}"]
    for name, m in (("dynamic batching (%d)" % r["batched"]["max_batch"], r["batched"]),
                    ("one at a time (1)", r["one_at_a_time"])):
        lines.append(f"{name:<22} {m['ok']:>5} {m['errors']:>6} {m['throughput_rps']:>8.1f} "
                     f"{m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {m['mean_batch']:>10.1f} "
                     f"{'yes' if m['graceful_shutdown'] else 'NO':>13}")
        for e in m["error_examples"]:
            lines.append(f"  error: {e}")
    lines.append(f"dynamic batching throughput = {r['speedup']:.2f}x one request at a time")
    return "\n".join(lines)
