"""Validation of config values: one helper per kind of rule, one base class for every config.

Every config dataclass derives from :class:`Validated`. ``validate()`` first checks each
field against its annotation (an ``int`` field holds an int, a ``float`` field a finite
number, a ``bool`` a bool, a list its element type; nested configs recursively), then the
class's own rules (:meth:`Validated.check`: ranges, known strings, relations between
fields), then that the run's inputs (:attr:`Validated.INPUTS`, e.g. ``model``) are set.
Errors are :class:`~fam.errors.ConfigError` naming the dotted key and what to do.

``fam.config.load_config`` validates at load time (inputs may still be missing there: a
YAML file need not name the model); ``fam.train.run_stage`` validates again, inputs
included, before any work.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, Iterable

from fam.errors import ConfigError

__all__ = ["Validated", "fail", "integer", "integers", "number", "choice", "text", "pair_list",
           "text_cap", "bookkeeping_keys"]


def fail(key: str, value: Any, rule: str) -> None:
    """Raise the ConfigError every check uses: ``key=value: rule``."""
    raise ConfigError(f"{key}={value!r}: {rule}", key=key)


def integer(key: str, value: int, minimum: int | None = None) -> None:
    """An int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        fail(key, value, "must be an integer")
    if minimum is not None and value < minimum:
        fail(key, value, f"must be >= {minimum}; set {key}=<an integer >= {minimum}>")


def integers(cfg: object, prefix: str, **minimums: int) -> None:
    """:func:`integer` for several fields: ``integers(self, prefix, steps=1, threads=0)``."""
    for name, minimum in minimums.items():
        integer(prefix + name, getattr(cfg, name), minimum)


def number(key: str, value: float, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in ``[low, high]`` (an end is excluded when ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        fail(key, value, f"must be a finite number; set {key} to one")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            span = f"in {lo}, {hi}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"{'<' if high_open else '<='} {high:g}"
        fail(key, value, f"must be {span}; set {key} to a value {span}")


def choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """One of ``choices``."""
    choices = list(choices)
    if value not in choices:
        fail(key, value, f"unknown value; choose one of {choices}")


def text(key: str, value: str, what: str) -> None:
    """A non-empty (not only whitespace) string; ``what`` says what to put there."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} is empty: give {what} ({key}=...)", key=key)


def text_cap(key: str, value: Any) -> None:
    """A text-token cap: an int >= 1, ``None`` (no limit) or ``"auto"`` (the prompt format's
    default: 128 for fam, no limit for vlm2vec)."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(key, value, "must be an integer >= 1, none (no limit) or auto")


def pair_list(key: str, value: Any, n: int) -> None:
    """A sequence of exactly ``n`` finite numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        fail(key, value, f"must be a list of {n} numbers")
    for i, v in enumerate(value):
        number(f"{key}[{i}]", v)


def _check_type(key: str, value: Any, tp: Any) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, Validated):
        return  # validated by its own validate()
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return  # an optional field left unset
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            _check_type(key, value, inner[0])
        return
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "must be true or false")
    elif tp is int:
        integer(key, value)
    elif tp is float:
        number(key, value)
    elif tp is str:
        if not isinstance(value, str):
            fail(key, value, "must be a string")
    elif origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(key, value, "must be a list")
        inner = [a for a in args if a is not Ellipsis]
        for i, v in enumerate(value):
            if inner:
                _check_type(f"{key}[{i}]", v, inner[i] if origin is tuple and
                            len(inner) == len(value) else inner[0])
    elif origin is dict:
        if not isinstance(value, dict):
            fail(key, value, "must be a mapping")
        if len(args) == 2:
            for k, v in value.items():
                _check_type(f"{key}.{k}", v, args[1])


class Validated:
    """Base of every config dataclass: ``validate()`` checks every field (module docstring)."""

    #: Fields naming a run's inputs (checkpoint, data files): required when running.
    INPUTS: ClassVar[dict[str, str]] = {}
    #: Fields holding file or folder paths (compared as resolved paths on a rerun).
    PATHS: ClassVar[tuple[str, ...]] = ()
    #: Fields that do not change what a run computes (progress bars, log and checkpoint
    #: cadence, threads, workers, device, where the outputs go): a rerun that changes only
    #: these is the same run (:mod:`fam.train.rerun`).
    BOOKKEEPING: ClassVar[frozenset[str]] = frozenset()

    def check(self, prefix: str) -> None:
        """The class's own rules (ranges, known strings); keys start with ``prefix``."""

    def validate(self, prefix: str = "", *, require_inputs: bool = True) -> None:
        """Raise :class:`~fam.errors.ConfigError` naming the first invalid key.

        Args:
            prefix: dotted path of this config inside an enclosing one (``"optim."``).
            require_inputs: also require :attr:`INPUTS` to be set (off at load time and for
                the stage templates inside experiment presets, whose inputs are filled in
                by the experiment).
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            _check_type(prefix + f.name, value, hints[f.name])
            if isinstance(value, Validated):
                value.validate(f"{prefix}{f.name}.", require_inputs=False)
        self.check(prefix)
        if require_inputs:
            for name, what in self.INPUTS.items():
                text(prefix + name, getattr(self, name), what)


def bookkeeping_keys(cfg: Validated, prefix: str = "") -> set[str]:
    """Dotted keys of every :attr:`Validated.BOOKKEEPING` field in ``cfg``, nested ones too."""
    keys = {prefix + name for name in cfg.BOOKKEEPING}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if isinstance(value, Validated):
            keys |= bookkeeping_keys(value, f"{prefix}{f.name}.")
    return keys
