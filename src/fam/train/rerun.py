"""A stage rerun into a folder that already holds one: same run, extension, restart or refusal.

Every checkpoint (``state.json``) and every exported model (``fam_config.json``) records
the stage's resolved config (input paths made absolute) and the number of processes. A
rerun compares its own config with the newest record, ignoring the keys that do not change
what the run computes (:attr:`fam.config.checks.Validated.BOOKKEEPING`: output folder,
progress, log/save cadence, threads, workers, device, kernels):

* no difference: the finished model is kept (skip) or the interrupted run resumes;
* differences, ``run.on_change=refuse`` (the default): :class:`RunChanged` lists them
  (exit 2) and says what to do;
* ``run.on_change=extend`` (``--extend``): allowed when the only difference is a higher
  ``optim.steps``; training resumes from the newest checkpoint on the new schedule and the
  model is exported again;
* ``run.on_change=restart`` (``--restart``), or ``run.resume=false``: the stage's outputs
  (checkpoints, model, LoRA adapter, metrics, logs) are removed and it starts over.

Experiments record their own settings the same way (``experiment.json``,
:func:`check_record`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fam.config import bookkeeping_keys, to_dict
from fam.errors import ConfigError
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["RunChanged", "MODEL_RECORD", "resolved_config", "config_sections", "differences",
           "describe", "Previous",
           "previous_run", "decide", "clear_outputs", "write_model_record", "check_record"]

#: The record of an exported model, beside its config.json.
MODEL_RECORD = "fam_config.json"
#: What a stage writes into its out_dir (removed on a restart); nothing else is touched.
STAGE_OUTPUTS = ("checkpoints", "model", "adapter", "tensorboard", "train_metrics.json")
#: The pseudo-key under which a different global batch is reported: ``optim.batch_size``
#: is per process, so the number of processes is part of it.
GLOBAL_BATCH_KEY = "global batch (optim.batch_size x processes)"
_SHOWN = 8  # differences listed in one error line


class RunChanged(ConfigError):
    """The output folder holds a run with other settings (the message lists them)."""


# ---------------------------------------------------------------------------- comparing
def _resolve(value: Any) -> Any:
    """An existing path as an absolute path; anything else (a hub id, "") unchanged."""
    if isinstance(value, str) and value.strip():
        p = Path(value).expanduser()
        if p.exists():
            return str(p.resolve())
    return value


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as saved with checkpoints and models: a dict, input paths absolute."""
    out = to_dict(cfg)
    for name in getattr(cfg, "PATHS", ()):
        out[name] = _resolve(out.get(name))
    return out


def config_sections(cfg: Any, prefix: str = "") -> set[str]:
    """Dotted names of the nested config sections of ``cfg`` (``optim``, ``run``, ...).

    Only these are compared key by key; any other value (a list, a mapping field such as
    ``vein.eligible_override``) is compared whole.
    """
    out: set[str] = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.add(prefix + f.name)
            out |= config_sections(value, f"{prefix}{f.name}.")
    return out


def _flat(d: dict[str, Any], sections: set[str], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix + k in sections:
            out.update(_flat(v, sections, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differences(old: dict[str, Any], new: dict[str, Any], sections: set[str],
                ignore: Iterable[str] = (), paths: Iterable[str] = (),
                defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every key whose value differs (absent: ``None``).

    Args:
        old, new: nested config dicts (:func:`resolved_config`).
        sections: dotted names of the nested sections (:func:`config_sections`).
        ignore: dotted keys that are not differences (bookkeeping).
        paths: dotted keys holding paths, compared resolved (relative == absolute).
        defaults: the config's defaults (nested): a key the old record lacks (a field
            added to fam since) counts as its default, so upgrading fam does not make
            every earlier run "another run".
    """
    ignore, paths = set(ignore), set(paths)
    a, b = _flat(old, sections), _flat(new, sections)
    known = _flat(defaults, sections) if defaults is not None else {}
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        x, y = a.get(key, known.get(key)), b.get(key)
        if key in paths:
            x, y = _resolve(x), _resolve(y)
        if isinstance(x, tuple):
            x = list(x)
        if isinstance(y, tuple):
            y = list(y)
        if x != y:
            out.append((key, x, y))
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """``key: old -> new, ...`` (at most a few, then how many more)."""
    shown = ", ".join(f"{k}: {_short(x)} -> {_short(y)}" for k, x, y in diffs[:_SHOWN])
    more = len(diffs) - _SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------------------- records
@dataclass
class Previous:
    """What a stage's out_dir says about the run it holds.

    Attributes:
        config: the resolved config of the newest record (a checkpoint's when there is
            one: it is newer than the model during an extension).
        world_size: processes of that run (None: not recorded).
        step: the newest checkpoint's step (None: no checkpoint).
        source: the file the config came from.
        model_config: the exported model's config (None: no model or no record).
        has_model: ``<out>/model`` holds a model.
    """

    config: dict[str, Any] | None
    world_size: int | None
    step: int | None
    source: Path | None
    model_config: dict[str, Any] | None
    has_model: bool


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def previous_run(out_dir: Path) -> Previous | None:
    """The run recorded in ``out_dir`` (None: nothing there).

    The newest checkpoint whose ``state.json`` is readable comes first (unreadable ones are
    skipped here as on resume); the exported model's record is read as well.
    """
    from fam.train.checkpoints import STATE_FILE, list_checkpoints
    final = out_dir / "model"
    has_model = (final / "config.json").exists()
    model_rec = _read_json(final / MODEL_RECORD) if has_model else None
    for ck in reversed(list_checkpoints(out_dir / "checkpoints")):
        state = _read_json(ck / STATE_FILE)
        if state is not None and isinstance(state.get("config"), dict):
            return Previous(state["config"], state.get("world_size"), int(state.get("step", 0)),
                            ck / STATE_FILE, model_rec.get("config") if model_rec else None,
                            has_model)
    if model_rec is not None and isinstance(model_rec.get("config"), dict):
        return Previous(model_rec["config"], model_rec.get("world_size"), None,
                        final / MODEL_RECORD, model_rec["config"], has_model)
    if has_model:
        return Previous(None, None, None, None, None, True)
    return None


def _world_size() -> int:
    from fam import distributed as dist_utils
    return dist_utils.world_size() if dist_utils.is_dist() else \
        int(os.environ.get("WORLD_SIZE", "1"))


def _global_batch(diffs: list[tuple[str, Any, Any]], prev: Previous, cfg: Any,
                  ) -> list[tuple[str, Any, Any]]:
    """Compare the global batch (``optim.batch_size`` is per process) instead of its factors.

    Every rank takes its share of the same global batch (fam.train.schedule), so a run
    resumed on half the processes with twice the per-process batch computes the same
    steps; any other change of the process count changes the global batch.
    """
    if prev.world_size is None:
        return diffs
    old_bs = next((x for k, x, _ in diffs if k == "optim.batch_size"), cfg.optim.batch_size)
    old = old_bs * prev.world_size
    new = cfg.optim.batch_size * _world_size()
    rest = [d for d in diffs if d[0] != "optim.batch_size"]
    return rest if old == new else rest + [(GLOBAL_BATCH_KEY, old, new)]


def decide(cfg: Any, stage: str) -> str:
    """What :func:`fam.train.runner.run_stage` does with ``cfg``'s out_dir.

    Returns:
        ``"train"`` (nothing there: start), ``"skip"`` (the same run is finished),
        ``"resume"`` (the same run, unfinished), ``"extend"`` (optim.steps raised, with
        ``run.on_change=extend``) or ``"restart"`` (remove the outputs first).

    Raises:
        RunChanged: the folder holds a run with other settings and ``run.on_change`` does
            not allow this change; lists the differing keys and what to do.
    """
    run = cfg.run
    out = Path(run.out_dir)
    prev = previous_run(out)
    if prev is None:
        return "train"
    if not run.resume:
        return "restart"
    if prev.config is None:
        if run.on_change == "restart":
            return "restart"
        # A model without any record (exported before records existed, or by another
        # tool): nothing to compare with, so it is kept as it is.
        log.warning("%s: %s holds a model without a record of its settings; keeping it "
                     "(use --restart to train it again)", stage, out / "model")
        return "skip"
    current = resolved_config(cfg)
    compare = dict(sections=config_sections(cfg), ignore=bookkeeping_keys(cfg),
                   paths=getattr(cfg, "PATHS", ()), defaults=to_dict(type(cfg)()))
    diffs = _global_batch(differences(prev.config, current, **compare), prev, cfg)
    if not diffs:
        same_model = prev.has_model and (
            not _global_batch(differences(prev.model_config, current, **compare), prev, cfg)
            if prev.model_config is not None else (prev.step or 0) >= cfg.optim.steps)
        return "skip" if same_model else "resume"
    if run.on_change == "restart":
        log.warning("%s: %s held a run with other settings (%s); starting over "
                    "(run.on_change=restart)", stage, out, describe(diffs))
        return "restart"
    old_steps = prev.config.get("optim", {}).get("steps")
    only_steps = [k for k, _, _ in diffs] == ["optim.steps"]
    raised = only_steps and isinstance(old_steps, int) and cfg.optim.steps > old_steps
    if run.on_change == "extend" and raised:
        if prev.step is None:
            raise RunChanged(f"{out}: cannot extend to optim.steps={cfg.optim.steps}: the "
                             f"run's checkpoints are gone ({out / 'checkpoints'}); rerun with "
                             "--restart (run.on_change=restart) to train from the start",
                             key="optim.steps")
        log.info("%s: extending %s from %d to %d steps (run.on_change=extend)", stage, out,
                 old_steps, cfg.optim.steps)
        return "extend"
    what = "a finished" if prev.has_model else "an unfinished"
    todo = ("rerun with --extend (run.on_change=extend) to continue it to "
            f"optim.steps={cfg.optim.steps}, or --restart (run.on_change=restart) to start "
            "over" if raised else
            "rerun with the old settings, use another run.out_dir, or --restart "
            "(run.on_change=restart) to start over")
    if run.on_change == "extend":
        todo = "--extend only raises optim.steps; " + todo
    raise RunChanged(f"{out} holds {what} {stage} run with other settings "
                     f"({prev.source}): {describe(diffs)}. Nothing was changed; {todo}",
                     key=diffs[0][0])


def clear_outputs(out_dir: Path) -> None:
    """Remove what a stage wrote to ``out_dir`` (:data:`STAGE_OUTPUTS`), nothing else."""
    for name in STAGE_OUTPUTS:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_model_record(final: Path, stage: str, name: str, cfg: Any, steps: int) -> None:
    """``<final>/fam_config.json``: the stage, its resolved config and processes."""
    atomic_write_json(final / MODEL_RECORD, {"stage": stage, "name": name, "steps": steps,
                                             "world_size": _world_size(),
                                             "config": resolved_config(cfg)})


# ---------------------------------------------------------------------------- experiments
def check_record(path: Path, kind: str, record: dict[str, Any], sections: set[str],
                 ignore: Iterable[str] = (), defaults: dict[str, Any] | None = None,
                 what_to_do: str = "use another --out, or remove the folder to start over",
                 ) -> None:
    """Compare an experiment's settings with those recorded in ``path``; write them if new.

    Raises:
        RunChanged: the folder holds another kind of experiment or other settings (the
            finished stages and data there were made with those; reusing them would
            relabel their numbers).
    """
    old = _read_json(path) if path.exists() else None
    if old is not None:
        if old.get("experiment") != kind:
            raise RunChanged(f"{path.parent} holds a {old.get('experiment')!r} experiment, "
                             f"not {kind!r}; {what_to_do}")
        diffs = differences(old.get("settings", {}), record, sections, ignore,
                            defaults=defaults)
        if diffs:
            raise RunChanged(f"{path.parent} holds a {kind} run with other settings "
                             f"({path}): {describe(diffs)}. Nothing was changed; "
                             f"{what_to_do}", key=diffs[0][0])
        return
    atomic_write_json(path, {"experiment": kind, "settings": record})
