"""Scenes → tiny model → stage 0: the start every experiment shares, and its run folders.

Each experiment (demo, ablation, projector comparison) builds the Scenes benchmark, a
tiny random-initialised model whose tokenizer is trained on the benchmark's texts, and a
stage-0 checkpoint, then trains its own stages from that checkpoint. Every function here
skips work whose result is already on disk, so an experiment re-run with the same folder
resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, TypeVar

from fam.config import RunConfig, SceneModelConfig, ScenesConfig, Stage0Config
from fam.data.captions import caption_texts, read_json_list
from fam.utils.threads import use_threads

__all__ = ["start_experiment", "Timings", "stage_run", "prepare_scenes", "prepare_tiny",
           "stage0_config", "base_model", "num_layers"]

C = TypeVar("C", bound=SceneModelConfig)


def start_experiment(exp: C, out: str | Path, kind: str, identity: dict[str, Any] | None = None,
                     **overrides: Any) -> tuple[C, Path]:
    """The experiment's config with ``overrides`` applied (``None`` keeps a field),
    validated before any work; the output folder created and checked writable; torch
    threads set.

    The settings (the config, plus ``identity``, e.g. the demo's seed) are recorded in
    ``<out>/experiment.json``; a rerun into the same folder with other settings is refused
    (:class:`fam.train.rerun.RunChanged`), because the data, models and stages already
    there were made with the recorded ones and would be reported under the new ones.
    """
    from fam.config import bookkeeping_keys, to_dict
    from fam.train.rerun import check_record, config_sections
    from fam.utils.io import output_dir

    exp = dataclasses.replace(exp, **{k: v for k, v in overrides.items() if v is not None})
    exp.validate(require_inputs=False)
    out = output_dir(out, "--out")
    check_record(out / "experiment.json", kind, {"config": to_dict(exp), **(identity or {})},
                 sections={"config"} | {f"config.{s}" for s in config_sections(exp)},
                 ignore={f"config.{k}" for k in bookkeeping_keys(exp)},
                 defaults={"config": to_dict(type(exp)())})
    # Tiny models gain little from intra-op threads, and on a busy 2-core machine
    # OpenMP spin-waiting makes 2 threads up to 10x slower than 1 (measured).
    use_threads(exp.threads)
    return exp, out


class Timings(dict):
    """Wall time per phase, in seconds: ``with timings("data"): ...``; ``total`` since creation."""

    def __init__(self) -> None:
        super().__init__()
        self._start = time.time()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self[name] = time.time() - t

    def finish(self) -> dict[str, float]:
        self["total"] = time.time() - self._start
        return dict(self)


def stage_run(template: RunConfig, out_dir: Path, seed: int, exp: SceneModelConfig,
              progress: bool) -> RunConfig:
    """A stage's run section: the template's, with the experiment's folder and settings."""
    return dataclasses.replace(template, out_dir=str(out_dir), seed=seed,
                               save_every=exp.save_every, progress=progress,
                               log_every=max(1, (exp.save_every or 50) // 2),
                               threads=exp.threads)


def prepare_scenes(data: Path, scenes: ScenesConfig, progress: bool = True) -> Path:
    """Generate the benchmark into ``data`` unless a complete one is there."""
    from fam.data.scenes import generate_scenes
    if not (data / "scenes.json").exists():
        generate_scenes(scenes, data, progress=progress)
    return data


def prepare_tiny(root: Path, data: Path, exp: SceneModelConfig, seed: int) -> Path:
    """``<root>/models/tiny``: the random initialisation (tokenizer trained on ``data``)."""
    from fam.backbones import build_tiny
    tiny = root / "models" / "tiny"
    if not (tiny / "config.json").exists():
        corpus = caption_texts(data / "captions.json")
        qa = data / "qa.json"
        if exp.qa and qa.exists():
            corpus += [q["question"] + " " + q["answer"] for q in read_json_list(qa)]
        # Saved with stage 0's text cap, the first training it gets (and what the later
        # stages record), so loading it for stage 0 or evaluation warns of no difference.
        build_tiny(exp.model.family, tiny, size=exp.model.size,
                   image_size=exp.scenes.image_size, corpus=corpus, seed=seed,
                   max_text_tokens=exp.stage0.max_text_tokens)
    return tiny


def stage0_config(exp: SceneModelConfig, data: Path, tiny: Path, root: Path, seed: int,
                  progress: bool) -> Stage0Config:
    """The stage-0 config of an experiment: its template with inputs and run folder."""
    qa = data / "qa.json"
    return dataclasses.replace(
        exp.stage0, model=str(tiny), captions=str(data / "captions.json"),
        qa=str(qa) if exp.qa and qa.exists() else "", image_root=str(data),
        run=stage_run(exp.stage0.run, root / "stage0", seed, exp, progress))


def base_model(root: Path, data: Path, exp: SceneModelConfig, seed: int,
               progress: bool) -> tuple[Path, Path]:
    """``(tiny, stage0 model)`` under ``root``, built (or found) for ``seed``."""
    from fam.train.runner import run_stage
    tiny = prepare_tiny(root, data, exp, seed)
    return tiny, run_stage(stage0_config(exp, data, tiny, root, seed, progress))


def num_layers(model_dir: Path) -> int:
    """Language-model layers of a saved checkpoint (from its ``config.json``)."""
    import json
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    return int(text["num_hidden_layers"])
