"""Every config value is validated at load time: a bad value is a ConfigError naming the key
(and what to do), and the CLI exits 2 with one line and no traceback, before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

from fam.config import (AdaptConfig, AlignConfig, CompareConfig, DemoConfig, PlanConfig,
                        ProbeConfig, ProjectorConfig, ScenesConfig, Stage0Config, load_config)
from fam.errors import ConfigError

BAD = [
    # (config class, override, the key the error must name)
    (AdaptConfig, "optim.batch_size=0", "optim.batch_size"),
    (AdaptConfig, "optim.batch_size=-4", "optim.batch_size"),
    (AdaptConfig, "optim.steps=0", "optim.steps"),
    (AdaptConfig, "optim.lr=.nan", "optim.lr"),
    (AdaptConfig, "optim.lr=-1e-4", "optim.lr"),
    (AdaptConfig, "optim.lr=0", "optim.lr"),
    (AdaptConfig, "optim.lr=.inf", "optim.lr"),
    (AdaptConfig, "temperature=0", "temperature"),
    (AdaptConfig, "optim.warmup_ratio=5", "optim.warmup_ratio"),
    (AdaptConfig, "optim.warmup_ratio=.nan", "optim.warmup_ratio"),
    (AdaptConfig, "optim.schedule=cosin", "optim.schedule"),
    (AdaptConfig, "optim.grad_clip=.nan", "optim.grad_clip"),
    (AdaptConfig, "optim.grad_clip=-1", "optim.grad_clip"),
    (AdaptConfig, "optim.grad_accum=3", "optim.grad_accum"),  # does not divide 32
    (AdaptConfig, "optim.betas=[0.9,1.5]", "optim.betas[1]"),
    (AdaptConfig, "optim.weight_decay=-0.1", "optim.weight_decay"),
    (AdaptConfig, "run.precision=fp8", "run.precision"),
    (AdaptConfig, "run.device=gpu", "run.device"),
    (AdaptConfig, "run.strategy=zero3", "run.strategy"),
    (AdaptConfig, "run.attn_implementation=flash", "run.attn_implementation"),
    (AdaptConfig, "run.seed=-1", "run.seed"),
    (AdaptConfig, "run.log_every=0", "run.log_every"),
    (AdaptConfig, "run.keep_checkpoints=0", "run.keep_checkpoints"),
    (AdaptConfig, "run.on_change=ignore", "run.on_change"),
    (AdaptConfig, "run.check_images=never", "run.check_images"),
    (AdaptConfig, "run.out_dir=", "run.out_dir"),
    (AdaptConfig, "model=", "model"),
    (AdaptConfig, "train_dir=", "train_dir"),
    (AdaptConfig, "max_text_tokens=0", "max_text_tokens"),
    (AdaptConfig, "gradcache_chunk=-1", "gradcache_chunk"),
    (AdaptConfig, "lora.r=0", "lora.r"),
    (AdaptConfig, "lora.dropout=1", "lora.dropout"),
    (AdaptConfig, "lora.enabled=false", "lora.enabled"),  # and no full fine-tune: nothing trains
    (AdaptConfig, "vein.mask_ratio=0", "vein.mask_ratio"),
    (AdaptConfig, "vein.mask_ratio=1", "vein.mask_ratio"),
    (AdaptConfig, "vein.weight=.nan", "vein.weight"),
    (AdaptConfig, "vein.layers=[]", "vein.layers"),
    (AdaptConfig, "vein.layers=[0]", "vein.layers[0]"),
    (AdaptConfig, "vein.layers=[-1,-1]", "vein.layers"),
    (AdaptConfig, "vein.num_heads=0", "vein.num_heads"),
    (AdaptConfig, "vein.memory=tokens", "vein.memory"),
    (AdaptConfig, "vein.mask_init=zeros", "vein.mask_init"),
    (AdaptConfig, "vein.dropout=1", "vein.dropout"),
    (AdaptConfig, "vein.visible_ratio=0.8", "vein.visible_ratio"),  # > 1 - mask_ratio
    (AdaptConfig, "vein.visible_ratio=0.1", "vein.visible_ratio"),  # memory=unmasked
    (AdaptConfig, "vein.layers=[-1,x]", "vein.layers"),
    (Stage0Config, "captions=", "captions"),
    (Stage0Config, "optim.steps=0", "optim.steps"),
    (AlignConfig, "temperature=-0.02", "temperature"),
    (AlignConfig, "token_layer=0", "token_layer"),
    (AlignConfig, "weights=[0,0,0]", "weights"),
    (AlignConfig, "weights=[1,1]", "weights"),
    (AlignConfig, "c2f_reduction=max", "c2f_reduction"),
    (ProjectorConfig, "projector=conv", "projector"),
    (ProjectorConfig, "pooling=max", "pooling"),
    (ProjectorConfig, "theta=0", "theta"),
    (ProjectorConfig, "beta_max=-1", "beta_max"),
    (ProjectorConfig, "ramp_steps=-1", "ramp_steps"),
    (ScenesConfig, "n_candidates=1", "n_candidates"),
    (ScenesConfig, "p_large=2", "p_large"),
    (ProbeConfig, "batch_size=0", "batch_size"),
    (ProbeConfig, "attention_prompt=no placeholder", "attention_prompt"),
    (PlanConfig, "precision=fp8", "precision"),
    (PlanConfig, "image_sides=3", "image_sides"),
    (DemoConfig, "adapt.optim.lr=.nan", "adapt.optim.lr"),
    (DemoConfig, "stage0.optim.batch_size=0", "stage0.optim.batch_size"),
    (DemoConfig, "model.size=xxl", "model.size"),
    (DemoConfig, "vein.mask_ratio=1.5", "vein.mask_ratio"),
    (DemoConfig, "adapt.vein.enabled=true", "adapt.vein.enabled"),
    (CompareConfig, "projector.pooling=max", "projector.pooling"),
    (CompareConfig, "seeds=[]", "seeds"),
]


@pytest.mark.parametrize("cls,override,key", BAD, ids=[f"{c.__name__}:{o}" for c, o, _ in BAD])
def test_bad_value_is_a_config_error_naming_the_key(cls, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert e.value.key == key
    assert str(e.value).startswith(key.split("[")[0]) or f"{key}" in str(e.value)


def test_inputs_are_required_when_running_not_when_loading():
    cfg = load_config(AdaptConfig, None, ["optim.lr=1e-4"])  # a YAML may omit the model
    with pytest.raises(ConfigError, match="model is empty") as e:
        cfg.validate()
    assert e.value.key == "model"
    load_config(AdaptConfig, None, ["model=m", "train_dir=d"]).validate()
    with pytest.raises(ConfigError, match="pad"):
        load_config(ProjectorConfig, None, ["model=m", "captions=c"]).validate()


def test_a_valid_config_passes_and_every_shipped_config_is_valid():
    root = Path(__file__).resolve().parents[2] / "configs"
    kinds = {"stage0": Stage0Config, "adapt": AdaptConfig, "align": AlignConfig}
    for p in sorted(root.glob("*.yaml")):
        cls = next(c for k, c in kinds.items() if p.name.startswith(k))
        load_config(cls, p)
    from fam.experiments.presets import load_preset
    from fam.experiments.sweep import load_sweep
    for p in sorted((root / "experiments").glob("*.yaml")):
        if p.name.startswith("sweep_"):  # every point's recipe is loaded and validated
            assert load_sweep(p.stem.removeprefix("sweep_")).points
            continue
        cls = CompareConfig if p.name.startswith("projector") else DemoConfig
        load_preset(cls, p.stem).validate(require_inputs=False)


def test_preset_errors_name_the_key(tmp_path):
    from fam.experiments.presets import load_preset
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo_quick\nadapt:\n  optim: {warmup_ratio: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_preset(DemoConfig, bad)
    assert e.value.key == "adapt.optim.warmup_ratio"
    with pytest.raises(ConfigError, match="no experiment preset 'nope'"):
        load_preset(DemoConfig, "nope")


def test_yaml_syntax_error_and_folder_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+: invalid YAML"):
        load_config(AdaptConfig, bad)
    with pytest.raises(ConfigError, match="a folder"):
        load_config(AdaptConfig, tmp_path)


@pytest.mark.parametrize("argv", [
    ["train", "adapt", "optim.batch_size=0"],
    ["train", "stage0", "optim.lr=.nan"],
    ["train", "align", "temperature=0"],
    ["train", "projector", "optim.warmup_ratio=5"],
    ["train", "adapt", "optim.schedule=cosin", "model=m", "train_dir=d"],
    ["train", "adapt", "model="],
    ["train", "adapt"],  # no model: refused before loading anything
    ["demo", "--preset", "nope"],
    ["plan", "--model", "Qwen2-VL-2B", "--batch", "0"],
])
def test_cli_exits_2_with_one_line_naming_the_key(argv, capsys, caplog):
    from fam.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    bad = next(a for a in argv if "=" in a).split("=")[0] if any("=" in a for a in argv) \
        else {"adapt": "model", "demo": "preset", "plan": "batch"}[argv[0] if argv[0] != "train"
                                                                    else argv[1]]
    assert bad in caplog.text


def test_every_stage_selects_the_backbones_inputs():
    from fam.backbones.options import NAMED_RESOLUTIONS, PROMPT_FORMATS as BACKBONE_FORMATS
    from fam.config import ProjectorConfig, SftConfig, Stage0Config, load_config
    from fam.config.training import IMAGE_RESOLUTIONS, PROMPT_FORMATS
    # the config's copies of the backbone's names (config may not import backbones)
    assert PROMPT_FORMATS == BACKBONE_FORMATS
    assert set(IMAGE_RESOLUTIONS) == set(NAMED_RESOLUTIONS) | {"none", "cap"}
    for cls in (Stage0Config, AlignConfig, AdaptConfig, ProjectorConfig, SftConfig):
        cfg = load_config(cls, None, ["backbone.prompt_format=vlm2vec",
                                      "backbone.image_resolution=448x336",
                                      "backbone.max_pixels=1003520", "max_text_tokens=none"])
        assert cfg.backbone.load_options() == {"prompt_format": "vlm2vec",
                                               "image_resolution": "448x336",
                                               "max_pixels": 1003520}
        assert cfg.max_text_tokens is None
        assert load_config(cls, None, []).backbone.load_options() == {}  # unset: as saved
    assert load_config(AdaptConfig, None, []).max_text_tokens == "auto"
    assert load_config(AdaptConfig, None, ["split=diverse_instruction"]).split == \
        "diverse_instruction"
    for bad, key in (("backbone.prompt_format=llava", "backbone.prompt_format"),
                     ("backbone.image_resolution=huge", "backbone.image_resolution"),
                     ("backbone.min_pixels=0", "backbone.min_pixels"),
                     ("max_text_tokens=0", "max_text_tokens"),
                     ("max_text_tokens=lots", "max_text_tokens")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(AdaptConfig, None, [bad])
    with pytest.raises(ConfigError, match=r"backbone\.min_pixels"):
        load_config(AdaptConfig, None, ["backbone.min_pixels=5000", "backbone.max_pixels=100"])


def test_vein_variants_and_the_paper_default_layers_load():
    c = load_config(AdaptConfig, None, ["vein.memory=embedding", "vein.visible_ratio=0.1",
                                        "vein.mask_init=mae", "vein.target_pos=false",
                                        "vein.layers=null"])
    assert (c.vein.memory, c.vein.visible_ratio, c.vein.mask_init, c.vein.target_pos) == \
        ("embedding", 0.1, "mae", False)
    assert c.vein.layers is None  # unset: the paper's default for the backbone's size
    assert load_config(AdaptConfig, None, []).vein.layers is None
    assert load_config(AdaptConfig, None, ["vein.layers=[-1]"]).vein.layers == [-1]
