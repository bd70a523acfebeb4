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
