"""The model card (README.md) of an export: training record, results table, usage.

The training record is what a fam run leaves beside ``<run>/model``: ``train_metrics.json``
(stage, steps, seconds, final terms) and the newest ``checkpoints/step-*/state.json`` (the
stage's resolved config). Results come from ``--results``, ``<model>/eval_results.json``
(``fam eval``'s default output) or this model's entry of a ``results.json`` written by
``fam demo`` up to two folders above.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from fam.errors import ConfigError

__all__ = ["model_card", "find_results"]


def _fam_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fam")
    except PackageNotFoundError:
        return "unknown"


def _training_info(model_dir: Path) -> dict[str, Any]:
    """The stage, config and final metrics a fam training run left beside ``model_dir``."""
    run = model_dir.resolve().parent
    info: dict[str, Any] = {}
    metrics = run / "train_metrics.json"
    if metrics.exists():
        info["metrics"] = json.loads(metrics.read_text())
    ckpts = sorted((run / "checkpoints").glob("step-*/state.json"),
                   key=lambda p: int(p.parent.name.split("-")[1])) \
        if (run / "checkpoints").is_dir() else []
    if ckpts:
        state = json.loads(ckpts[-1].read_text())
        info["stage"], info["config"] = state.get("name"), state.get("config")
    return info


def _same_model(recorded: str, model_dir: Path) -> bool:
    """Whether a path recorded in a results file (absolute, or relative to the cwd of the run
    that wrote it) names ``model_dir``."""
    rec, here = Path(recorded), model_dir.resolve()
    if rec.is_absolute():
        return rec.resolve() == here
    return len(rec.parts) <= len(here.parts) and here.parts[-len(rec.parts):] == rec.parts


def find_results(model_dir: Path, results: str | Path | None) -> tuple[dict | None, str]:
    """Evaluation results for the model: ``results`` if given, ``<model>/eval_results.json``
    (``fam eval``'s default), or this model's entry of a ``results.json`` (``fam demo``) up to
    two folders above."""
    if results is not None:
        data = json.loads(Path(results).read_text())
        if "models" in data and "paths" in data:
            for name, p in data["paths"].items():
                if _same_model(p, model_dir) and name in data["models"]:
                    return data["models"][name], f"{results} ({name})"
            raise ConfigError(f"{results} has no results for {model_dir} (models: "
                              f"{sorted(data['paths'])})")
        return data, str(results)
    own = model_dir / "eval_results.json"
    if own.exists():
        return json.loads(own.read_text()), str(own)
    for up in list(model_dir.resolve().parents)[:3]:
        f = up / "results.json"
        if f.exists():
            data = json.loads(f.read_text())
            for name, p in (data.get("paths") or {}).items():
                if _same_model(p, model_dir) and name in data.get("models", {}):
                    return data["models"][name], f"{f} ({name})"
    return None, ""


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.1f}"


def _results_table(res: dict[str, Any]) -> str:
    rows = ["| dataset | meta-task | split | n | precision@1 | chance |",
            "|---|---|---|---|---|---|"]
    for name, d in sorted(res.get("datasets", {}).items(),
                          key=lambda kv: (kv[1].get("meta_task", ""), kv[0])):
        rows.append(f"| {name} | {d.get('meta_task', '')} | {d.get('split', '')} | "
                    f"{d.get('n', '')} | {_fmt(d.get('precision@1'))} | {_fmt(d.get('chance'))} |")
    chance = res.get("chance", {})
    for task, v in (res.get("meta_task") or {}).items():
        rows.append(f"| **{task}** | | | | {_fmt(v)} | "
                    f"{_fmt((chance.get('meta_task') or {}).get(task))} |")
    for key in ("IND", "OOD", "overall"):
        if key in res:
            rows.append(f"| **{key}** | | | | {_fmt(res[key])} | {_fmt(chance.get(key))} |")
    return "\n".join(rows)


def model_card(adapter, model_dir: Path, prompts: dict[str, str], spec: dict[str, Any],
               results: str | Path | None) -> str:
    """The export's README.md: what the model is, how it was trained, its results, usage."""
    train = _training_info(model_dir)
    res, res_src = find_results(model_dir, results)
    cfg = train.get("config") or {}
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: feature-extraction",
             "tags:", "- sentence-transformers", "- feature-extraction", "- multimodal",
             "- image-text-retrieval", "- fam", "- vlm2vec"]
    if isinstance(cfg.get("model"), str) and not Path(cfg["model"]).exists():
        lines.append(f"base_model: {cfg['model']}")  # a hub id, not a local folder
    lines += ["---", "", f"# {model_dir.resolve().name}: a fam multimodal embedding model", "",
              f"A {type(adapter.hf_model).__name__} turned into a universal multimodal "
              f"embedding model with fam (VLM2Vec recipe: last-token "
              f"pooling, L2 normalisation; FAM: MAC alignment + VEIN adaptation). "
              f"Embedding dimension **{adapter.hidden_size}**, cosine similarity. "
              f"Exported by fam {_fam_version()} on {_dt.date.today().isoformat()} from "
              f"`{model_dir}`.", "", "## How it was trained", ""]
    if train:
        stage = train.get("stage") or (train.get("metrics") or {}).get("stage")
        m = train.get("metrics") or {}
        lines.append(f"- stage: `{stage}`" + (f", {m.get('steps')} steps in "
                                              f"{m.get('seconds', 0):.0f} s" if m else ""))
        for key in ("model", "train_dir", "subsets", "temperature", "hard_negatives",
                    "full_finetune", "max_text_tokens"):
            if key in cfg:
                lines.append(f"- {key}: `{cfg[key]}`")
        for group in ("optim", "lora", "vein", "mac"):
            if isinstance(cfg.get(group), dict):
                kv = ", ".join(f"{k}={v}" for k, v in cfg[group].items()
                               if not isinstance(v, (dict, list)))
                lines.append(f"- {group}: {kv}")
        if m.get("final"):
            lines.append("- final training terms: " + ", ".join(
                f"{k}={v:.4g}" for k, v in m["final"].items() if isinstance(v, (int, float))))
    else:
        lines.append("No training record was found beside the model folder (fam writes "
                     "`train_metrics.json` and `checkpoints/step-*/state.json` next to "
                     "`model/`).")
    lines += ["", "## Results", ""]
    if res:
        lines += [f"MMEB protocol (precision@1, %), from `{res_src}`:", "", _results_table(res)]
    else:
        lines.append("No evaluation results were found (run `fam eval --model DIR --data ...` "
                     "before exporting, or pass `--results`).")
    ph = spec["image_placeholder"]
    q, dprompt = json.dumps(prompts.get("query", "")), json.dumps(prompts.get("document", ""))
    lines += [
        "", "## Usage (sentence-transformers, no remote code)", "",
        "```python", "from sentence_transformers import SentenceTransformer",
        "from PIL import Image", "", "model = SentenceTransformer(\"path/to/this/folder\")",
        "q = model.encode_query([\"a red circle left of a blue square\"])  # prompt 'query'",
        "d = model.encode_document([Image.open(\"scene.png\")])             # prompt 'document'",
        "qa = model.encode([{\"image\": Image.open(\"scene.png\"),",
        "                    \"text\": \"<|image_1|>\\nRepresent the given image with the "
        "following question: what colour is the circle?\"}])",
        "print(model.similarity(q, d))", "```", "",
        f"Prompts: `query` = {q}, `document` = {dprompt}. A prompt is prepended to the "
        "input's text (`<|image_1|>` places the image); pass `prompt=\"\"` for inputs that "
        "need no instruction (e.g. text candidates).", "",
        "On a CPU machine without torchvision this loads as is: the processor class "
        f"(`{spec['processor_class']}`) needs no video processor.", "",
        "## Usage (vLLM)", "", "```bash",
        "vllm serve path/to/this/folder --runner pooling --max-model-len 4096",
        "```", "",
        "vLLM reads `modules.json` and `1_Pooling/config.json` (last-token pooling, normalised). "
        "Send images through the chat form of `/v1/embeddings` "
        "(`{\"model\": ..., \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": "
        "\"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}, {\"type\": "
        "\"text\", \"text\": \"Represent the given image.\"}]}]}`): the chat template writes "
        "fam's layout. Send text the same way; a bare `input` string is tokenized without the "
        "end token that this model pools.", "",
        "## Token layout", "",
        "`[bos] <image + newline for each image the text does not place> <text> <eos>`, "
        f"the image written as `{ph}` and expanded by the processor; the embedding is the "
        "L2-normalised last hidden state of `<eos>`. `<|image_k|>` in the text places the "
        "k-th image (MMEB convention). fam cuts text after `max_text_tokens` (128) tokens; "
        "this export does not, so longer texts embed differently.", ""]
    return "\n".join(lines)
