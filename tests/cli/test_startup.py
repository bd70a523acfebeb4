"""The command line answers without the heavy libraries: ``fam --help``, argument errors and
the parser import neither torch nor transformers (checked in fresh processes, not timed);
``fam bench startup`` reports its figures against the targets and fails when one is missed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fam.cli import main

HEAVY = ("torch", "transformers", "numpy", "PIL", "safetensors", "faiss")


def _modules_after(code: str) -> set[str]:
    """The heavy top-level modules a fresh interpreter holds after running ``code``."""
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_importing_the_cli_and_building_the_parser_loads_no_heavy_library():
    assert _modules_after("import fam, fam.cli\nfam.cli.build_parser()") == set()


@pytest.mark.parametrize("argv", [["--help"], ["search", "--index", "x", "-k", "0"],
                                  ["bench", "--help"], ["eval", "--compare"]])
def test_help_and_argument_errors_load_no_heavy_library(argv):
    code = ("from fam.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    assert e.code in (0, 2), e.code" % (argv,))
    assert _modules_after(code) == set()


def test_search_checks_its_arguments_before_loading_torch():
    code = ("from fam.cli import main\nassert main(['search', '--index', 'nowhere', "
            "'--image', 'no-such.png']) == 2")
    assert _modules_after(code) == set()


def _fake(ok: bool) -> dict:
    row = {"median_s": 0.3, "min_s": 0.2, "cpu_s": 0.25}
    cold = {"median_s": 6.0, "min_s": 5.5, "cpu_s": 5.0, "target_s": None}
    return {"command": "fam bench startup", "repeats": 3, "cores": 2, "index_items": 8,
            "load_avg_before": [0.5, 0.4, 0.3], "load_avg_after": [0.6, 0.4, 0.3],
            "all_ok": ok, "commands": {
                "help": {**row, "target_s": 1.0, "ok": True},
                "bad_argument": {**row, "target_s": 1.0, "ok": True},
                "search_text_cold": cold, "search_image_cold": cold, "search_text_first": cold,
                "search_text": {"median_s": 0.4 if ok else 4.1, "min_s": 0.3, "cpu_s": 0.2,
                                "target_s": 2.5, "ok": ok},
                "search_image": {"median_s": 0.5, "min_s": 0.4, "cpu_s": 0.2,
                                 "target_s": 2.5, "ok": True},
                "python": {"median_s": 0.02, "min_s": 0.02, "cpu_s": 0.02, "target_s": None},
                "model_import": {"median_s": 4.5, "min_s": 4.4, "cpu_s": 4.4,
                                 "target_s": None}}}


@pytest.mark.parametrize("ok", [True, False])
def test_bench_startup_prints_figures_and_targets_and_fails_on_a_miss(ok, monkeypatch, capsys,
                                                                     tmp_path):
    import fam.bench.startup as st
    monkeypatch.setattr(st, "run_bench", lambda work, repeats, index: _fake(ok))
    out_json = tmp_path / "s.json"
    assert main(["bench", "startup", "--json", str(out_json)]) == (0 if ok else 1)
    out = capsys.readouterr().out
    lines = {ln.split("  ")[0].strip(): ln for ln in out.splitlines()}
    assert "<= 1 s  ok" in lines["fam --help"]
    assert ("ok" if ok else "MISSED") in lines["fam search --text, warm (worker)"]
    assert lines["fam search --text, cold (--no-worker)"].rstrip().endswith("5.00")  # no target
    assert "load average 0.5 before, 0.6 after" in out
    assert json.loads(out_json.read_text())["all_ok"] is ok
