"""The architecture's rules stay true (docs/architecture.md): layering, config home, sizes."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fam"

#: package -> the fam packages it may import (lazy imports inside functions included).
#: Top-level modules count as packages (``errors``, ``distributed``).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "distributed": set(),
    "utils": {"errors"},
    "config": {"errors"},
    "data": {"config", "errors", "utils"},
    "backbones": {"data", "errors", "utils"},
    "model": {"backbones", "config", "data", "errors", "utils"},
    "losses": {"distributed", "errors", "utils"},
    "eval": {"data", "errors", "losses", "utils"},
    "pad": {"data", "errors", "utils"},
    "analysis": {"backbones", "config", "data", "errors", "losses", "model", "pad", "utils"},
    "train": {"backbones", "config", "data", "distributed", "errors", "losses", "model",
              "utils"},
    "projector": {"analysis", "backbones", "config", "data", "errors", "losses", "model", "pad",
                  "train", "utils"},
    "index": {"backbones", "config", "data", "errors", "losses", "model", "utils"},
    "serve": {"backbones", "config", "data", "errors", "index", "model", "utils"},
    "bench": {"backbones", "config", "data", "distributed", "errors", "export", "index",
              "losses", "model", "train", "utils"},
    "experiments": {"analysis", "backbones", "config", "data", "errors", "eval", "model",
                    "projector", "train", "utils"},
    "export": {"backbones", "config", "data", "errors", "losses", "model", "utils"},
    "cli": {"analysis", "backbones", "bench", "config", "data", "errors", "eval",
            "experiments", "export", "index", "model", "pad", "projector", "serve", "train",
            "utils"},
    "__init__": set(),
    "__main__": {"cli"},
}
#: The projector unit's training side: like train/, it never reaches fam.analysis.
PROJECTOR_TRAINING = ("fam.projector.recipe", "fam.projector.hooks", "fam.projector.regions",
                      "fam.projector.geometry")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        out.append((rel.parts[0].removesuffix(".py"), p))
    return out


def _fam_imports(path: Path) -> set[str]:
    """Every ``fam.<package>`` a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "fam" else \
                [f"fam.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("fam.")}
    return found


def test_every_package_is_in_the_rule_table():
    assert {pkg for pkg, _ in _modules()} <= set(ALLOWED)


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(pkg):
    bad = {}
    for p, path in _modules():
        if p == pkg:
            extra = _fam_imports(path) - ALLOWED[pkg] - {pkg}
            if extra:
                bad[str(path.relative_to(SRC))] = sorted(extra)
    assert not bad, f"{pkg} may import {sorted(ALLOWED[pkg])}; found {bad}"


def test_training_never_imports_analysis_even_indirectly():
    train = sorted(f"fam.train.{p.stem}" for p in (SRC / "train").glob("*.py")
                   if p.stem != "__init__")
    code = ("import sys\n"
            f"for m in {train + list(PROJECTOR_TRAINING)!r}:\n"
            "    __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('fam.analysis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"training imports analysis modules: {out}"


def test_config_dataclasses_live_in_the_config_home():
    outside = []
    for pkg, path in _modules():
        if pkg == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Plan")) and \
                    node.name != "ConfigError":
                outside.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not outside, f"config classes outside fam.config: {outside}"


def test_every_config_dataclass_validates():
    import fam.config as C
    from fam.config.checks import Validated
    classes = [getattr(C, n) for n in C.__all__ if isinstance(getattr(C, n), type)
               and dataclasses.is_dataclass(getattr(C, n))]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, Validated), cls
        cls().validate(require_inputs=False)  # the defaults are valid


def test_library_files_are_short_or_say_why():
    long = []
    for pkg, path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        if len(lines) > 500 and "Length:" not in doc:
            long.append(f"{path.relative_to(SRC)} ({len(lines)} lines)")
    assert not long, f"over 500 lines without a 'Length:' reason in the docstring: {long}"


def test_constants_shared_across_layers_agree():
    from fam.backbones import NATIVE_FAMILIES
    from fam.config.experiments import TINY_FAMILIES
    from fam.config.stages import PATCH_POOLINGS, VEIN_MASK_INITS, VEIN_MEMORIES
    from fam.losses.patch import POOLINGS
    from fam.losses.vein import MASK_INITS, VEIN_MEMORY
    assert tuple(PATCH_POOLINGS) == tuple(POOLINGS)
    assert tuple(VEIN_MEMORIES) == tuple(VEIN_MEMORY)
    assert tuple(VEIN_MASK_INITS) == tuple(MASK_INITS)
    from fam.experiments.ablation_report import VEIN_SAME_RTOL
    from fam.losses.vein import SAME_RTOL
    assert VEIN_SAME_RTOL == SAME_RTOL
    assert set(TINY_FAMILIES) == set(NATIVE_FAMILIES)
    from fam.config.training import CHECK_MODES
    from fam.data.images import CHECK_MODES as IMAGE_CHECKS
    assert tuple(CHECK_MODES) == tuple(IMAGE_CHECKS)
