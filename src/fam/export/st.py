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

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fam.errors import ConfigError, FamError
from fam.export.card import model_card
from fam.export.video import torchvision_missing, video_probes, video_spec_or_fail

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
                  max_images: int = MAX_IMAGE_TAGS, video_placeholder: str | None = None) -> str:
    """A Jinja chat template writing fam's token layout (see the module docstring).

    Args:
        image_placeholder: the text the processor expands into one image's block.
        bos: text of the tokens fam puts before every sequence ("" if none).
        eos: text of the token fam pools (the last token).
        max_images: ``<|image_k|>`` tags resolved, k = 1..max_images; higher ones are dropped.
        video_placeholder: the text the processor expands into one video's block (``--video``
            exports); a video part then goes where ``<|video_1|>`` is, else after the
            unplaced images' blocks followed by a newline, as fam places an item's video.
    """
    ph, nl = _jinja_str(image_placeholder), _jinja_str("\n")
    video = ""
    if video_placeholder is not None:
        vph = _jinja_str(video_placeholder)
        video = ("{%- if ns.v > 0 and '<|video_1|>' in ns.text -%}"
                 f"{{%- set ns.text = ns.text | replace('<|video_1|>', {vph}, 1) -%}}\n"
                 f"{{%- elif ns.v > 0 -%}}{{%- set ns.text = {vph} ~ {nl} ~ ns.text -%}}\n"
                 "{%- endif -%}\n")
    return (
        "{#- fam layout: [bos] <image block + newline for each image the text does not place> "
        "<text, <|image_k|> = k-th image> <eos>. Text = all text parts (prompt first). -#}\n"
        '{%- set ns = namespace(text="", n=0, v=0, prefix="") -%}\n'
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}"
        "{%- set ns.text = ns.text ~ message['content'] -%}\n"
        "{%- else -%}{%- for part in message['content'] -%}\n"
        "{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.n = ns.n + 1 -%}\n"
        "{%- elif part['type'] == 'video' -%}{%- set ns.v = ns.v + 1 -%}\n"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}\n"
        "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        + video +
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
def _load_merged(model_dir: Path, adapter: str | Path | None = None):
    """The backbone of a fam model folder with any peft adapter merged: ``adapter`` on top of
    ``model_dir``, or ``model_dir`` itself when it is an adapter folder (merged onto the base
    model its ``adapter_config.json`` names). Input options are the saved ones
    (``fam_backbone.json``)."""
    from fam.backbones import load_backbone

    if (model_dir / "config.json").exists():
        return load_backbone(model_dir, adapter=adapter)
    cfg_path = model_dir / "adapter_config.json"
    if cfg_path.exists() and adapter is None:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{cfg_path}: no base_model_name_or_path to merge the adapter "
                              "onto; pass the base as --model and this folder as --adapter")
        return load_backbone(base, adapter=model_dir)
    raise ConfigError(f"{model_dir} has neither config.json (a model) nor adapter_config.json "
                      "(a LoRA adapter): pass the folder a training stage wrote, e.g. "
                      "runs/demo/fam/model")


def _check_exportable(adapter) -> None:
    """Refuse input settings a stock processor and chat template cannot reproduce."""
    if adapter.prompt_format != "fam":
        raise ConfigError(f"the model uses prompt_format={adapter.prompt_format!r} (explicit "
                          "sequential positions, no end token), which a sentence-transformers "
                          "folder cannot express; fam export writes prompt_format='fam' models")
    if adapter.image_resolution is not None:
        raise ConfigError(f"the model pre-resizes images (image_resolution="
                          f"{adapter.image_resolution!r}), which the exported processor would "
                          "not do; export a model saved without image_resolution")


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
    adapter.settings.save(out, adapter.family)  # fam loads the export with the same inputs
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
    if "video_processor_config" in spec:
        _write_json(out / "video_preprocessor_config.json", spec["video_processor_config"])
    bos = "".join(adapter.tokenizer.convert_ids_to_tokens(adapter.bos_ids()))
    eos = adapter.tokenizer.convert_ids_to_tokens(adapter.eos_token_id)
    (out / "chat_template.jinja").write_text(
        chat_template(spec["image_placeholder"], bos, eos,
                      video_placeholder=spec.get("video_placeholder")), encoding="utf-8")


def write_transformer_config(adapter, out: Path, video: bool = False) -> None:
    """``sentence_bert_config.json``: the Transformer module reading the folder's checkpoint
    (every input through the chat template) and giving ``token_embeddings``; ``video``: it
    takes ``{"video": frames, "text": ...}`` inputs too."""
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    videos = {"video": forward, "text+video": forward} if video else {}
    max_len = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 32768)
    _write_json(out / "sentence_bert_config.json", {
        # fam never truncates the image block; the context length is the only cap here.
        "max_seq_length": max_len, "do_lower_case": False,
        "transformer_task": "feature-extraction",
        # Every input goes through the chat template ("message"), which writes fam's layout.
        "modality_config": {"text": forward, "image": forward, "image+text": forward, **videos,
                            "message": {**forward, "format": "structured"}},
        "module_output_name": "token_embeddings",
        # Padding-free batching would need flash attention; Qwen2-VL's M-RoPE rules it out.
        "unpad_inputs": False})


def versions() -> dict[str, str]:
    """The sentence-transformers, transformers and torch versions (``__version__`` entry)."""
    try:
        import sentence_transformers
        import transformers
    except ImportError:
        return {}
    return {"sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "pytorch": torch.__version__}


def _write_st(adapter, out: Path, prompts: dict[str, str], video: bool = False) -> None:
    dim = adapter.hidden_size
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_NORMALIZE}])
    write_transformer_config(adapter, out, video)
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
    if versions():
        st_cfg["__version__"] = versions()
    _write_json(out / "config_sentence_transformers.json", st_cfg)


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
                 min_cosine: float = PARITY_MIN_COSINE, video: bool = False) -> dict[str, Any]:
    """Load ``path`` with sentence-transformers and compare it with fam on probe items.

    Probes: a text query (with the ``query`` prompt), a text without prompt, an image with the
    ``document`` prompt, an image alone, and an image + text with ``<|image_1|>``; with
    ``video``, two videos as well (:func:`fam.export.video.video_probes`).

    Returns:
        ``{"min_cosine", "items", "sentence_transformers"}``.

    Raises:
        ExportError: a probe's cosine is below ``min_cosine``.
    """
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from fam.data.types import MMItem
    from fam.model.encode import EncodePipeline
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
    images = [None, None, im1, im2, im2]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fam-export-video-") as tmp:
        if video:
            v_emb, v_items, v_images = video_probes(st, Path(tmp))
            st_emb = torch.cat([st_emb, v_emb.float()])
            items, images = items + v_items, images + v_images
        fam_emb = EncodePipeline(EmbeddingModel(adapter), prefetch=0).encode(items, images)
    cos = torch.nn.functional.cosine_similarity(st_emb.cpu(), fam_emb, dim=-1)
    result = {"min_cosine": float(cos.min()), "items": len(items),
              "sentence_transformers": sentence_transformers.__version__}
    if video:
        result["videos"] = 2
    if result["min_cosine"] < min_cosine:
        raise ExportError(f"the export does not reproduce fam's embeddings: cosine "
                          f"{[round(float(c), 6) for c in cos]} (need >= {min_cosine}); "
                          "nothing was written")
    return result


# ---------------------------------------------------------------------------------- entry
def processor_spec_or_fail(adapter) -> dict:
    """The adapter's processor spec, refused in one line when this transformers lacks its class."""
    from transformers.models.auto.processing_auto import processor_class_from_name
    spec = adapter.processor_spec()
    if processor_class_from_name(spec["processor_class"]) is None:
        raise ConfigError(f"this transformers has no {spec['processor_class']}: upgrade "
                          f"transformers (>= 5.0) to export a {adapter.family} model")
    return spec


def export_sentence_transformers(model_dir: str | Path, out_dir: str | Path, *,
                                 prompts: dict[str, str] | None = None,
                                 results: str | Path | None = None, check: bool = True,
                                 overwrite: bool = False, lora: str | Path | None = None,
                                 video: bool = False) -> ExportResult:
    """Write ``model_dir`` as a sentence-transformers / vLLM folder at ``out_dir``.

    Args:
        model_dir: a fam model folder (``<run>/model``) or a LoRA adapter folder.
        lora: a peft adapter folder to merge into ``model_dir`` first (``--adapter``).
        out_dir: the export folder (written atomically: a temporary sibling, then renamed).
        prompts: query/document prompts (default :data:`DEFAULT_PROMPTS`).
        results: evaluation results for the model card (default: found beside the model).
        check: verify the export with sentence-transformers when it is installed.
        overwrite: replace an existing ``out_dir``.
        video: write transformers' stock processor of the family with its video processor
            (Qwen2-VL/2.5-VL), so sentence-transformers takes ``{"video": frames, "text": ...}``
            natively. That processor needs torchvision to load; without it here the folder is
            written and the check is skipped (said in ``fam_export.json``).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: unsupported family or input settings, a missing model, ``out_dir``
            exists.
        ExportError: the self-check failed (nothing is left at ``out_dir``).
    """
    from fam.utils.checkpoint import atomic_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"--out {out_dir} already exists: choose another folder or pass "
                          "--overwrite")
    adapter = _load_merged(model_dir, lora)
    _check_exportable(adapter)
    spec = processor_spec_or_fail(adapter)
    if video:
        vspec = video_spec_or_fail(adapter)
        spec = {**spec, **vspec, "named_tokens": {**spec.get("named_tokens", {}),
                                                  **vspec["named_tokens"]}}
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    result = ExportResult(out_dir, adapter.family, adapter.hidden_size, prompts)
    adapter.model.eval()
    with atomic_dir(out_dir) as tmp:
        _write_hf(adapter, tmp, spec)
        _write_st(adapter, tmp, prompts, video)
        (tmp / "README.md").write_text(model_card(adapter, model_dir, prompts, spec, results),
                                       encoding="utf-8")
        if check:
            import importlib.util
            if importlib.util.find_spec("sentence_transformers") is None:
                result.check = {"skipped": "sentence-transformers is not installed "
                                           "(pip install -e \".[deploy]\")"}
            elif video and (why := torchvision_missing()):
                result.check = {"skipped": f"--video: {spec['processor_class']} loads a video "
                                           f"processor that needs torchvision, which does not "
                                           f"import here ({why})"}
            else:
                result.check = check_export(tmp, adapter, prompts, video=video)
        else:
            result.check = {"skipped": "--no-check"}
        _write_json(tmp / "fam_export.json", {
            "format": "sentence-transformers", "family": adapter.family,
            "source": str(model_dir.resolve()), "dim": adapter.hidden_size,
            "processor_class": spec["processor_class"], "prompts": prompts, "video": video,
            "check": result.check})
    return result


