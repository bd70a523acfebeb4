"""Benchmark: how long commands take to answer, each in a fresh process (``fam bench startup``).

Run ``fam bench startup [--repeats 5] [--work DIR] [--index IDX] [--json F]``.

A newcomer's first impression is the time ``fam --help`` and a mistyped option take, and a
search of an index already built. The benchmark builds a tiny index in a temporary folder
(a tiny random Qwen2-VL, a few drawn images, ``fam.index.build_index``) unless ``--index``
names one, then times, in fresh ``python -m fam`` processes, interleaved round by round:

* ``fam --help`` (target < 1 s);
* a bad argument, ``fam search --index IDX -k 0`` (argparse refuses it, exit 2; < 1 s);
* ``fam search --text`` and ``--image`` **warm**: answered by the query worker that a
  previous search started (:mod:`fam.serve.search_client`) — what a user gets from the
  second search on (target <= 2.5 s);
* the same two searches **cold**, ``--no-worker``: in the command's own process, importing
  torch and transformers and loading the model (no target: the import alone is seconds);
* the **first** search with the worker (no worker running: it starts one, waits for it to
  load, then asks it; no target: a cold search plus the hand-over);

and, as references measured in the same rounds, the bare interpreter (``python -c pass``)
and the import a cold search cannot avoid (torch and the model's transformers module).
Figures are medians of wall-clock seconds, with the processes' CPU seconds beside them (on
a loaded machine wall time grows, CPU time much less; the worker's own CPU time is not in
a warm search's figure); the load average is printed before and after. The workers run
under a private ``FAM_RUNTIME_DIR`` and are stopped at the end.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["TARGETS_S", "run_bench", "format_report"]

#: Wall-clock targets (seconds) of issue 23: help and argument errors under 1 s, a search on
#: a built index within 2.5 s (2 cores) — a warm one, answered by the query worker.
TARGETS_S = {"help": 1.0, "bad_argument": 1.0, "search_text": 2.5, "search_image": 2.5}
#: The transformers module of the benchmark's model (tiny Qwen2-VL).
MODEL_MODULE = "transformers.models.qwen2_vl.modeling_qwen2_vl"
#: The query of the text searches.
QUERY = "a red circle"


def _draw_images(folder: Path, n: int) -> list[Path]:
    """``n`` small distinct PNGs (a coloured disc on a plain background)."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), (255 - 20 * i, 255, 255))
        ImageDraw.Draw(img).ellipse((8 + 2 * i, 8, 40 + 2 * i, 40), fill=(30 * i % 256, 90, 160))
        paths.append(folder / f"img{i}.png")
        img.save(paths[-1])
    return paths


def prepare(work: Path, n_items: int = 8) -> tuple[Path, Path]:
    """A tiny model, images, items and their index under ``work``; (index, an image)."""
    from fam.backbones import build_tiny
    from fam.index import build_index
    model, index = work / "model", work / "index"
    images = _draw_images(work / "images", n_items)
    if not (model / "config.json").is_file():
        build_tiny("qwen2_vl", model, size="xs", corpus=["a red circle", "a blue disc"], seed=0)
    items = work / "items.jsonl"
    items.write_text("".join(json.dumps({"id": p.stem, "image": f"images/{p.name}",
                                         "text": "<|image_1|>\nRepresent the given image."})
                             + "\n" for p in images))
    if not (index / "manifest.json").is_file():
        build_index(index, items, model=model, progress=False)
    return index, images[0]


def _image_of(index: Path) -> Path:
    """The first image item of an index built elsewhere (the image query)."""
    manifest = json.loads((index / "manifest.json").read_text("utf-8"))
    with open(index / "items.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("image"):
                return Path(manifest.get("image_root") or index) / row["image"]
    raise ValueError(f"{index} holds no image item for the image query")


def _run(cmd: list[str], expect: int, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process (which must exit with ``expect``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != expect:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{' '.join(cmd[2:])}: exit {proc.returncode}, expected {expect} "
                           f"({tail})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run_bench(work: Path | None = None, repeats: int = 5,
              index: Path | None = None) -> dict[str, Any]:
    """Time the commands (see the module docstring); ``work`` defaults to a temporary folder,
    ``index`` to a tiny one built there."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="fam-bench-startup-") as tmp:
            return run_bench(Path(tmp), repeats, index)
    work.mkdir(parents=True, exist_ok=True)
    if index is None:
        index, image = prepare(work)
    else:
        index = index.resolve()
        image = _image_of(index)
    fam = [sys.executable, "-m", "fam"]
    search = fam + ["search", "--index", str(index)]
    warm, cold = search + ["--worker"], search + ["--no-worker"]
    cases = {
        "help": (fam + ["--help"], 0),
        "bad_argument": (search + ["-k", "0"], 2),
        "search_text_cold": (cold + ["--text", QUERY], 0),
        "search_image_cold": (cold + ["--image", str(image)], 0),
        "search_text_first": (warm + ["--text", QUERY], 0),
        "search_text": (warm + ["--text", QUERY], 0),
        "search_image": (warm + ["--image", str(image)], 0),
        "python": ([sys.executable, "-c", "pass"], 0),
        "model_import": ([sys.executable, "-c", f"import torch, {MODEL_MODULE}"], 0),
    }
    stop = (search + ["--stop-worker"], 0)
    with tempfile.TemporaryDirectory(prefix="fam-rt-") as rt:
        env = {**os.environ, "FAM_RUNTIME_DIR": rt}
        load_before = os.getloadavg()
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        try:
            for r in range(repeats + 1):  # round 0 warms the file cache: not counted
                for name, (cmd, expect) in cases.items():
                    if name == "search_text_first":
                        _run(*stop, env)  # no worker: this search starts one
                    sample = _run(cmd, expect, env)
                    if r:
                        samples[name].append(sample)
        finally:
            _run(*stop, env)
        load_after = os.getloadavg()
    rows = {}
    for name, runs in samples.items():
        walls = [w for w, _ in runs]
        rows[name] = {"median_s": round(statistics.median(walls), 3),
                      "min_s": round(min(walls), 3),
                      "cpu_s": round(statistics.median(c for _, c in runs), 3),
                      "target_s": TARGETS_S.get(name)}
        if name in TARGETS_S:
            rows[name]["ok"] = rows[name]["median_s"] <= TARGETS_S[name]
    with open(index / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    return {"command": "fam bench startup", "repeats": repeats, "cores": os.cpu_count(),
            "python": sys.executable, "index_items": manifest.get("count"),
            "model": manifest.get("model_path"),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in load_after],
            "threads_env": os.environ.get("OMP_NUM_THREADS"), "commands": rows,
            "all_ok": all(r.get("ok", True) for r in rows.values())}


_LABELS = {"help": "fam --help",
           "bad_argument": "fam search -k 0 (bad argument)",
           "search_text_cold": "fam search --text, cold (--no-worker)",
           "search_image_cold": "fam search --image, cold (--no-worker)",
           "search_text_first": "fam search --text, starting the worker",
           "search_text": "fam search --text, warm (worker)",
           "search_image": "fam search --image, warm (worker)",
           "python": "reference: python -c pass",
           "model_import": "reference: import torch + model module"}


def format_report(r: dict[str, Any]) -> str:
    """The printed table: medians, minima, CPU seconds, targets and verdicts."""
    lines = [f"fam bench startup: fresh processes, median of {r['repeats']} rounds; "
             f"{r['cores']} cores, load average {r['load_avg_before'][0]} before, "
             f"{r['load_avg_after'][0]} after; index of {r['index_items']} items",
             f"{'command':<42}{'median s':>9}{'min s':>8}{'cpu s':>8}  target",
             "-" * 76]
    for name, row in r["commands"].items():
        target = (f"<= {row['target_s']:g} s  {'ok' if row['ok'] else 'MISSED'}"
                  if row["target_s"] else "")
        lines.append(f"{_LABELS[name]:<42}{row['median_s']:>9.2f}{row['min_s']:>8.2f}"
                     f"{row['cpu_s']:>8.2f}  {target}")
    cmd = r["commands"]
    imp, cold = cmd["model_import"]["cpu_s"], cmd["search_text_cold"]["cpu_s"]
    lines.append("cpu s counts the command's process only: not the worker's time (warm, "
                 "starting the worker)")
    lines.append(f"a cold search spends {imp:.2f} CPU s importing torch and transformers' "
                 f"model code (the reference) and {cold - imp:.2f} CPU s in the rest (fam, the "
                 "index, the model, the query); a warm one skips both: the query worker "
                 "holds them")
    return "\n".join(lines)
