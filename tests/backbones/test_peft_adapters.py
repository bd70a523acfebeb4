"""Published peft adapters (as VLM2Vec ships them) load through ``load_backbone(adapter=...)``."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from fam.backbones import load_backbone
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import ConfigError
from fam.model import EmbeddingModel

# VLM2Vec's LoRA target names (src/arguments.py L51-54) that exist in Qwen2-VL's language model.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter keys as transformers 4.46 (VLM2Vec's pin) named Qwen2-VL's modules: the language
    model was ``model.*`` and the vision tower ``visual.*`` (now ``model.language_model.*`` and
    ``model.visual.*``)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
        k = k.replace("base_model.model.model.visual.", "base_model.model.visual.")
        out[k] = v
    return out


def _items(paths):
    return [MMItem(f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", paths[0]),
            MMItem("Find me an everyday image that matches the given caption: a red circle")]


def _published_adapter(base: Path, out: Path, use_dora: bool, fmt: str):
    """Train-free stand-in for a published adapter: random non-zero LoRA/DoRA weights saved in
    peft's layout with legacy key names. Returns the same weights merged by peft directly."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    model = load_backbone(base).model
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                     use_dora=use_dora, init_lora_weights="gaussian")  # VLM2Vec: model.py L105-113
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the model
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = _legacy_names(get_peft_model_state_dict(pm))
    assert any(".model.layers." in k for k in sd) and not any("language_model" in k for k in sd)
    if use_dora:
        assert any(k.endswith("lora_magnitude_vector") for k in sd)
    out.mkdir()
    pm.peft_config["default"].save_pretrained(str(out))
    if fmt == "bin":
        torch.save(sd, out / "adapter_model.bin")
    else:
        save_file(sd, str(out / "adapter_model.safetensors"))
    return pm.merge_and_unload().eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_published_adapter_equals_the_merged_model(tiny_dirs, scene_images, tmp_path, use_dora, fmt):
    base = tiny_dirs["qwen2_vl"]
    merged = _published_adapter(base, tmp_path / "adapter", use_dora, fmt)
    got = load_backbone(base, adapter=tmp_path / "adapter")
    assert not hasattr(got.model, "peft_config")  # merged, no wrapper left
    ref_sd, got_sd = merged.state_dict(), got.model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    plain = load_backbone(base)
    assert any(not torch.equal(plain.model.state_dict()[k], got_sd[k]) for k in got_sd)
    ref = load_backbone(base)
    ref.model = merged
    items = _items(scene_images)
    with torch.no_grad():
        e_got = EmbeddingModel(got).eval().encode(items)
        e_ref = EmbeddingModel(ref).eval().encode(items)
        e_base = EmbeddingModel(plain).eval().encode(items)
    torch.testing.assert_close(e_got, e_ref, rtol=0, atol=0)
    assert (e_got - e_base).abs().max() > 1e-3


class _Payload:
    """Unpickling this calls ``Path.write_text(marker, "ran")``: observable code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_payload_in_adapter_bin_is_refused_without_running(tiny_dirs, tmp_path, writer):
    from fam.backbones.peft_adapters import read_adapter_weights
    marker = tmp_path / "payload-ran"
    d = tmp_path / "adapter"
    _published_adapter(tiny_dirs["qwen2_vl"], d, use_dora=False, fmt="bin")
    sd = torch.load(d / "adapter_model.bin", weights_only=True)
    sd["base_model.model.evil"] = _Payload(marker)
    if writer == "torch.save":
        torch.save(sd, d / "adapter_model.bin")
    else:
        with open(d / "adapter_model.bin", "wb") as f:
            pickle.dump(sd, f)
    with pytest.raises(ConfigError, match="refused to load"):
        load_backbone(tiny_dirs["qwen2_vl"], adapter=d)
    with pytest.raises(ConfigError, match="refused to load"):
        read_adapter_weights(d / "adapter_model.bin")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (what the refusal prevents).
    if writer == "torch.save":
        torch.load(d / "adapter_model.bin", weights_only=False)
    else:
        with open(d / "adapter_model.bin", "rb") as f:
            pickle.load(f)
    assert marker.read_text() == "ran"


def test_bad_adapter_folders_get_one_clear_error(tiny_dirs, tmp_path):
    base = tiny_dirs["qwen2_vl"]
    with pytest.raises(ConfigError, match="no such folder"):
        load_backbone(base, adapter=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_backbone(base, adapter=tmp_path / "empty")
    # an adapter trained on another architecture does not fit
    d = tmp_path / "other"
    _published_adapter(tiny_dirs["qwen2_5_vl"], d, use_dora=False, fmt="safetensors")
    import json
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "nonexistent_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="does not fit this base model"):
        load_backbone(base, adapter=d)
