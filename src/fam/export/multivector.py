"""``fam export --format multivector``: a sentence-transformers ``MultiVectorEncoder`` folder.

The folder is the transformers checkpoint of :mod:`fam.export.st` (merged weights, tokenizer,
processor, fam's chat template) with the late-interaction module stack sentence-transformers 6
builds for a vision-language model, loaded **without** ``trust_remote_code``::

    Transformer (token_embeddings) → Dense (fam's projection, no bias, Identity; only when
    the model has one) → MultiVectorMask → Normalize (token_embeddings)

``config_sentence_transformers.json`` says ``model_type: MultiVectorEncoder`` and the head's
similarity (``maxsim`` / ``meanmaxsim``). The mask reproduces fam's token sets:

- ``content``: every real token except the special tokens and the image block's non-image
  tokens (e.g. Qwen2-VL's ``<|vision_start|>``), as a ``skiplist`` applied to queries and
  documents. A prompt is part of the text in sentence-transformers, so prompt tokens count
  there, as they do in fam for an item without a content span;
- ``all``: every real token (no skiplist).

``image`` and ``text`` have no sentence-transformers counterpart for both sides (its
``keep_only_token_ids`` acts on documents only) and are refused.

Before the folder is moved into place it is loaded with ``MultiVectorEncoder`` and checked
against fam on text, image and image+text probes: token vectors and MaxSim scores within
:data:`PARITY_MAX_ABS` (a failing export is never left behind).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fam.errors import ConfigError
from fam.export.st import (DEFAULT_PROMPTS, ExportError, ExportResult, _check_exportable,
                           _load_merged, _probe_images, _write_hf, _write_json,
                           processor_spec_or_fail, versions, write_transformer_config)

__all__ = ["export_multivector", "check_multivector_export", "PARITY_MAX_ABS", "skiplist"]

#: Largest |Δ| allowed between fam's and sentence-transformers' token vectors and scores
#: (the same float32 forward; kernels differ only in padding and batch shapes).
PARITY_MAX_ABS = 1e-5
EXPORTABLE_TOKENS = ("content", "all")


def skiplist(adapter) -> list[str]:
    """Tokens fam's ``content`` set never counts: special tokens and the image block's
    non-image tokens, except the image token itself."""
    ids = set(int(i) for i in getattr(adapter.tokenizer, "all_special_ids", []))
    block, is_image = adapter.image_block(1)
    ids |= {int(i) for i, img in zip(block, is_image) if not img}
    ids |= set(adapter.bos_ids()) | {adapter.eos_token_id}
    ids.discard(adapter.image_token_id)
    return sorted(adapter.tokenizer.convert_ids_to_tokens(sorted(ids)))


def _write_modules(adapter, head, out: Path, prompts: dict[str, str]) -> None:
    from torch import nn
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    write_transformer_config(adapter, out)
    modules: list[tuple[str, Any]] = []
    if head.proj is not None:
        modules.append(("1_Dense", Dense(head.hidden_size, head.dim, bias=False,
                                         activation_function=nn.Identity(),
                                         init_weight=head.proj.weight.detach().float().cpu(),
                                         module_input_name="token_embeddings")))
    words = skiplist(adapter) if head.tokens == "content" else []
    modules.append(("2_MultiVectorMask", MultiVectorMask(
        words, skiplist_tasks=["query", "document"])))
    modules.append(("3_Normalize", Normalize(module_input_name="token_embeddings")))
    listing = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.base.modules.transformer.Transformer"}]
    for i, (path, module) in enumerate(modules, start=1):
        (out / path).mkdir()
        module.save(str(out / path))
        listing.append({"idx": i, "name": str(i), "path": path,
                        "type": f"{type(module).__module__}.{type(module).__name__}"})
    _write_json(out / "modules.json", listing)
    cfg: dict[str, Any] = {
        "model_type": "MultiVectorEncoder", "prompts": prompts, "default_prompt_name": None,
        "similarity_fn_name": head.similarity,
        "requirements": {"sentence-transformers": {
            "specifier": ">=6.0", "reason": "MultiVectorEncoder (late interaction)"}}}
    if versions():
        cfg["__version__"] = versions()
    _write_json(out / "config_sentence_transformers.json", cfg)


def check_multivector_export(path: str | Path, adapter, head, prompts: dict[str, str],
                             max_abs: float = PARITY_MAX_ABS) -> dict[str, Any]:
    """Load ``path`` with ``MultiVectorEncoder`` and compare token vectors and scores with fam.

    Probes: two text queries (one with the ``query`` prompt), an image with the ``document``
    prompt, an image alone and an image + text. Scores: every query probe against every
    probe, with the head's similarity (:func:`fam.losses.maxsim.maxsim`).

    Returns:
        ``{"max_token_diff", "max_score_diff", "items", "sentence_transformers"}``.

    Raises:
        ExportError: a token count or a difference beyond ``max_abs``.
    """
    import sentence_transformers
    from sentence_transformers import MultiVectorEncoder
    from torch.nn.utils.rnn import pad_sequence

    from fam.data.types import MMItem
    from fam.losses.maxsim import maxsim
    from fam.model import EmbeddingModel
    from fam.model.encode import EncodePipeline

    st = MultiVectorEncoder(str(path), device="cpu")
    im1, im2 = _probe_images()
    qp, dp = prompts.get("query", ""), prompts.get("document", "")
    vqa = "<|image_1|>\nRepresent the given image with the following question: what colour?"
    kw = {"show_progress_bar": False}
    st_tok = [*st.encode(["a red circle left of a blue square"], prompt=qp, **kw),
              *st.encode(["a small green triangle"], prompt="", **kw),
              *st.encode([im1], prompt=dp, **kw), *st.encode([im2], prompt="", **kw),
              *st.encode([{"image": im2, "text": vqa}], prompt="", **kw)]
    items = [MMItem(qp + "a red circle left of a blue square"), MMItem("a small green triangle"),
             MMItem(dp), MMItem(""), MMItem(vqa)]
    _, fam_tok = EncodePipeline(EmbeddingModel(adapter), prefetch=0, multivector=head
                                ).encode_multi(items, [None, None, im1, im2, im2])
    st_tok = [t.float().cpu() for t in st_tok]
    counts = [(len(a), len(b)) for a, b in zip(fam_tok, st_tok)]
    if any(a != b for a, b in counts):
        raise ExportError(f"the export counts other tokens than fam: (fam, st) per probe "
                          f"{counts}; nothing was written")
    tok_diff = max(float((a - b).abs().max()) for a, b in zip(fam_tok, st_tok) if len(a))

    def padded(toks):
        return (pad_sequence(toks, batch_first=True),
                pad_sequence([torch.ones(len(t), dtype=torch.bool) for t in toks], batch_first=True))
    fq, fqm = padded(fam_tok[:2])
    fd, fdm = padded(fam_tok)
    fam_scores = maxsim(fq, fqm, fd, fdm, similarity=head.similarity)
    st_scores = st.similarity(st_tok[:2], st_tok).float().cpu()
    score_diff = float((fam_scores - st_scores).abs().max())
    result = {"max_token_diff": tok_diff, "max_score_diff": score_diff, "items": len(items),
              "similarity": head.similarity,
              "sentence_transformers": sentence_transformers.__version__}
    if tok_diff > max_abs or score_diff > max_abs:
        raise ExportError(f"the export does not reproduce fam's token vectors/scores: max |Δ| "
                          f"tokens {tok_diff:.2e}, scores {score_diff:.2e} (allowed "
                          f"{max_abs:.0e}); nothing was written")
    return result


def export_multivector(model_dir: str | Path, out_dir: str | Path, *,
                       prompts: dict[str, str] | None = None, check: bool = True,
                       overwrite: bool = False, lora: str | Path | None = None) -> ExportResult:
    """Write ``model_dir`` (with its multi-vector head, if trained) as a ``MultiVectorEncoder``
    folder at ``out_dir``; arguments as :func:`fam.export.export_sentence_transformers`.

    Raises:
        ConfigError: unsupported family, input settings or token set; ``out_dir`` exists.
        ExportError: the parity check failed (nothing is left at ``out_dir``).
    """
    from fam.model.multivector import load_multivector
    from fam.utils.checkpoint import atomic_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"--out {out_dir} already exists: choose another folder or pass "
                          "--overwrite")
    import importlib.util
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError("--format multivector writes sentence-transformers modules: install "
                          "it (pip install -e \".[deploy]\", sentence-transformers >= 6)")
    adapter = _load_merged(model_dir, lora)
    _check_exportable(adapter)
    head = load_multivector(model_dir, adapter.hidden_size)
    if head.tokens not in EXPORTABLE_TOKENS:
        raise ConfigError(f"the model's multi-vector head reads tokens={head.tokens!r}, which "
                          f"MultiVectorEncoder cannot reproduce for queries and documents; "
                          f"exportable: {EXPORTABLE_TOKENS}")
    spec = processor_spec_or_fail(adapter)
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    result = ExportResult(out_dir, adapter.family, head.out_dim, prompts)
    adapter.model.eval()
    with atomic_dir(out_dir) as tmp:
        _write_hf(adapter, tmp, spec)
        _write_modules(adapter, head, tmp, prompts)
        (tmp / "README.md").write_text(
            f"# fam multi-vector model ({adapter.family})\n\nLate interaction: "
            f"`MultiVectorEncoder({str(out_dir)!r})`, {head.out_dim}-dim token vectors "
            f"({head.tokens} tokens), similarity `{head.similarity}`. Exported by "
            f"`fam export --format multivector` from `{model_dir}`.\n", encoding="utf-8")
        result.check = (check_multivector_export(tmp, adapter, head, prompts) if check
                        else {"skipped": "--no-check"})
        _write_json(tmp / "fam_export.json", {
            "format": "multivector", "family": adapter.family,
            "source": str(model_dir.resolve()), "dim": head.out_dim, "tokens": head.tokens,
            "similarity": head.similarity, "processor_class": spec["processor_class"],
            "prompts": prompts, "check": result.check})
    return result
