"""Published peft adapters (LoRA, DoRA) on a base backbone: safe reading, then merging.

VLM2Vec publishes its Qwen2-VL and LLaVA-NeXT models as peft adapters for a base checkpoint
(``TIGER-Lab/VLM2Vec-Qwen2VL-2B`` on ``Qwen/Qwen2-VL-2B-Instruct``): ``adapter_config.json``
plus ``adapter_model.bin`` (a ``torch.save`` pickle; its training scripts pass
``--save_safetensors False``) or ``adapter_model.safetensors``. Its training builds the adapter
with ``use_dora=True``, so they are DoRA adapters; its evaluation merges the adapter into the
base weights (``merge_and_unload``), as :func:`merge_peft_adapter` does.

A ``.bin`` file is read only with ``torch.load(..., weights_only=True)``: tensors and plain
containers load, anything else (a pickle that would construct objects or call functions) is
refused before it runs. The keys may use the module names of the transformers version the
adapter was trained with (4.46 for VLM2Vec); peft maps them onto the installed version's.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from fam.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
#: Weight files in the order peft prefers them.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_weights_file(adapter_dir: str | Path) -> Path:
    """The weight file of a peft adapter folder (safetensors preferred).

    Raises:
        ConfigError: not a folder, no ``adapter_config.json`` or no weight file.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ConfigError(f"adapter {d}: no such folder (give the folder holding "
                          f"{ADAPTER_CONFIG} and {' or '.join(WEIGHT_FILES)})")
    if not (d / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"adapter {d}: no {ADAPTER_CONFIG}, so not a peft adapter folder")
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise ConfigError(f"adapter {d}: no weights ({' or '.join(WEIGHT_FILES)})")


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors from a ``.safetensors`` file or, safely, from a ``.bin`` pickle.

    Raises:
        ConfigError: the file holds anything but a mapping of names to tensors; for a
            ``.bin`` that includes any pickled object other than tensors and containers,
            which is refused without being executed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            weights: Any = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            weights = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"{path}: refused to load: the pickle holds more than tensors ({first}); only "
                "weights_only loading is allowed. Convert a trusted file to "
                "adapter_model.safetensors, or get one from the publisher.") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable torch weight file ({e})") from None
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ConfigError(f"{path}: expected a mapping of parameter names to tensors")
    return weights


def to_installed_names(model: torch.nn.Module, weights: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Rename adapter keys written against an older transformers module layout.

    Adapters keep the module paths of the transformers version they were trained with
    (VLM2Vec: 4.46, where Qwen2-VL's language model was ``model.*`` and its vision tower
    ``visual.*``; now ``model.language_model.*`` / ``model.visual.*``). transformers records
    these renamings for loading old base checkpoints (``get_model_conversion_mapping``); they
    are applied here to each key's module path when that path is not in ``model``. Keys whose
    module exists, or that no renaming fixes, are left as they are (the fit check that
    follows names any that still do not match).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        renamings = [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
    except (ImportError, AttributeError, TypeError) as e:  # another transformers layout
        log.debug("no transformers key renamings available (%s); adapter keys kept as saved", e)
        return weights
    modules = {name for name, _ in model.named_modules()}
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in weights.items():
        path, sep, rest = key.removeprefix(prefix).partition(".lora_")
        if key.startswith(prefix) and sep and path not in modules:
            new_path, _ = rename_source_key(path, renamings, [])
            if new_path in modules:
                key = f"{prefix}{new_path}{sep}{rest}"
                renamed += 1
        out[key] = value
    if renamed:
        log.info("renamed %d adapter keys to this transformers version's module names", renamed)
    return out


def merge_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Apply a saved LoRA/DoRA adapter to ``model`` and merge it into the weights.

    Args:
        model: the base transformers model (modified in place and returned unwrapped).
        adapter_dir: a folder with ``adapter_config.json`` and the adapter weights.

    Returns:
        The merged model (no peft wrapper left).

    Raises:
        ConfigError: a bad folder or file, a non-LoRA adapter, or weights that do not fit
            the model (names the first keys that did not match).
    """
    from peft import LoraConfig, PeftConfig, get_peft_model, set_peft_model_state_dict

    weights_file = adapter_weights_file(adapter_dir)
    try:
        cfg = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ConfigError(f"adapter {adapter_dir}: cannot read {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"adapter {adapter_dir}: peft_type {cfg.peft_type} is not supported; "
                          "fam merges LoRA and DoRA adapters")
    weights = to_installed_names(model, read_adapter_weights(weights_file))
    cfg.inference_mode = True
    peft_model = get_peft_model(model, cfg)
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ConfigError(
            f"adapter {adapter_dir} does not fit this base model: "
            + (f"{len(unexpected)} unused adapter weight(s), e.g. {unexpected[:3]}; "
               if unexpected else "")
            + (f"{len(missing)} adapter weight(s) missing, e.g. {missing[:3]}; " if missing else "")
            + "check that --model is the base checkpoint the adapter was trained on")
    n = sum(v.numel() for v in weights.values())
    log.info("merging %s adapter %s (%d tensors, %d values; r=%s, alpha=%s) into the base "
             "weights", "DoRA" if cfg.use_dora else "LoRA", weights_file, len(weights), n,
             cfg.r, cfg.lora_alpha)
    return peft_model.merge_and_unload()
