"""Benchmark: the inference pipeline vs the loops a user would otherwise run, same model and items.

Run ``fam bench encode [--model DIR --items F.jsonl] [--n 512] [--batch-size 32] [--json F]``.

* **sequential**: :func:`fam.model.encode.encode_sequential` on a model loaded with
  :func:`fam.load_backbone` (LM head loaded), batches in input order, each batch read and
  processed then run, every layer's hidden states returned (the loop ``EmbeddingModel.encode``
  ran before the pipeline).
* **control** (the strongest plain loop, and the reference the headline ratio is against):
  a plain loop — no background thread — over length-sorted batches that asks for the last
  hidden state only, on the same no-LM-head model as the pipeline
  (:class:`fam.model.encode.EncodePipeline` with ``prefetch=0``). It is what a careful user
  writes by hand with transformers; sequential → control shows what sorting by length and
  dropping the per-layer states (and the LM head) buy, control → pipeline what overlapping
  preprocessing with the forward adds.
* **pipeline**: :class:`fam.model.encode.EncodePipeline` on :func:`fam.model.encode.load_embedding_model`
  (no LM head): length-grouped batches, images decoded and processed in a background thread
  while the model runs, only the last hidden state.

Method (honest by construction): each run is a **fresh subprocess** (allocator caches and
earlier peaks of one variant cannot hide or inflate the other's); the variants alternate
for ``--repeats`` rounds and the median is reported. Items/s counts the whole encode of all
items after a 4-item warm-up (thread pools, lazy init). CPU time per item is the process's
CPU time (all threads) over the same encode: the work done, which other jobs on a shared
machine do not inflate; items/s adds what overlapping preprocessing with the forward buys,
which needs a free core. Peak memory is the growth of the
process's resident-set high-water mark from just before the model is loaded to the end of
the encode (model weights + activations + prefetched batches), reset through
``/proc/self/clear_refs`` (Linux). Equality of results: the maximum absolute difference and
the minimum cosine between each variant's embeddings and the sequential loop's, row by row in
input order; ``fam bench encode`` exits 1 when they differ (cosine below
:data:`MIN_COSINE`) or the pipeline misses a target ratio.

Without ``--model``/``--items`` it builds a tiny Qwen2-VL (``--size``, ``--layers`` language
layers, 224-px input, random weights) and the Scenes benchmark's evaluation items (queries and
candidates, text and image, deduplicated) in a temporary folder.
"""
from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["build_default", "check", "format_report", "run_bench", "run_default_or_given",
           "MIN_COSINE", "VARIANTS"]

VARIANTS = ("sequential", "control", "pipeline")
# Results must agree row by row: float32 forwards of the same model whose batches differ in
# composition and padding (summation order); measured max |diff| ≈ 1e-7 on unit vectors,
# so a cosine below 1 − 1e-6 (~10 float32 ulps) means a real difference.
MIN_COSINE = 1 - 1e-6


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    from safetensors.torch import save_file

    from fam.bench import PeakMemory, status_kb
    from fam.index.items import read_items
    from fam.model.encode import EncodePipeline, encode_sequential, load_embedding_model

    torch.set_num_threads(spec["threads"])
    items = [r.item for r in read_items(spec["items"], spec.get("image_root"))]
    variant, bs = spec["variant"], spec["batch_size"]
    _preimport(spec["model"])
    meter = PeakMemory(cuda=False)
    rss0 = status_kb("VmRSS")
    if variant == "sequential":
        from fam.backbones import load_backbone
        from fam.model import EmbeddingModel
        model = EmbeddingModel(load_backbone(spec["model"]))

        def run(xs):
            return encode_sequential(model, xs, bs)
    else:
        model = load_embedding_model(spec["model"])
        # control: the same pipeline code as a plain loop (no background thread, one worker)
        pipe = EncodePipeline(model, batch_size=bs,
                              prefetch=0 if variant == "control" else spec["prefetch"],
                              workers=1 if variant == "control" else spec["workers"])

        def run(xs):
            return pipe.encode(xs)
    n_params = sum(p.numel() for p in model.parameters())
    loaded = (status_kb("VmRSS") - rss0) * 1024 if rss0 is not None else None
    run(items[:4])
    t0, c0 = time.perf_counter(), time.process_time()
    emb = run(items)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak, method = meter.stop()
    save_file({"embeddings": emb.contiguous()}, spec["out"])
    forward = _forward_only(pipe, items) if variant == "pipeline" else None
    return {"variant": variant, "n": len(items), "seconds": seconds, "cpu_seconds": cpu,
            "items_per_s": len(items) / seconds, "peak_bytes": int(max(peak, 0)),
            "memory_method": method, "parameters": n_params, "threads": torch.get_num_threads(),
            "loaded_bytes": loaded, "forward_seconds": forward}


def _forward_only(pipe, items) -> float:
    """Seconds of the model's forwards alone on the pipeline's batches (prepared beforehand):
    the limit the pipeline approaches when preprocessing is fully hidden."""
    from fam.model.encode import length_order
    order = length_order(items)
    bs = pipe.batch_size
    idx = [order[k:k + bs] for k in range(0, len(items), bs)]
    batches = [pipe._prepare([items[i] for i in ix], None, None) for ix in idx]
    t0 = time.perf_counter()
    for b, ix in zip(batches, idx):
        pipe._run(b, ix)
    return time.perf_counter() - t0


def _preimport(model: str) -> None:
    """Import what loading the model imports, so the memory meter sees weights, not modules."""
    from transformers import AutoConfig, AutoModel

    from fam.backbones import _model_type, adapter_for_model_type
    cls = adapter_for_model_type(_model_type(model))
    cls._model_class()
    AutoModel._model_mapping[type(AutoConfig.from_pretrained(model))]
    if hasattr(cls, "_image_processor_class"):
        cls._image_processor_class()
    from PIL import Image
    Image.init()


def build_default(work: Path, size: str, n: int, layers: int = 0, image_size: int = 224,
                  seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen2-VL (``layers`` language-model layers if > 0) and ``n`` Scenes evaluation
    items (JSONL) under ``work``."""
    from fam.backbones import build_tiny
    from fam.data.mmeb import load_eval
    from fam.config import ScenesConfig
    from fam.data.scenes import generate_scenes

    data = work / "data"
    generate_scenes(ScenesConfig(seed=seed, n_train_images=8, n_eval_images=64, n_ood_images=24,
                                 eval_rows=64, n_candidates=8), data)
    caps = json.loads((data / "captions.json").read_text())
    model = work / "model"
    # 224-px model input (64 image tokens): images make much longer sequences than the texts,
    # as with real checkpoints (hundreds of image tokens), so batch composition matters.
    adapter = build_tiny("qwen2_vl", None, size=size, image_size=image_size,
                         corpus=[c["caption"] for c in caps], seed=seed)
    if layers:
        # A deeper language model than the preset: real embedding models have 24-36 layers,
        # where the per-layer hidden states that the sequential loop keeps are what costs
        # memory; 4 tiny layers would hide that.
        cfg = adapter.config.to_dict()
        cfg["text_config"].update(num_hidden_layers=layers, layer_types=["full_attention"] * layers)
        torch.manual_seed(seed)
        adapter = type(adapter)(type(adapter.hf_model)(type(adapter.config).from_dict(cfg)),
                                adapter.tokenizer, adapter.image_processor)
    adapter.save_pretrained(model)
    seen: dict[Any, None] = {}
    for rows in load_eval(data / "eval", data).values():
        for r in rows:
            for it in [r.query, *r.candidates]:
                seen.setdefault(it, None)
    items = list(seen)
    random.Random(seed).shuffle(items)  # a collection in no particular order
    rows = [{"text": it.text, **({"image": str(Path(it.image).relative_to(data))}
                                 if it.image else {})} for it in items[:n]]
    path = data / "bench_items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, path


def run_bench(model: Path, items: Path, image_root: Path | None = None, batch_size: int = 32,
              threads: int = 1, repeats: int = 3, prefetch: int = 2, workers: int = 1,
              ) -> dict[str, Any]:
    """Measure the three variants ``repeats`` times (alternating); medians and result equality."""
    from safetensors.torch import load_file

    from fam.bench import run_worker

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="fam-bench-encode-") as tmp:
        for r in range(repeats):
            for v in VARIANTS:
                spec = {"variant": v, "model": str(model), "items": str(items),
                        "image_root": str(image_root) if image_root else None,
                        "batch_size": batch_size, "threads": threads, "prefetch": prefetch,
                        "workers": workers, "out": str(Path(tmp) / f"{v}.safetensors")}
                res = run_worker("fam.bench.encode", spec, spec["variant"])
                logger.info("encode bench round %d %s: %s", r, v, res)
                runs[v].append(res)
        embs = {v: load_file(str(Path(tmp) / f"{v}.safetensors"))["embeddings"]
                for v in VARIANTS}
    summary: dict[str, Any] = {}
    for v, rs in runs.items():
        summary[v] = {"items_per_s": statistics.median(x["items_per_s"] for x in rs),
                      "cpu_ms_per_item": statistics.median(1000 * x["cpu_seconds"] / x["n"]
                                                           for x in rs),
                      "peak_bytes": int(statistics.median(x["peak_bytes"] for x in rs)),
                      "loaded_bytes": int(statistics.median(x["loaded_bytes"] or 0 for x in rs)),
                      "parameters": rs[0]["parameters"], "n": rs[0]["n"],
                      "memory_method": rs[0]["memory_method"], "threads": rs[0]["threads"],
                      "rounds": [{"items_per_s": x["items_per_s"], "peak_bytes": x["peak_bytes"],
                                  "cpu_seconds": x["cpu_seconds"]} for x in rs]}
        fw = [x["forward_seconds"] for x in rs if x.get("forward_seconds")]
        if fw:
            summary[v]["forward_only_seconds"] = statistics.median(fw)
            summary[v]["forward_only_items_per_s"] = rs[0]["n"] / statistics.median(fw)
    a = embs["sequential"]
    summary["equality"] = {}
    for v in VARIANTS[1:]:
        cos = torch.nn.functional.cosine_similarity(a.double(), embs[v].double(), dim=-1)
        summary["equality"][v] = {"max_abs_diff": float((a - embs[v]).abs().max()),
                                  "min_cosine": float(cos.min())}
    # The figures of the pipeline vs the sequential loop (kept under their old names).
    summary["equality"].update(summary["equality"]["pipeline"])
    s, c, p = summary["sequential"], summary["control"], summary["pipeline"]

    def ratios(x: dict, ref: dict) -> dict[str, float]:
        return {"items_per_s": x["items_per_s"] / ref["items_per_s"],
                "cpu_per_item": x["cpu_ms_per_item"] / ref["cpu_ms_per_item"],
                "peak_memory": x["peak_bytes"] / max(ref["peak_bytes"], 1)}
    summary["ratios"] = ratios(p, s)  # pipeline / sequential
    summary["ratios_vs_control"] = ratios(p, c)  # pipeline / control: the overlap's share
    summary["control_vs_sequential"] = ratios(c, s)  # sorting + last layer only (+ no LM head)
    summary["settings"] = {"batch_size": batch_size, "threads": threads, "repeats": repeats,
                           "prefetch": prefetch, "workers": workers}
    return summary


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f} MiB"


def format_report(res: dict[str, Any], label: str) -> str:
    s, eq = res["sequential"], res["equality"]
    names = [v for v in VARIANTS if v in res]
    lines = [f"encode bench: {label}; {s['n']} items, batch {res['settings']['batch_size']}, "
             f"{s['threads']} torch thread(s), median of {res['settings']['repeats']} "
             f"alternating rounds, peak memory = {s['memory_method']} growth over load + encode",
             "control = plain loop, length-sorted, last layer only, no LM head (the strongest "
             "loop without the pipeline's background thread)",
             f"{'variant':<12} | {'items/s':>9} | {'CPU ms/item':>11} | {'peak memory':>12} | "
             f"{'after load':>11} | {'parameters':>10}"]
    for name in names:
        x = res[name]
        lines.append(f"{name:<12} | {x['items_per_s']:>9.1f} | {x['cpu_ms_per_item']:>11.1f} | "
                     f"{_mb(x['peak_bytes']):>12} | {_mb(x['loaded_bytes']):>11} | "
                     f"{x['parameters']:>10,}")
    p = res["pipeline"]
    if "forward_only_seconds" in p:
        lines.append(f"forward only (the pipeline's batches, prepared beforehand): "
                     f"{p['forward_only_seconds']:.2f} s = {p['forward_only_items_per_s']:.1f} "
                     f"items/s; the pipeline reaches "
                     f"{p['items_per_s'] / p['forward_only_items_per_s']:.0%} of that limit")
    for v in names[1:]:
        e = eq.get(v, eq)
        lines.append(f"equal results ({v} vs sequential): max |diff| {e['max_abs_diff']:.2e}, "
                     f"min cosine {e['min_cosine']:.7f}")

    def fmt(r: dict) -> str:
        return (f"items/s {r['items_per_s']:.2f}x, CPU time per item {r['cpu_per_item']:.2f}x, "
                f"peak memory {r['peak_memory']:.2f}x")
    if "control_vs_sequential" in res:
        lines.append(f"ratios (control / sequential: sorting + last layer only): "
                     f"{fmt(res['control_vs_sequential'])}")
        lines.append(f"ratios (pipeline / control: background preprocessing): "
                     f"{fmt(res['ratios_vs_control'])}")
    lines.append(f"ratios (pipeline / sequential): {fmt(res['ratios'])}")
    return "\n".join(lines)


def check(res: dict[str, Any], min_speedup: float = 1.0, max_memory_ratio: float = 1.0
          ) -> list[str]:
    """What failed: a variant whose embeddings differ from the sequential loop's (cosine
    below :data:`MIN_COSINE`), or the pipeline missing a target against the sequential loop
    (items/s ratio below ``min_speedup``, peak memory ratio above ``max_memory_ratio``)."""
    problems = []
    for v in VARIANTS[1:]:
        e = res["equality"].get(v)
        if e is not None and not e["min_cosine"] >= MIN_COSINE:
            problems.append(f"{v} embeddings differ from the sequential loop's: min cosine "
                            f"{e['min_cosine']:.7f} < {MIN_COSINE}")
    r = res["ratios"]
    if r["items_per_s"] < min_speedup:
        problems.append(f"target NOT met: pipeline / sequential items/s {r['items_per_s']:.2f}x "
                        f"< {min_speedup:.2f}x")
    if r["peak_memory"] > max_memory_ratio:
        problems.append(f"target NOT met: pipeline / sequential peak memory "
                        f"{r['peak_memory']:.2f}x > {max_memory_ratio:.2f}x")
    return problems


def run_default_or_given(model: str | None, items: str | None, image_root: str | None = None,
                         n: int = 512, size: str = "m", layers: int = 16, batch_size: int = 32,
                         threads: int = 1, repeats: int = 3, prefetch: int = 2,
                         workers: int = 1) -> tuple[dict[str, Any], str]:
    """:func:`run_bench` on the given model and items, or on the default ones (built in a
    temporary folder); returns the figures and a label for :func:`format_report`."""
    with tempfile.TemporaryDirectory(prefix="fam-bench-encode-data-") as tmp:
        if model is None:
            model_dir, items_file = build_default(Path(tmp), size, n, layers)
            label = (f"tiny Qwen2-VL '{size}' with {layers or 'preset'} LM layers, 224-px "
                     "input (random weights), Scenes eval items")
        else:
            model_dir, items_file = Path(model), Path(items)
            label = f"{model}, {items}"
        res = run_bench(model_dir, items_file, Path(image_root) if image_root else None,
                        batch_size, threads, repeats, prefetch, workers)
    return res, label


if __name__ == "__main__":
    # `python -m fam.bench.encode --_worker JSON` measures one variant in this fresh process
    # (run_bench's subprocess protocol); users run `fam bench encode`.
    if sys.argv[1:2] != ["--_worker"]:
        sys.exit("this module is the benchmark's worker; run `fam bench encode [...]`")
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
