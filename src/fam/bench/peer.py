"""Benchmark: fam against sentence-transformers on the same checkpoint and items (``fam bench peer``).

Run ``fam bench peer [--model DIR] [--repeats 3] [--json F]``.

Both sides load **the same folder**: the sentence-transformers export of the model (``fam
export``; a fam model folder is exported to a temporary folder first, an export folder is
used as it is), which fam loads too (``fam_backbone.json`` records its input settings).

* **encode** (text, image, mixed): items/s of the whole encode of the items from their files
  (images decoded inside the measurement on both sides), batch 32, after a 4-item warm-up.
  fam: :class:`fam.model.encode.EncodePipeline` on :func:`fam.model.encode.load_embedding_model`;
  sentence-transformers: ``SentenceTransformer(DIR).encode`` (texts as strings, images as
  PIL images, image + text as ``{"image", "text"}``).
* **train**: one LoRA step on 64 (caption query, image document) pairs, GradCache with
  chunks of 16, InfoNCE with in-batch negatives at τ = 0.02 (scale 50), AdamW: items to
  updated weights (preprocessing included). fam: :func:`fam.train.gradcache.gradcache_step`
  on :class:`fam.train.adapt.ContrastiveModule` / :class:`~fam.train.adapt.ContrastiveLoss`;
  sentence-transformers: ``CachedMultipleNegativesRankingLoss(scale=50, mini_batch_size=16)``
  and ``loss.backward()``. Both wrap the language model's linear layers with the same peft
  LoRA (:data:`LORA`; on sentence-transformers' transformers model directly, the way
  ``add_adapter`` would). The time is the median of the steps after the first; the memory
  is the peak added by training: growth of the resident-set high-water mark (CPU) or of the
  allocator's peak (CUDA) from just before the first step to the end of the last (gradients,
  optimizer state, activations, GradCache's cached outputs).

Method: every measurement is a **fresh subprocess**; the sides alternate (fam, st, st, fam,
...: who goes first changes with every task and round) for ``--repeats`` rounds so that load
from other jobs falls on both; medians are
reported with the machine's load average. Results must agree before a ratio is printed:
the embeddings' max |Δ| (row by row, input order) at most :data:`EMBEDDING_TOLERANCE` and the
first step's losses within :data:`LOSS_TOLERANCE`; otherwise the report refuses the ratios.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["build_default", "format_report", "run_bench", "TARGETS", "LORA"]

SIDES = ("fam", "st")
MODALITIES = ("text", "image", "mixed")
#: Targets (fam / sentence-transformers): encode items/s at least, train time and memory at most.
TARGETS = {"encode_items_per_s": 1.3, "train_step_time": 0.85, "train_peak_memory": 1.0}
#: Max |Δ| of L2-normalised float32 embeddings: the two sides pad and batch items
#: differently (fam groups by length), so float32 sums round differently (~1e-7 per value).
EMBEDDING_TOLERANCE = 1e-5
#: Relative difference of the first step's losses (float32 InfoNCE over 64 rows; the
#: embeddings agree to ~1e-7 and scores are scaled by 50).
LOSS_TOLERANCE = 1e-5
#: The LoRA of both sides (fam's LoraConfig defaults, dropout 0: with dropout the two sides
#: draw different masks in their different forward orders and the losses could not be compared).
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
QUERY_PROMPT = "Find me an everyday image that matches the given caption: "
DOCUMENT_TEXT = "<|image_1|>\nRepresent the given image."


# ---------------------------------------------------------------------------------- data
def build_default(work: Path, size: str = "m", layers: int = 16, n: int = 256,
                  image_size: int = 224, seed: int = 0) -> Path:
    """A tiny Qwen2-VL exported as a sentence-transformers folder (``work/st``) and the
    Scenes items (``work/data``); returns the export folder."""
    from fam.bench.encode import build_default as build_model
    model_dir, _ = build_model(work, size, 8, layers, image_size, seed)
    return export_folder(model_dir, work / "st")


def export_folder(model: Path, out: Path) -> Path:
    """``model`` itself when it is a sentence-transformers folder, else its export at ``out``."""
    from fam.export.st import export_sentence_transformers
    if (model / "modules.json").exists():
        return model
    export_sentence_transformers(model, out, overwrite=True)
    return out


def write_items(data: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """``n`` caption queries (``text.jsonl``), their ``n`` images (``image.jsonl``), both
    interleaved (``mixed.jsonl``) and the (query, image) training pairs (``pairs.jsonl``)."""
    from fam.config import ScenesConfig
    from fam.data.scenes import generate_scenes

    if not (data / "captions_eval.json").exists():
        generate_scenes(ScenesConfig(seed=seed, n_train_images=8, n_eval_images=n,
                                     n_ood_images=8, eval_rows=8, n_candidates=4), data)
    caps = json.loads((data / "captions_eval.json").read_text())
    if len(caps) < n:
        caps = (caps * (n // len(caps) + 1))
    caps = caps[:n]
    text = [{"text": QUERY_PROMPT + c["caption"]} for c in caps]
    image = [{"text": DOCUMENT_TEXT, "image": c["image"]} for c in caps]
    mixed = [r for pair in zip(text, image) for r in pair][:n]
    out = {}
    for name, rows in (("text", text), ("image", image), ("mixed", mixed),
                       ("pairs", [{"query": q["text"], "image": d["image"]}
                                  for q, d in zip(text, image)])):
        out[name] = data / f"peer_{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _read(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _mm_items(rows: list[dict[str, Any]], root: Path) -> list:
    from fam.data.types import MMItem
    return [MMItem(r["text"], root / r["image"] if r.get("image") else None) for r in rows]


def _st_inputs(rows: list[dict[str, Any]], root: Path) -> list:
    """sentence-transformers' inputs for the rows, images decoded from their files."""
    from PIL import Image
    out: list[Any] = []
    for r in rows:
        if not r.get("image"):
            out.append(r["text"])
            continue
        with Image.open(root / r["image"]) as im:
            im.load()
            img = im.convert("RGB") if im.mode != "RGB" else im.copy()
        out.append({"image": img, "text": r["text"]} if r["text"] else img)
    return out


# ---------------------------------------------------------------------------------- workers
def _fam_encoder(spec: dict[str, Any]):
    from fam.model.encode import EncodePipeline, load_embedding_model
    model = load_embedding_model(spec["model"], device=spec["device"])
    pipe = EncodePipeline(model, batch_size=spec["batch_size"])
    root = Path(spec["root"])
    return lambda rows: pipe.encode(_mm_items(rows, root))


def _st_model(spec: dict[str, Any]):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(spec["model"], device=spec["device"])


def _st_encoder(spec: dict[str, Any]):
    st = _st_model(spec)
    root = Path(spec["root"])
    return lambda rows: st.encode(_st_inputs(rows, root), batch_size=spec["batch_size"],
                                  convert_to_tensor=True, show_progress_bar=False).float().cpu()


def _encode_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file
    rows = _read(spec["items"])
    encode = (_fam_encoder if spec["side"] == "fam" else _st_encoder)(spec)
    encode(rows[:4])
    t0, c0 = time.perf_counter(), time.process_time()
    emb = encode(rows)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file({"embeddings": emb.contiguous()}, spec["out"])
    return {"n": len(rows), "seconds": seconds, "cpu_seconds": cpu,
            "items_per_s": len(rows) / seconds}


def _lora_targets(model: str) -> str:
    from fam.backbones import _model_type, adapter_for_model_type
    return adapter_for_model_type(_model_type(model)).lora_target_modules(None)


def _fam_trainer(spec: dict[str, Any]):
    from fam.backbones import load_backbone
    from fam.config import LoraConfig
    from fam.model import EmbeddingModel, apply_lora
    from fam.train.adapt import ContrastiveLoss, ContrastiveModule, PairBatch
    from fam.train.gradcache import gradcache_step

    # As fam's training stages load it (train/embedder.py: prepare_embedder).
    emb = EmbeddingModel(load_backbone(spec["model"])).to(spec["device"])
    for p in emb.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    apply_lora(emb, LoraConfig(enabled=True, **LORA))
    module = ContrastiveModule(emb).train()
    # In-batch negatives only, every column a negative: CachedMultipleNegativesRankingLoss.
    loss = ContrastiveLoss(temperature=1.0 / spec["scale"], mask_duplicates=False)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    root, adapter, device = Path(spec["root"]), emb.adapter, torch.device(spec["device"])
    rows = _read(spec["items"])
    queries = _mm_items([{"text": r["query"]} for r in rows], root)
    docs = _mm_items([{"text": DOCUMENT_TEXT, "image": r["image"]} for r in rows], root)
    n = len(rows)

    def step() -> float:
        no = torch.zeros(n, dtype=torch.bool)
        ids = torch.full((n,), -1, dtype=torch.long)
        batch = PairBatch(adapter.encode(queries), adapter.encode(docs), None,
                          torch.zeros(0, dtype=torch.long), no, no, ids, ids).to(device)
        terms = gradcache_step(module, loss, batch, 0, spec["chunk"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(terms["loss"])

    return step, sum(p.numel() for p in params)


def _st_trainer(spec: dict[str, Any]):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss)
    from sentence_transformers.util import batch_to_device

    st = _st_model(spec)
    for p in st.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    # What ``st.add_adapter(config)`` does (it needs a newer peft): the transformers model
    # inside the Transformer module gets the same LoRA as fam's.
    st[0].model = get_peft_model(st[0].model, PeftLoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        target_modules=_lora_targets(spec["model"])))
    st.train()
    loss = CachedMultipleNegativesRankingLoss(st, scale=spec["scale"],
                                              mini_batch_size=spec["chunk"])
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    root, rows = Path(spec["root"]), _read(spec["items"])

    def step() -> float:
        q = st.preprocess([r["query"] for r in rows])
        d = st.preprocess(_st_inputs([{"text": DOCUMENT_TEXT, "image": r["image"]}
                                      for r in rows], root))
        value = loss([batch_to_device(q, st.device), batch_to_device(d, st.device)], None)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(value)

    return step, sum(p.numel() for p in params)


def _train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from fam.bench import PeakMemory
    step, n_params = (_fam_trainer if spec["side"] == "fam" else _st_trainer)(spec)
    cuda = spec["device"].startswith("cuda")
    meter = PeakMemory(cuda=cuda)
    losses, seconds, cpu = [], [], []
    for _ in range(spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak, method = meter.stop()
    return {"losses": losses, "step_seconds": seconds, "step_cpu_seconds": cpu,
            "step_time": statistics.median(seconds[1:] or seconds),
            "step_cpu_time": statistics.median(cpu[1:] or cpu),
            "peak_bytes": int(max(peak, 0)), "memory_method": method,
            "trainable_parameters": n_params}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    res = (_encode_worker if spec["task"] == "encode" else _train_worker)(spec)
    return {**res, "side": spec["side"], "task": spec["task"], "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- driver
def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(model: Path, data: Path, *, n: int = 256, batch_size: int = 32, pairs: int = 64,
              chunk: int = 16, steps: int = 3, repeats: int = 3, threads: int = 1,
              device: str = "cpu", tasks: tuple[str, ...] = (*MODALITIES, "train"),
              ) -> dict[str, Any]:
    """Measure both sides ``repeats`` times, alternating; medians, agreement and ratios."""
    from safetensors.torch import load_file

    from fam.bench import run_worker

    files = write_items(data, max(n, pairs))
    pair_file = data / "peer_pairs_used.jsonl"
    pair_file.write_text("".join(files["pairs"].read_text().splitlines(True)[:pairs]))
    item_files = {}
    for m in MODALITIES:
        item_files[m] = data / f"peer_{m}_used.jsonl"
        item_files[m].write_text("".join(files[m].read_text().splitlines(True)[:n]))
    runs: dict[tuple[str, str], list[dict]] = {}
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="fam-bench-peer-") as tmp:
        for r in range(repeats):
            for ti, task in enumerate(tasks):
                # Who goes first alternates between tasks and rounds.
                for side in (SIDES if (r + ti) % 2 == 0 else SIDES[::-1]):
                    spec = {"side": side, "task": "train" if task == "train" else "encode",
                            "model": str(model), "root": str(data), "threads": threads,
                            "device": device, "batch_size": batch_size, "chunk": chunk,
                            "steps": steps, "scale": 50.0, "lr": 1e-4,
                            "items": str(pair_file if task == "train" else item_files[task]),
                            "out": str(Path(tmp) / f"{side}_{task}.safetensors")}
                    res = run_worker("fam.bench.peer", spec, f"{side} {task}")
                    logger.info("peer bench round %d %s %s: %s", r, side, task, res)
                    runs.setdefault((side, task), []).append(res)
        emb = {(s, m): load_file(str(Path(tmp) / f"{s}_{m}.safetensors"))["embeddings"]
               for s in SIDES for m in tasks if m != "train"}
    return _summarise(runs, emb, tasks, {
        "n": n, "batch_size": batch_size, "pairs": pairs, "chunk": chunk, "steps": steps,
        "repeats": repeats, "threads": threads, "device": device, "model": str(model),
        "lora": LORA, "load_before": load_before, "load_after": _load()})


def _summarise(runs, emb, tasks, settings) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": settings, "encode": {}, "train": None, "agree": {},
                           "ratios": {}, "refused": []}
    for m in (t for t in tasks if t != "train"):
        a, b = emb[("fam", m)], emb[("st", m)]
        diff = float((a - b).abs().max())
        out["agree"][f"{m}_max_abs_diff"] = diff
        if diff > EMBEDDING_TOLERANCE:
            out["refused"].append(f"{m} embeddings differ: max |Δ| {diff:.2e} > "
                                  f"{EMBEDDING_TOLERANCE:.0e}")
        out["encode"][m] = {s: {"items_per_s": statistics.median(x["items_per_s"]
                                                                 for x in runs[(s, m)]),
                                # CPU time of all the process's threads: the work done, which
                                # other jobs on a shared machine inflate far less than time.
                                "cpu_ms_per_item": statistics.median(
                                    1000 * x["cpu_seconds"] / x["n"] for x in runs[(s, m)]),
                                "rounds": [round(x["items_per_s"], 2) for x in runs[(s, m)]]}
                            for s in SIDES}
        out["ratios"][f"encode_{m}"] = (out["encode"][m]["fam"]["items_per_s"]
                                        / out["encode"][m]["st"]["items_per_s"])
    if "train" in tasks:
        tr = {s: {"step_time": statistics.median(x["step_time"] for x in runs[(s, "train")]),
                  "peak_bytes": int(statistics.median(x["peak_bytes"]
                                                      for x in runs[(s, "train")])),
                  "step_cpu_time": statistics.median(x.get("step_cpu_time", float("nan"))
                                                     for x in runs[(s, "train")]),
                  "first_loss": runs[(s, "train")][0]["losses"][0],
                  "trainable_parameters": runs[(s, "train")][0]["trainable_parameters"],
                  "memory_method": runs[(s, "train")][0]["memory_method"],
                  "rounds": [{"step_time": round(x["step_time"], 3), "peak_bytes": x["peak_bytes"],
                              "losses": x["losses"]} for x in runs[(s, "train")]]}
              for s in SIDES}
        out["train"] = tr
        lf, ls = tr["fam"]["first_loss"], tr["st"]["first_loss"]
        out["agree"]["first_loss_rel_diff"] = abs(lf - ls) / max(abs(ls), 1e-12)
        if out["agree"]["first_loss_rel_diff"] > LOSS_TOLERANCE:
            out["refused"].append(f"first-step losses differ: fam {lf:.7f}, "
                                  f"sentence-transformers {ls:.7f}")
        if tr["fam"]["trainable_parameters"] != tr["st"]["trainable_parameters"]:
            out["refused"].append("the LoRAs differ: fam trains "
                                  f"{tr['fam']['trainable_parameters']} parameters, "
                                  f"sentence-transformers {tr['st']['trainable_parameters']}")
        out["ratios"]["train_step_time"] = tr["fam"]["step_time"] / tr["st"]["step_time"]
        out["ratios"]["train_peak_memory"] = (tr["fam"]["peak_bytes"]
                                              / max(tr["st"]["peak_bytes"], 1))
    if out["refused"]:
        out["ratios"] = {}
    out["targets"] = _verdicts(out["ratios"])
    out["met"] = not out["refused"] and bool(out["targets"]) and all(
        v["met"] for v in out["targets"].values())
    return out


def _verdicts(ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    v = {}
    for k, r in ratios.items():
        if k.startswith("encode_"):
            v[k] = {"ratio": r, "target": f">= {TARGETS['encode_items_per_s']}",
                    "met": r >= TARGETS["encode_items_per_s"]}
        else:
            v[k] = {"ratio": r, "target": f"<= {TARGETS[k]}", "met": r <= TARGETS[k]}
    return v


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f} MiB"


def format_report(res: dict[str, Any], label: str) -> str:
    s = res["settings"]
    lines = [f"peer bench: fam vs sentence-transformers, {label}; {s['threads']} torch "
             f"thread(s), {s['device']}, median of {s['repeats']} alternating rounds, each "
             f"side in a fresh process; load average {s['load_before']} -> {s['load_after']}",
             f"{'measure':<28} | {'fam':>12} | {'sent.-transf.':>13} | {'ratio':>6} | "
             f"{'target':>7} | met"]
    ratios, targets = res["ratios"], res["targets"]

    def row(name, key, f, st, fmt):
        r = ratios.get(key)
        t = targets.get(key)
        lines.append(f"{name:<28} | {fmt(f):>12} | {fmt(st):>13} | "
                     f"{(f'{r:.2f}x' if r is not None else 'refused'):>6} | "
                     f"{(t['target'] if t else '-'):>7} | "
                     f"{('yes' if t['met'] else 'NO') if t else '-'}")

    for m, e in res["encode"].items():
        row(f"encode {m} items/s (b={s['batch_size']})", f"encode_{m}",
            e["fam"]["items_per_s"], e["st"]["items_per_s"], lambda x: f"{x:.1f}")
    tr = res["train"]
    if tr:
        row(f"train step s (b={s['pairs']}, c={s['chunk']})", "train_step_time",
            tr["fam"]["step_time"], tr["st"]["step_time"], lambda x: f"{x:.2f}")
        row("train peak memory added", "train_peak_memory", tr["fam"]["peak_bytes"],
            tr["st"]["peak_bytes"], _mb)
    cpu = [f"{m} {e['fam']['cpu_ms_per_item'] / e['st']['cpu_ms_per_item']:.2f}x"
           for m, e in res["encode"].items()]
    if tr:
        cpu.append(f"train step {tr['fam']['step_cpu_time'] / tr['st']['step_cpu_time']:.2f}x")
    if cpu:
        lines.append("CPU time fam / sentence-transformers (all threads; not a target): "
                     + ", ".join(cpu))
    agree = ", ".join(f"{k} {v:.1e}" for k, v in res["agree"].items())
    lines.append(f"agreement: {agree}" + (f"; first-step loss fam {tr['fam']['first_loss']:.6f}"
                                          f", sentence-transformers {tr['st']['first_loss']:.6f}"
                                          if tr else ""))
    for why in res["refused"]:
        lines.append(f"NO RATIO: {why}")
    lines.append("all targets met" if res["met"] else "targets NOT met")
    return "\n".join(lines)


def run_default_or_given(model: str | None, work: str | None = None, size: str = "m",
                         layers: int = 16, **kwargs: Any) -> tuple[dict[str, Any], str]:
    """:func:`run_bench` on ``model`` (a fam model or an export folder) or on the default
    tiny Qwen2-VL; the Scenes items are generated in ``work`` (default: a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="fam-bench-peer-data-") as tmp:
        root = Path(work) if work else Path(tmp)
        if model is None:
            folder = build_default(root, size, layers)
            label = (f"tiny Qwen2-VL '{size}' with {layers} LM layers, 224-px input (random "
                     "weights)")
        else:
            folder = export_folder(Path(model), root / "st")
            label = str(model)
        res = run_bench(folder, root / "peer_data", **kwargs)
    return res, label


if __name__ == "__main__":
    # `python -m fam.bench.peer --_worker JSON` measures one side in this fresh process
    # (run_bench's subprocess protocol); users run `fam bench peer`.
    if sys.argv[1:2] != ["--_worker"]:
        sys.exit("this module is the benchmark's worker; run `fam bench peer [...]`")
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
