"""Export a fam model as a sentence-transformers / vLLM folder (``fam export``).

The exported folder is at the same time:

* a **transformers checkpoint** (``config.json``, merged ``model.safetensors`` without the
  unused LM head, tokenizer, ``preprocessor_config.json`` with fam's pixel limits,
  ``processor_config.json``, ``chat_template.jinja``);
* a **sentence-transformers model** (``modules.json``: ``Transformer`` → ``Pooling``
  (last token) → ``Normalize``; ``sentence_bert_config.json`` with the modality config;
  ``1_Pooling/config.json``; ``config_sentence_transformers.json`` with the query/document
  prompts). ``SentenceTransformer(DIR)`` loads it **without** ``trust_remote_code`` and
  encodes text, images and ``{"image": ..., "text": ...}`` inputs to fam's vectors;
* a **vLLM pooling model**: vLLM reads ``modules.json`` and the classic
  ``1_Pooling/config.json`` (``pooling_mode_lasttoken: true``) for last-token pooling and
  normalisation, and the chat template for image inputs.

The chat template writes fam's exact token layout (:mod:`fam.backbones.base`)::

    [bos] <image block + "\\n" for each image the text does not place> <text> <eos>

where the text is the concatenation of the messages' text parts (a sentence-transformers
prompt arrives as a system message, so prompt + text, as fam's instruction + text) and
``<|image_k|>`` in it places the k-th image, as in MMEB data. The processor expands each image
placeholder into the image block with the exported image processor, exactly as the adapter
does. Items whose text exceeds fam's ``max_text_tokens`` (default 128) differ: fam cuts the
text, the export does not.

Before the folder is moved into place the export loads itself with sentence-transformers
(when installed) and checks it against fam on text, image and image+text probes
(cosine ≥ 0.9999); a failing export is never left behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fam.errors import ConfigError, FamError

log = logging.getLogger(__name__)

__all__ = ["export_sentence_transformers", "ExportResult", "chat_template", "DEFAULT_PROMPTS",
           "check_export", "PARITY_MIN_COSINE"]

#: The instructions of the Scenes/MMEB retrieval tasks fam trains on: a text query looking
#: for an image, and an image document (``<|image_1|>`` places the image before the text).
DEFAULT_PROMPTS = {"query": "Find me an everyday image that matches the given caption: ",
                   "document": "<|image_1|>\nRepresent the given image."}
#: Cosine the export must reach against fam on every probe item.
PARITY_MIN_COSINE = 0.9999
#: ``<|image_k|>`` tags the chat template resolves (fam accepts any k; MMEB uses 1).
MAX_IMAGE_TAGS = 16

#: sentence-transformers module type names every version (and vLLM) resolves.
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


class ExportError(FamError):
    """The export could not be written or does not reproduce fam's embeddings."""


@dataclass
class ExportResult:
    """What :func:`export_sentence_transformers` wrote and verified.

    Attributes:
        path: the export folder.
        family: the backbone family.
        dim: embedding dimension.
        prompts: the prompts written to ``config_sentence_transformers.json``.
        check: ``{"min_cosine": ..., "items": n, "sentence_transformers": version}`` of the
            self-check, or ``{"skipped": reason}``.
    """

    path: Path
    family: str
    dim: int
    prompts: dict[str, str]
    check: dict[str, Any] = field(default_factory=dict)


def _jinja_str(s: str) -> str:
    # A JSON string is a valid Jinja string literal (same escapes for quotes, \\n, \\\\).
    return json.dumps(s)


def chat_template(image_placeholder: str, bos: str = "", eos: str = "",
                  max_images: int = MAX_IMAGE_TAGS) -> str:
    """A Jinja chat template writing fam's token layout (see the module docstring).

    Args:
        image_placeholder: the text the processor expands into one image's block.
        bos: text of the tokens fam puts before every sequence ("" if none).
        eos: text of the token fam pools (the last token).
        max_images: ``<|image_k|>`` tags resolved, k = 1..max_images; higher ones are dropped.
    """
    ph, nl = _jinja_str(image_placeholder), _jinja_str("\n")
    return (
        "{#- fam layout: [bos] <image block + newline for each image the text does not place> "
        "<text, <|image_k|> = k-th image> <eos>. Text = all text parts (prompt first). -#}\n"
        '{%- set ns = namespace(text="", n=0, prefix="") -%}\n'
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}"
        "{%- set ns.text = ns.text ~ message['content'] -%}\n"
        "{%- else -%}{%- for part in message['content'] -%}\n"
        "{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.n = ns.n + 1 -%}\n"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}\n"
        "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{%- for k in range(1, {max_images + 1}) -%}}\n"
        "{%- set tag = '<|image_' ~ k ~ '|>' -%}\n"
        f"{{%- if k <= ns.n and tag in ns.text -%}}"
        f"{{%- set ns.text = ns.text | replace(tag, {ph}, 1) | replace(tag, '') -%}}\n"
        f"{{%- elif k <= ns.n -%}}{{%- set ns.prefix = ns.prefix ~ {ph} ~ {nl} -%}}\n"
        "{%- else -%}{%- set ns.text = ns.text | replace(tag, '') -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{{{- {_jinja_str(bos)} ~ ns.prefix ~ ns.text ~ {_jinja_str(eos)} -}}}}"
    )


# ---------------------------------------------------------------------------------- loading
def _load_merged(model_dir: Path):
    """The adapter of a fam model folder, LoRA merged (a peft adapter folder is merged onto
    the base model its ``adapter_config.json`` names)."""
    from fam.backbones import load_backbone
    from fam.model import EmbeddingModel, load_lora, merge_lora

    if (model_dir / "config.json").exists():
        return load_backbone(model_dir)
    cfg_path = model_dir / "adapter_config.json"
    if cfg_path.exists():
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{cfg_path}: no base_model_name_or_path to merge the adapter onto")
        emb = EmbeddingModel(load_backbone(base))
        load_lora(emb, model_dir)
        merge_lora(emb)
        return emb.adapter
    raise ConfigError(f"{model_dir} has neither config.json (a model) nor adapter_config.json "
                      "(a LoRA adapter): pass the folder a training stage wrote, e.g. "
                      "runs/demo/fam/model")


# ---------------------------------------------------------------------------------- writing
def _name_tokens(listed: Sequence[str], named: dict[str, str]) -> dict[str, str]:
    """``extra_special_tokens`` as a name → token mapping (the processor reads names)."""
    out = dict(named)
    taken = set(out.values())
    for tok in listed:
        if tok in taken:
            continue
        base = re.sub(r"\W+", "_", tok).strip("_").lower() or "special"
        name = f"{base}_token"
        i = 1
        while name in out:
            i += 1
            name = f"{base}_{i}_token"
        out[name] = tok
        taken.add(tok)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_hf(adapter, out: Path, spec: dict[str, Any]) -> None:
    model = adapter.hf_model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # The LM head is unused by an embedding model (vLLM's pooling runner deletes it too);
    # a tied head is the embedding table and is kept by the table itself.
    state = {k: v for k, v in model.state_dict().items() if tied or not k.startswith("lm_head.")}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    adapter.tokenizer.save_pretrained(out)
    adapter.image_processor.save_pretrained(out)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    extra = tc.get("extra_special_tokens") or []
    listed = list(extra.values()) if isinstance(extra, dict) else list(extra)
    named = dict(extra) if isinstance(extra, dict) else {}
    named.update(spec.get("named_tokens", {}))
    tc["extra_special_tokens"] = _name_tokens(listed, named)
    for k in ("is_local", "local_files_only", "cache_dir", "_commit_hash"):
        tc.pop(k, None)  # loading options transformers stores; not properties of the tokenizer
    _write_json(tc_path, tc)
    _write_json(out / "processor_config.json",
                {"processor_class": spec["processor_class"], **spec["processor_config"]})
    bos = "".join(adapter.tokenizer.convert_ids_to_tokens(adapter.bos_ids()))
    eos = adapter.tokenizer.convert_ids_to_tokens(adapter.eos_token_id)
    (out / "chat_template.jinja").write_text(chat_template(spec["image_placeholder"], bos, eos),
                                             encoding="utf-8")


def _write_st(adapter, out: Path, prompts: dict[str, str]) -> None:
    dim = adapter.hidden_size
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_NORMALIZE}])
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    max_len = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 32768)
    _write_json(out / "sentence_bert_config.json", {
        # fam never truncates the image block; the context length is the only cap here.
        "max_seq_length": max_len, "do_lower_case": False,
        "transformer_task": "feature-extraction",
        # Every input goes through the chat template ("message"), which writes fam's layout.
        "modality_config": {"text": forward, "image": forward, "image+text": forward,
                            "message": {**forward, "format": "structured"}},
        "module_output_name": "token_embeddings",
        # Padding-free batching would need flash attention; Qwen2-VL's M-RoPE rules it out.
        "unpad_inputs": False})
    # Classic keys (what every sentence-transformers version and vLLM read) plus the
    # current single key.
    pooling = {"word_embedding_dimension": dim, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False,
               "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True,
               "include_prompt": True}
    _write_json(out / "1_Pooling" / "config.json", pooling)
    (out / "2_Normalize").mkdir(exist_ok=True)
    st_cfg: dict[str, Any] = {
        "model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "requirements": {"sentence-transformers": {
            "specifier": ">=5.4", "reason": "multimodal Transformer module (modality_config, "
                                          "chat templates)"}}}
    try:
        import sentence_transformers
        import transformers
        st_cfg["__version__"] = {"sentence_transformers": sentence_transformers.__version__,
                                 "transformers": transformers.__version__,
                                 "pytorch": torch.__version__}
    except ImportError:
        pass
    _write_json(out / "config_sentence_transformers.json", st_cfg)


# ---------------------------------------------------------------------------------- model card
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


def _find_results(model_dir: Path, results: str | Path | None) -> tuple[dict | None, str]:
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


def _model_card(adapter, model_dir: Path, prompts: dict[str, str], spec: dict[str, Any],
                results: str | Path | None) -> str:
    from fam import __version__

    train = _training_info(model_dir)
    res, res_src = _find_results(model_dir, results)
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
              f"Exported by fam {__version__} on {_dt.date.today().isoformat()} from "
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


# ---------------------------------------------------------------------------------- checking
def _probe_images() -> list:
    from PIL import Image, ImageDraw
    ims = []
    for i, (size, col) in enumerate([((112, 112), (220, 30, 30)), ((150, 96), (30, 60, 220))]):
        im = Image.new("RGB", size, (128 + 20 * i, 128, 128))
        ImageDraw.Draw(im).ellipse([8, 8, 60, 60], fill=col)
        ims.append(im)
    return ims


def check_export(path: str | Path, adapter, prompts: dict[str, str],
                 min_cosine: float = PARITY_MIN_COSINE) -> dict[str, Any]:
    """Load ``path`` with sentence-transformers and compare it with fam on probe items.

    Probes: a text query (with the ``query`` prompt), a text without prompt, an image with the
    ``document`` prompt, an image alone, and an image + text with ``<|image_1|>``.

    Returns:
        ``{"min_cosine", "items", "sentence_transformers"}``.

    Raises:
        ExportError: a probe's cosine is below ``min_cosine``.
    """
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from fam.data.types import MMItem
    from fam.inference import EncodePipeline
    from fam.model import EmbeddingModel

    st = SentenceTransformer(str(path), device="cpu")
    im1, im2 = _probe_images()
    qp, dp = prompts.get("query", ""), prompts.get("document", "")
    vqa = "<|image_1|>\nRepresent the given image with the following question: what colour?"
    st_emb = torch.cat([
        st.encode(["a red circle left of a blue square"], prompt=qp, convert_to_tensor=True, show_progress_bar=False),
        st.encode(["a small green triangle"], prompt="", convert_to_tensor=True, show_progress_bar=False),
        st.encode([im1], prompt=dp, convert_to_tensor=True, show_progress_bar=False),
        st.encode([im2], prompt="", convert_to_tensor=True, show_progress_bar=False),
        st.encode([{"image": im2, "text": vqa}], prompt="", convert_to_tensor=True, show_progress_bar=False)]).float()
    items = [MMItem(qp + "a red circle left of a blue square"), MMItem("a small green triangle"),
             MMItem(dp), MMItem(""), MMItem(vqa)]
    fam_emb = EncodePipeline(EmbeddingModel(adapter), prefetch=0).encode(
        items, [None, None, im1, im2, im2])
    cos = torch.nn.functional.cosine_similarity(st_emb.cpu(), fam_emb, dim=-1)
    result = {"min_cosine": float(cos.min()), "items": len(items),
              "sentence_transformers": sentence_transformers.__version__}
    if result["min_cosine"] < min_cosine:
        raise ExportError(f"the export does not reproduce fam's embeddings: cosine "
                          f"{[round(float(c), 6) for c in cos]} (need >= {min_cosine}); "
                          "nothing was written")
    return result


# ---------------------------------------------------------------------------------- entry
def export_sentence_transformers(model_dir: str | Path, out_dir: str | Path, *,
                                 prompts: dict[str, str] | None = None,
                                 results: str | Path | None = None, check: bool = True,
                                 overwrite: bool = False) -> ExportResult:
    """Write ``model_dir`` as a sentence-transformers / vLLM folder at ``out_dir``.

    Args:
        model_dir: a fam model folder (``<run>/model``) or a LoRA adapter folder.
        out_dir: the export folder (written atomically: a temporary sibling, then renamed).
        prompts: query/document prompts (default :data:`DEFAULT_PROMPTS`).
        results: evaluation results for the model card (default: found beside the model).
        check: verify the export with sentence-transformers when it is installed.
        overwrite: replace an existing ``out_dir``.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: unsupported family, a missing model, ``out_dir`` exists.
        ExportError: the self-check failed (nothing is left at ``out_dir``).
    """
    from fam.utils.checkpoint import atomic_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"--out {out_dir} already exists: choose another folder or pass "
                          "--overwrite")
    adapter = _load_merged(model_dir)
    spec = adapter.processor_spec()
    from transformers.models.auto.processing_auto import processor_class_from_name
    if processor_class_from_name(spec["processor_class"]) is None:
        raise ConfigError(f"this transformers has no {spec['processor_class']}: upgrade "
                          "transformers (>= 5.0) to export a {adapter.family} model")
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    result = ExportResult(out_dir, adapter.family, adapter.hidden_size, prompts)
    adapter.model.eval()
    with atomic_dir(out_dir) as tmp:
        _write_hf(adapter, tmp, spec)
        _write_st(adapter, tmp, prompts)
        (tmp / "README.md").write_text(_model_card(adapter, model_dir, prompts, spec, results),
                                       encoding="utf-8")
        if check:
            try:
                import sentence_transformers  # noqa: F401
            except ImportError:
                result.check = {"skipped": "sentence-transformers is not installed "
                                           "(pip install -e \".[deploy]\")"}
            else:
                result.check = check_export(tmp, adapter, prompts)
        else:
            result.check = {"skipped": "--no-check"}
        _write_json(tmp / "fam_export.json", {
            "format": "sentence-transformers", "family": adapter.family,
            "source": str(model_dir.resolve()), "dim": adapter.hidden_size,
            "processor_class": spec["processor_class"], "prompts": prompts,
            "check": result.check})
    return result


# ---------------------------------------------------------------------------------- CLI
def _parse_prompts(pairs: Sequence[str]) -> dict[str, str]:
    prompts = dict(DEFAULT_PROMPTS)
    for p in pairs:
        name, sep, text = p.partition("=")
        if not sep or not name:
            raise ConfigError(f"--prompt {p!r}: expected NAME=TEXT, e.g. --prompt "
                              "query='Find an image of: '")
        prompts[name] = text.encode("utf-8").decode("unicode_escape") if "\\n" in text else text
    return prompts


def cmd_export(args) -> int:
    res = export_sentence_transformers(args.model, args.out, prompts=_parse_prompts(args.prompt),
                                       results=args.results, check=not args.no_check,
                                       overwrite=args.overwrite)
    chk = res.check
    verdict = (f"checked with sentence-transformers {chk['sentence_transformers']}: min cosine "
               f"{chk['min_cosine']:.6f} over {chk['items']} probes" if "min_cosine" in chk
               else f"not checked ({chk['skipped']})")
    print(f"exported the {res.family} model (dim {res.dim}) to {res.path}; {verdict}")
    print(f"use it: SentenceTransformer({str(res.path)!r})  |  vllm serve {res.path} "
          "--runner pooling")
    return 0


def add_export_subcommand(sub) -> None:
    """Register ``fam export`` on the CLI's subparsers."""
    ex = sub.add_parser("export", help="write a sentence-transformers / vLLM folder")
    ex.add_argument("--model", required=True, help="fam model folder (e.g. runs/demo/fam/model)")
    ex.add_argument("--out", required=True, help="export folder")
    ex.add_argument("--format", default="st", choices=["st"],
                    help="st: sentence-transformers (also what vLLM serves)")
    ex.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                    help="set a prompt (repeatable; defaults: query, document for Scenes/MMEB "
                         "retrieval)")
    ex.add_argument("--results", default=None,
                    help="evaluation results JSON for the model card (default: "
                         "<model>/eval_results.json or the demo's results.json)")
    ex.add_argument("--no-check", action="store_true",
                    help="skip the sentence-transformers parity check")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=cmd_export)
