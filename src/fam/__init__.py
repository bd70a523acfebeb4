"""fam: fine-grained multimodal embedding learning with large vision-language models.

The small public API::

    import fam
    adapter = fam.load_backbone("path/or/hub-id")          # or fam.build_tiny("qwen2_vl")
    model = fam.EmbeddingModel(adapter)
    emb = model.encode([fam.MMItem("<|image_1|>\\nRepresent the given image.", image_path)])
    fam.losses.mac_loss(...); fam.losses.info_nce(...)
    fam.evaluate(model, "mmeb/eval", image_root="mmeb")
    model = fam.load_embedding_model("runs/demo/fam/model")  # inference: no LM head
    emb = fam.EncodePipeline(model, batch_size=32).encode(items)
    fam.export_sentence_transformers("runs/demo/fam/model", "exports/fam")

Training stages (``fam.train``) and the CLI (``fam``) are thin layers on top. Imports are
lazy so ``import fam`` stays cheap and works without the training extras.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": ("fam.backbones", "load_backbone"),
    "build_tiny": ("fam.backbones", "build_tiny"),
    "EmbeddingModel": ("fam.model", "EmbeddingModel"),
    "load_embedding_model": ("fam.model.encode", "load_embedding_model"),
    "EncodePipeline": ("fam.model.encode", "EncodePipeline"),
    "export_sentence_transformers": ("fam.export", "export_sentence_transformers"),
    "MMItem": ("fam.data.types", "MMItem"),
    "evaluate": ("fam.eval.mmeb", "evaluate"),
    "load_train": ("fam.data.mmeb", "load_train"),
    "load_eval": ("fam.data.mmeb", "load_eval"),
    "losses": ("fam.losses", None),
    "DataError": ("fam.errors", "DataError"),
    "FamError": ("fam.errors", "FamError"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fam' has no attribute {name!r}")
    mod, attr = _LAZY[name]
    m = importlib.import_module(mod)
    return m if attr is None else getattr(m, attr)
