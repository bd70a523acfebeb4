from __future__ import annotations

import pytest

from fam.config import AdaptConfig, Stage0Config, load_config, to_dict
from fam.errors import ConfigError


def test_overrides_nested_and_typed():
    c = load_config(AdaptConfig, None, ["optim.lr=1e-4", "lora.r=16", "vein.layers=[-1]",
                                        "vein.enabled=true", "subsets=[A,B]"])
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert c.lora.r == 16 and c.lora.enabled is True  # section default kept
    assert c.vein.layers == [-1] and c.vein.enabled is True
    assert c.subsets == ["A", "B"]


def test_section_defaults_of_a_stage_survive_partial_overrides():
    # Stage0Config defaults optim.lr to 1e-3 (not OptimConfig's 2e-4)
    c = load_config(Stage0Config, None, ["optim.steps=7"])
    assert c.optim.steps == 7 and c.optim.lr == 1e-3


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\noptim:\n  lr: 0.01\n  steps: 5\nvein:\n  enabled: true\n")
    c = load_config(AdaptConfig, p, ["optim.steps=9"])
    assert (c.model, c.optim.lr, c.optim.steps, c.vein.enabled) == ("m", 0.01, 9, True)
    assert load_config(AdaptConfig, None, [f"{k}={v}" for k, v in []]) == AdaptConfig()
    assert to_dict(c)["optim"]["steps"] == 9


def test_unknown_key_and_bad_type_are_errors():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(AdaptConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.steps"):
        load_config(AdaptConfig, None, ["optim.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(AdaptConfig, None, ["optim.steps"])


def test_shipped_yaml_configs_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "configs"
    for p in sorted(root.glob("*.yaml")):
        head = p.read_text().splitlines()[0]
        assert head.startswith("#"), f"{p.name}: first line should show the command"
        from fam.config import AlignConfig
        kind = {"stage0": Stage0Config, "adapt": AdaptConfig, "align": AlignConfig}
        matched = [cls for key, cls in kind.items() if p.name.startswith(key)]
        assert matched, f"{p.name}: no config class for this file name"
        load_config(matched[0], p)
