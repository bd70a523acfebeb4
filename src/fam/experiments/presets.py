"""Experiment presets: the YAML budgets in ``configs/experiments/`` loaded as typed configs.

A preset is named (``demo``, ``demo_quick``, ``ablation_small``, ``projector_compare``, …)
or given as a path. ``extends: <preset>`` at the top of a preset starts from another one
and overrides only the keys it gives. Named presets are read from the source tree's
``configs/experiments`` (an editable install, as the README's) or, for a wheel install,
from the copy pip puts in ``<prefix>/share/fam/configs/experiments`` (pyproject
``data-files``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from fam.config import deep_merge, load_config, read_yaml
from fam.errors import ConfigError

__all__ = ["PRESETS_DIR", "preset_path", "load_preset"]

T = TypeVar("T")
#: ``<repo>/configs/experiments`` (this file is ``<repo>/src/fam/experiments/presets.py``),
#: else the installed copy.
_SOURCE = Path(__file__).resolve().parents[3] / "configs" / "experiments"
_INSTALLED = Path(sys.prefix) / "share" / "fam" / "configs" / "experiments"
PRESETS_DIR = _SOURCE if _SOURCE.is_dir() or not _INSTALLED.is_dir() else _INSTALLED


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name (``demo``) or a path (``my/budget.yaml``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p
    f = PRESETS_DIR / f"{name_or_path}.yaml"
    if not f.is_file():
        known = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
        raise ConfigError(f"no experiment preset {str(name_or_path)!r} in {PRESETS_DIR}; "
                          f"known: {known or 'none (not a source checkout: pass a YAML file)'}")
    return f


def _read(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = preset_path(name_or_path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must name one preset, got {base!r}")
    return deep_merge(_read(base, seen + (path,)), data)


def load_preset(cls: type[T], name_or_path: str | Path, overrides: Sequence[str] = ()) -> T:
    """A validated ``cls`` (e.g. :class:`fam.config.DemoConfig`) from a preset + overrides."""
    return load_config(cls, None, list(overrides), base=_read(name_or_path))
