"""Checks of a checkpoint before and after it is loaded, with errors that name the file.

transformers fills whatever a ``config.json`` leaves out with the defaults of a 7B model
(an incomplete config then allocates tens of GB and the process is killed), quietly
initialises weights the files do not hold, builds an empty tokenizer when the tokenizer
files are missing (every text encodes to nothing, results sit at chance level), and loads
NaN weights as they are. Each of these is caught here, before any work, as a
:class:`~fam.errors.DataError` naming the folder or file and what to do.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from fam.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["resolve_model", "read_config", "check_weights", "check_finite", "check_tokenizer",
           "load_error"]

#: Weights may hold up to this fraction fewer parameters than the config describes
#: (rounding of buffers saved as parameters); more means the config is not theirs.
_PARAM_SLACK = 0.02


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/") or Path(name).suffix in (".json", ".safetensors", ".bin"))


def resolve_model(path: str | Path) -> Path | str:
    """A local checkpoint folder (as a Path) or a hub id (as a str).

    Raises:
        DataError: the path is a file, or a local-looking path that does not exist.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise DataError("is a file; give the checkpoint folder (config.json + weights)", p)
    name = str(path)
    if not name.strip() or _looks_like_path(name):
        raise DataError("model folder not found; give a checkpoint folder (config.json + "
                        "weights) or a hub id like Qwen/Qwen2-VL-2B-Instruct", p)
    return name


def load_error(path: str | Path, e: BaseException) -> DataError:
    """A loader's exception (transformers, safetensors, tokenizers) as one line naming ``path``."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return DataError(f"cannot load the checkpoint ({type(e).__name__}: {first}); check that "
                     "the folder is a complete save_pretrained checkpoint", path)


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint (a local folder or a hub id in the local cache).

    Raises:
        DataError: no config.json, invalid JSON (names the line), no ``model_type``, or a
            hub id that is neither a local folder nor available offline.
    """
    src = resolve_model(path)
    if isinstance(src, str):
        from transformers import PretrainedConfig
        try:
            cfg = PretrainedConfig.get_config_dict(src)[0]
        except (OSError, ValueError) as e:
            raise DataError(f"no local folder of that name, and the hub model cannot be "
                            f"read ({str(e).strip().splitlines()[0][:200]}); give a local "
                            "checkpoint folder, or download the model first (the hub is "
                            "offline when HF_HUB_OFFLINE=1)", src) from None
        where: str | Path = src
    else:
        where = src / "config.json"
        if not where.is_file():
            raise DataError("no config.json: not a checkpoint folder (save_pretrained "
                            "writes config.json and the weights)", src)
        try:
            cfg = json.loads(where.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg}, column {e.colno})", where, e.lineno) \
                from None
        except UnicodeDecodeError:
            raise DataError("not a UTF-8 JSON file", where) from None
    if not isinstance(cfg, dict):
        raise DataError("expected a JSON object", where)
    if not isinstance(cfg.get("model_type"), str):
        raise DataError("no model_type: the config does not say which architecture it is",
                        where, None, "model_type")
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def check_weights(folder: Path, model_class: Any) -> None:
    """The weights files are readable and hold every parameter the config describes.

    Reads only the safetensors headers, and builds the model from ``config.json`` on the
    meta device (no memory) to count its parameters, so an incomplete or foreign config
    fails here instead of allocating a default-sized model or initialising missing
    weights at random.

    Raises:
        DataError: no weights, a truncated or corrupt file, or a config that describes
            more parameters than the weights hold.
    """
    from safetensors import SafetensorError, safe_open
    files = _weight_files(folder)
    if not files:
        if list(folder.glob("pytorch_model*.bin")):
            return  # legacy weights: transformers reads them (restricted unpickler)
        raise DataError("no weights (model.safetensors) in the checkpoint folder; was the "
                        "save interrupted, or is this the wrong folder?", folder)
    n_weights = 0
    has_head = False
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    n_weights += math.prod(st.get_slice(key).get_shape())
                    has_head = has_head or "lm_head." in key
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"truncated or corrupt weights file ({e}); copy it again or "
                            "re-export the model", f) from None
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = model_class()._from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # The config builds no model of this family (missing or ill-typed fields).
        raise DataError(f"config.json does not describe a valid model "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})",
                        folder / "config.json") from None
    # An embedding export (fam export) leaves out the untied LM head: it is never used.
    n_config = sum(p.numel() for name, p in model.named_parameters()
                   if has_head or "lm_head." not in name)
    if n_config > n_weights * (1 + _PARAM_SLACK):
        raise DataError(f"config.json describes a model of {n_config:,} parameters but the "
                        f"weights hold {n_weights:,}: the config is incomplete (missing sizes "
                        "default to a large model) or belongs to another checkpoint",
                        folder / "config.json")


def check_finite(model: torch.nn.Module, where: str | Path) -> None:
    """Every floating-point parameter and buffer of a loaded model is finite.

    Raises:
        DataError: naming the first non-finite tensor and how many there are.
    """
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DataError(f"the weights hold NaN or inf in {len(bad)} tensor(s) (first: "
                        f"{bad[0]}); the checkpoint is broken (a diverged training run?)",
                        where)


def check_tokenizer(tokenizer: Any, where: str | Path) -> None:
    """The tokenizer was really loaded (not built empty because its files are missing).

    Raises:
        DataError: the tokenizer turns text into no tokens, or has almost no vocabulary.
    """
    probe = tokenizer("a photo of a red circle", add_special_tokens=False)["input_ids"]
    if len(tokenizer) < 16 or not probe:
        present = sorted(p.name for p in Path(where).glob("*token*")) \
            if Path(where).is_dir() else []
        raise DataError(f"the tokenizer is empty (vocabulary {len(tokenizer)}; tokenizer "
                        f"files here: {present or 'none'}); copy tokenizer.json and "
                        "tokenizer_config.json from the base checkpoint", where)
