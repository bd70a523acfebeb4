"""Which model made these vectors: a content hash of a checkpoint.

An index is only searchable with queries embedded by the model that embedded its items (other
weights, tokenizer or image processor give vectors in another space, and the scores would be
meaningless without any error). The identity is a SHA-256 over the files that decide the
embedding — weights, ``config.json``, tokenizer and image-processor files — so a retrained model
saved to the same folder is a different model, and a copied folder is the same model.
``fam_backbone.json`` (the input layout a model is loaded with: prompt format, image
resolution, text cap) is part of it; so are a merged peft adapter and input options given at
load time (``fam encode --adapter/--prompt-format/...``), which change the vectors too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from fam.errors import ConfigError

log = logging.getLogger(__name__)

#: Files whose bytes decide the embedding (weights, architecture, tokenizer, image processing).
#: Generation settings, chat templates (fam builds its token layout itself), model cards and
#: ``eval_results.json`` (which ``fam eval`` writes into the model folder) do not.
_IDENTITY_NAMES = frozenset({
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "preprocessor_config.json", "processor_config.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json", "fam_backbone.json", "adapter_config.json",
})
_IDENTITY_SUFFIXES = (".safetensors", ".bin")


def _model_dir(model: str | Path) -> Path:
    p = Path(model)
    if p.is_dir():
        return p
    # A hub id: hash the files of its locally cached snapshot (nothing is downloaded).
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "no local copy"
        raise ConfigError(f"model {model!r} is neither a folder nor a hub id cached on this "
                          f"machine ({type(e).__name__}); pass a checkpoint folder") from None


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def identity_files(model: str | Path) -> list[Path]:
    """The files of a checkpoint that :func:`model_identity` hashes, sorted by name."""
    d = _model_dir(model)
    files = sorted(f for f in d.iterdir() if f.is_file() and (
        f.name in _IDENTITY_NAMES or f.suffix in _IDENTITY_SUFFIXES))
    if not any(f.suffix in _IDENTITY_SUFFIXES for f in files):
        raise ConfigError(f"{d} holds no weights (*.safetensors or *.bin): not a checkpoint "
                          "folder")
    return files


def model_identity(model: str | Path, adapter: str | Path | None = None,
                   options: dict[str, Any] | None = None) -> str:
    """``sha256:<hex>`` over the names and contents of the checkpoint's identity files.

    Args:
        model: a checkpoint folder or a hub id cached locally.
        adapter: a peft adapter folder merged into the model at load time.
        options: input options given at load time that override ``fam_backbone.json``
            (prompt format, image resolution, pixel budget, text cap; not dtype or device).

    Raises:
        ConfigError: the folder holds no weights, or the hub id is not cached.
    """
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for f in identity_files(model):
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    if adapter is not None:
        for f in identity_files(adapter):
            h.update(b"adapter/" + f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    if options:
        h.update(b"options\0" + json.dumps(options, sort_keys=True, default=str).encode())
    dt = time.perf_counter() - t0
    if dt > 2:
        log.info("hashed the model's files in %.1f s", dt)
    return "sha256:" + h.hexdigest()


def short(identity: str) -> str:
    """A readable prefix of an identity (``sha256:1a2b3c4d5e6f``)."""
    algo, _, hexd = identity.partition(":")
    return f"{algo}:{hexd[:12]}" if hexd else identity
