"""`fam train tower`: a few steps on a tiny LLaVA, exact resume, export, config errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fam.config import OptimConfig, RunConfig, TowerConfig
from fam.errors import ConfigError
from fam.projector import tower as tower_mod
from fam.projector.tower import TowerModule, run_tower
from fam.train.registry import STAGES


def _captions(tmp_path, scene_images):
    caps = [{"image": p.name, "caption": c} for p, c in zip(
        scene_images, ["a red circle left of a blue square", "a blue circle",
                       "a small green triangle above a yellow star"])]
    caps = caps * 2                                   # 6 pairs: 3 batches of 2
    path = tmp_path / "img" / "captions.json"
    path.write_text(json.dumps(caps))
    return path


def _cfg(model, captions, out, loss="clip", steps=4, save_every=2):
    return TowerConfig(model=str(model), captions=str(captions), loss=loss, text_hidden=32,
                       projection_dim=16,
                       optim=OptimConfig(lr=3e-3, batch_size=2, steps=steps, warmup_ratio=0.0),
                       run=RunConfig(out_dir=str(out), seed=0, save_every=save_every,
                                     progress=False, log_every=1))


def _tower_weights(model_dir):
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {k: v for k, v in state.items() if "vision_tower" in k}


def test_registered_as_fam_train_tower():
    assert STAGES["tower"].config is TowerConfig
    assert STAGES["tower"].recipe().__name__ == "TowerRecipe"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_trains_exports_and_resumes_exactly(tiny_dirs, scene_images, tmp_path, monkeypatch,
                                            loss):
    model = tiny_dirs["llava"]
    caps = _captions(tmp_path, scene_images)
    full = run_tower(_cfg(model, caps, tmp_path / "full", loss))
    meta = json.loads((tmp_path / "full" / "tower.json").read_text())
    assert meta["steps"] == 4 and meta["loss"] == loss
    before = _tower_weights(model)
    after = _tower_weights(full)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)   # the tower trained
    # everything but the vision tower is the input checkpoint's
    b_all = {k: v for f in model.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    a_all = {k: v for f in full.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for k in b_all:
        if "vision_tower" not in k:
            assert torch.equal(b_all[k], a_all[k]), k

    # interrupted after 3 steps (checkpoint at step 2), then resumed: equal weights
    orig = TowerModule.forward

    def crash(self, batch, step=0):
        if step == 3:
            raise KeyboardInterrupt
        return orig(self, batch, step)
    monkeypatch.setattr(TowerModule, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_tower(_cfg(model, caps, tmp_path / "part", loss))
    monkeypatch.setattr(TowerModule, "forward", orig)
    resumed = run_tower(_cfg(model, caps, tmp_path / "part", loss))
    r = _tower_weights(resumed)
    for k in after:
        torch.testing.assert_close(r[k], after[k], rtol=0, atol=0)
    # a finished stage is skipped
    assert run_tower(_cfg(model, caps, tmp_path / "part", loss)) == resumed


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="loss"):
        TowerConfig(loss="mse").validate(require_inputs=False)
    with pytest.raises(ConfigError, match="optim.batch_size"):
        TowerConfig(optim=OptimConfig(batch_size=1)).validate(require_inputs=False)
    with pytest.raises(ConfigError, match="model"):
        TowerConfig(captions="c.json").validate()


def test_a_non_llava_checkpoint_is_refused(tiny_dirs, scene_images, tmp_path):
    caps = _captions(tmp_path, scene_images)
    with pytest.raises(ValueError, match="CLIP vision_tower"):
        run_tower(_cfg(tiny_dirs["qwen2_vl"], caps, tmp_path / "q"))
    assert tower_mod.TOWER_LOSSES == ("clip", "siglip")
