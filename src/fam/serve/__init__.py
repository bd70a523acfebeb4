"""Serve a trained model over HTTP (``fam serve``): embeddings, search, a search page.

    from fam.serve import ServeConfig, Service, create_app
    app = create_app(Service(model, ServeConfig(max_batch=32), index=index))
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the ``deploy`` extra (FastAPI, uvicorn).
"""
from __future__ import annotations

from fam.config import ServeConfig

__all__ = ["ServeConfig", "Service", "create_app", "load_service", "BatchEncoder"]


def __getattr__(name: str):
    # FastAPI is imported only when the app is asked for (ServeConfig needs nothing extra).
    if name in ("Service", "create_app", "load_service"):
        from fam.serve import app
        return getattr(app, name)
    if name == "BatchEncoder":
        from fam.serve.batching import BatchEncoder
        return BatchEncoder
    raise AttributeError(f"module 'fam.serve' has no attribute {name!r}")
