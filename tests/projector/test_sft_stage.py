"""`fam train sft`: a few steps on a tiny LLaVA, exact resume, what trains, the export."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fam.backbones import load_backbone
from fam.config import LoraConfig, OptimConfig, RunConfig, SftConfig
from fam.errors import ConfigError
from fam.eval.generate import generate
from fam.projector.sft import run_sft
from fam.train.registry import STAGES
from fam.train.stage0 import GenerativeModule


def _data(tmp_path, scene_images):
    rows = [{"image": p.name, "question": q, "answer": a} for p, q, a in zip(
        scene_images, ["What colour is the circle?", "Where is the circle? Answer with a box.",
                       "How many objects are in the image?"],
        ["red", "[9, 9, 54, 54]", "one"])] * 2
    path = tmp_path / "img" / "sft_train.json"
    path.write_text(json.dumps(rows))
    return path


def _cfg(model, data, out, steps=4, **kw):
    return SftConfig(model=str(model), data=str(data),
                     lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
                     optim=OptimConfig(lr=5e-3, batch_size=2, steps=steps, warmup_ratio=0.0),
                     run=RunConfig(out_dir=str(out), seed=0, save_every=2, progress=False,
                                   log_every=1), **kw)


def _state(model_dir):
    return {k: v for f in sorted(model_dir.glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def test_registered_as_fam_train_sft():
    assert STAGES["sft"].config is SftConfig


def test_trains_projector_and_lora_resumes_exactly(tiny_dirs, scene_images, tmp_path,
                                                   monkeypatch):
    model = tiny_dirs["llava"]
    data = _data(tmp_path, scene_images)
    full = run_sft(_cfg(model, data, tmp_path / "full"))
    before, after = _state(model), _state(full)
    assert set(before) == set(after)                   # merged: no LoRA keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("multi_modal_projector" in k for k in changed)
    assert any("language_model" in k and "proj" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)          # the tower is frozen
    assert not any("embed_tokens" in k for k in changed)          # LoRA: linear layers only
    assert json.loads((tmp_path / "full" / "sft.json").read_text())["steps"] == 4

    orig = GenerativeModule.forward

    def crash(self, batch, step=0):
        if step == 3:
            raise KeyboardInterrupt
        return orig(self, batch, step)
    monkeypatch.setattr(GenerativeModule, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_sft(_cfg(model, data, tmp_path / "part"))
    monkeypatch.setattr(GenerativeModule, "forward", orig)
    resumed = _state(run_sft(_cfg(model, data, tmp_path / "part")))
    for k in after:
        torch.testing.assert_close(resumed[k], after[k], rtol=0, atol=0)

    # the export is a plain checkpoint that generates
    adapter = load_backbone(full)
    out = generate(adapter, [(scene_images[0], "What colour is the circle?")], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_projector_only_and_config_errors(tiny_dirs, scene_images, tmp_path):
    model = tiny_dirs["llava"]
    data = _data(tmp_path, scene_images)
    cfg = _cfg(model, data, tmp_path / "proj", steps=2)
    cfg.lora.enabled = False
    changed = {k for k, v in _state(run_sft(cfg)).items()
               if not torch.equal(v, _state(model)[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    bad = _cfg(model, data, tmp_path / "none", train_projector=False)
    bad.lora.enabled = False
    with pytest.raises(ConfigError, match="nothing would train"):
        bad.validate()
    with pytest.raises(ConfigError, match="data"):
        SftConfig(model="m").validate()
