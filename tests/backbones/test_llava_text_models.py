"""A tiny LLaVA with a Qwen2 language model: builds, round-trips, trains a projector."""
import pytest
import torch

from fam.backbones import build_tiny, load_backbone
from fam.errors import ConfigError
from fam.data.captions import CaptionSample
from fam.train.stage0 import build_generative_batch

CORPUS = ["a red circle left of a blue square", "Describe the image."]


def test_qwen2_llava_round_trips_and_trains(tmp_path, scene_images):
    a = build_tiny("llava", tmp_path / "q", size="xs", image_size=56, corpus=CORPUS,
                   text_model="qwen2", seed=0)
    assert a.config.text_config.model_type == "qwen2"
    b = load_backbone(tmp_path / "q")
    assert type(b.language_model()).__name__.startswith("Qwen2")
    for (n, p), (m, q) in zip(a.hf_model.named_parameters(), b.hf_model.named_parameters()):
        assert n == m and torch.equal(p, q)
    s = [CaptionSample(scene_images[0], "Describe the image.", "a red circle", "t", 1, "image")]
    enc, labels = build_generative_batch(b, s)
    assert int(enc.image_mask.sum()) == 16                 # 56 px / 14 = 4 × 4 patches
    loss = b.generative_loss(enc, labels)
    loss.backward()
    proj = b.hf_model.model.multi_modal_projector
    assert torch.isfinite(loss) and proj.linear_1.weight.grad.abs().sum() > 0


def test_unknown_text_model_is_named():
    with pytest.raises(ConfigError, match="language model 'mistral'"):
        build_tiny("llava", size="xs", corpus=CORPUS, text_model="mistral")
