"""Loading configs: YAML file, then ``key=value`` overrides, then validation.

YAML files (``configs/*.yaml``) mirror the dataclass fields; ``key=value`` overrides on the
command line (torchtune style, dotted for nesting: ``optim.lr=1e-4 lora.r=16``) are applied
on top. Unknown keys are errors, values are converted to the field's type, and the result
is validated (:meth:`fam.config.checks.Validated.validate`) before it is returned.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fam.errors import ConfigError

T = TypeVar("T")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None
        for a in args:
            if a is type(None) and (value is None or (
                    isinstance(value, str) and value.strip().lower() in ("none", "null"))):
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except (ConfigError, ValueError, TypeError):
                continue
        raise ConfigError(f"{key}: cannot convert {value!r} to {tp}", key=key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_convert(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + u for u in unknown)}; "
                          f"valid keys here: {sorted(names)}")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    # Inputs of the config being loaded (not of nested stage templates, filled in later).
    inputs = getattr(cls, "INPUTS", {}) if not prefix else {}
    kwargs = {}
    for k, v in data.items():
        if k in inputs and (v is None or (isinstance(v, str) and not v.strip())):
            # `model=` would otherwise resolve to the current folder.
            raise ConfigError(f"{prefix}{k} is empty: give {inputs[k]} ({prefix}{k}=...)",
                              key=prefix + k)
        tp = hints[k]
        f = defaults[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict) and \
                f.default_factory is not dataclasses.MISSING:
            # Nested section: start from the field's own default (a stage may default
            # e.g. optim.lr differently from OptimConfig), then apply the given keys.
            v = deep_merge(to_dict(f.default_factory()), v)
        kwargs[k] = _convert(v, tp, prefix + k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a config dataclass."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, raw = ov.split("=", 1)
        val = yaml.safe_load(raw) if raw != "" else ""
        cur = data
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        cur[parts[-1]] = val
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; errors name the file (and line) and what to do."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} ({'a folder' if p.is_dir() else 'no such file'}"
                          "; give the path of a YAML file)")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', None) or e}); "
                          "fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; give a YAML config") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, apply ``key=value`` overrides, validate.

    Inputs (``model=``, ``train_dir=``) may still be unset here (the run checks them);
    every other field is validated, so a bad value fails before any work.

    Raises:
        ConfigError: missing/invalid file, unknown key, unconvertible or invalid value.
    """
    data: dict[str, Any] = dict(base or {})
    if path:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate(require_inputs=False)
    return cfg


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
