"""Shared inputs of the reliability suite: a tiny Scenes benchmark, a tiny model, a finished run.

Every case of issue 8 runs the command in-process (``fam.cli.main``) where it can, so the
suite stays fast; the helpers (``reliability_helpers``) return the exit code and everything
the command logged or printed, which must never hold a traceback.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from reliability_helpers import Cli, adapt_args

from fam.cli import main


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """A small Scenes benchmark (read-only: copy it before breaking it)."""
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("rel") / "scenes"
    generate_scenes(ScenesConfig(seed=0, n_train_images=24, n_eval_images=8, n_ood_images=4,
                                 eval_rows=4, n_candidates=4), root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny(scenes, tmp_path_factory) -> Path:
    """A tiny Qwen2-VL whose tokenizer knows the benchmark's words (read-only)."""
    from fam.backbones import build_tiny
    from fam.data.captions import caption_texts
    out = tmp_path_factory.mktemp("rel") / "tiny"
    build_tiny("qwen2_vl", out, size="xs", corpus=caption_texts(scenes / "captions.json"),
               vocab_size=400, seed=0)
    return out


@pytest.fixture(scope="session")
def finished_run(scenes, tiny, tmp_path_factory) -> Path:
    """A finished 2-step adaptation run folder (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    assert main(adapt_args(tiny, scenes, out)) == 0
    return out


@pytest.fixture
def cli(capsys, caplog) -> Cli:
    return Cli(capsys, caplog)


@pytest.fixture(scope="module")
def three_paths(tiny_dirs, tmp_path_factory):
    """The library, ``fam encode`` and ``fam serve`` on one tiny Qwen2-VL (issue 23):
    :class:`contract_paths.ThreePaths`. The CLI's model load is cached for speed."""
    pytest.importorskip("fastapi")
    from contract_paths import ThreePaths
    from fastapi.testclient import TestClient

    import fam.model.encode as encode_module
    from fam.config import ServeConfig
    from fam.serve.app import Service, create_app
    model_dir = tiny_dirs["qwen2_vl"]
    model = encode_module.load_embedding_model(model_dir)
    mp = pytest.MonkeyPatch()
    mp.setattr(encode_module, "load_embedding_model", lambda *a, **k: model)
    try:
        with TestClient(create_app(Service(model, ServeConfig(), model_path=str(model_dir)))) \
                as client:
            yield ThreePaths(model, model_dir, client, tmp_path_factory.mktemp("three"))
    finally:
        mp.undo()
