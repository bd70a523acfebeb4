"""`fam export`: a sentence-transformers / vLLM folder that reproduces fam's embeddings.

sentence-transformers loads the exports below without trust_remote_code, on a machine
without torchvision (CI has none; the Qwen2-VL export's processor needs no video part).
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fam.data.types import MMItem
from fam.errors import ConfigError
from fam.export import (DEFAULT_PROMPTS, PARITY_MIN_COSINE, chat_template,
                        export_sentence_transformers)
from fam.model.encode import load_embedding_model

st_mod = pytest.importorskip("sentence_transformers")

VQA = "<|image_1|>\nRepresent the given image with the following question: what colour?"


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory):
    """{family: export folder}, exported without the built-in check (the tests check)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fam in ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next"):
        export_sentence_transformers(tiny_dirs[fam], root / fam, check=False)
        out[fam] = root / fam
    return out


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next"])
def test_sentence_transformers_matches_fam(exports, tiny_dirs, scene_images, family):
    st = st_mod.SentenceTransformer(str(exports[family]), device="cpu")
    assert "trust_remote_code" not in json.dumps(json.loads(
        (exports[family] / "sentence_bert_config.json").read_text()))
    ims = [Image.open(p).convert("RGB") for p in scene_images]
    texts = ["a red circle left of a blue square", "a small green triangle above a star"]
    kw = dict(convert_to_tensor=True, show_progress_bar=False)
    got = torch.cat([
        st.encode(texts, prompt="", **kw),                                 # text
        st.encode(ims, prompt="", **kw),                                   # image
        st.encode([{"image": ims[0], "text": VQA},                          # image + text
                   {"image": ims[1], "text": "what is left of the circle?"}], prompt="", **kw),
        st.encode_query(texts[:1], **kw),                                  # query prompt
        st.encode_document(ims[2:], **kw)])                                # document prompt
    fam_items = [MMItem(t) for t in texts] + [MMItem("", p) for p in scene_images] + [
        MMItem(VQA, scene_images[0]), MMItem("what is left of the circle?", scene_images[1]),
        MMItem(DEFAULT_PROMPTS["query"] + texts[0]),
        MMItem(DEFAULT_PROMPTS["document"], scene_images[2])]
    ref = load_embedding_model(tiny_dirs[family]).encode(fam_items)
    cos = _cos(got, ref)
    assert cos.min() >= PARITY_MIN_COSINE, cos


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next"])
def test_chat_template_writes_fams_exact_tokens(exports, tiny_dirs, scene_images, family):
    """The processor's ids (chat template + image expansion) equal the adapter's, item by item."""
    from transformers import AutoProcessor

    from fam.backbones import load_backbone
    proc = AutoProcessor.from_pretrained(str(exports[family]))
    adapter = load_backbone(tiny_dirs[family])
    im = Image.open(scene_images[1]).convert("RGB")
    cases = [  # (fam text, images, chat content)
        ("a red circle", [], [{"type": "text", "text": "a red circle"}]),
        ("", [im], [{"type": "image", "image": im}]),
        ("Represent it.", [im], [{"type": "text", "text": "Represent it."},
                                 {"type": "image", "image": im}]),
        ("Q: <|image_1|> is what? <|image_2|>", [im],
         [{"type": "image", "image": im},
          {"type": "text", "text": "Q: <|image_1|> is what? <|image_2|>"}]),
        ("<|image_2|> then <|image_1|>", [im, im],
         [{"type": "image", "image": im}, {"type": "image", "image": im},
          {"type": "text", "text": "<|image_2|> then <|image_1|>"}]),
    ]
    for text, images, content in cases:
        want = adapter.encode([MMItem(text)], [images or None]).inputs["input_ids"][0].tolist()
        got = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                       return_dict=True)["input_ids"]
        got = got[0] if isinstance(got[0], list) else got
        assert got == want, (family, text)


def test_export_files(exports, tiny_dirs):
    q = exports["qwen2_vl"]
    modules = json.loads((q / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    pool = json.loads((q / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_lasttoken"] is True and pool["pooling_mode_mean_tokens"] is False
    assert pool["word_embedding_dimension"] == 64
    cfg = json.loads((q / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == DEFAULT_PROMPTS and cfg["similarity_fn_name"] == "cosine"
    assert json.loads((q / "processor_config.json").read_text())["processor_class"] == \
        "PaddleOCRVLProcessor"
    # fam's pixel limits travel with the image processor.
    src = json.loads((tiny_dirs["qwen2_vl"] / "preprocessor_config.json").read_text())
    assert json.loads((q / "preprocessor_config.json").read_text())["size"] == src["size"]
    from safetensors import safe_open
    with safe_open(str(q / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("lm_head") for k in keys)
    assert json.loads((q / "config.json").read_text())["architectures"] == \
        ["Qwen2VLForConditionalGeneration"]
    card = (q / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "vllm serve" in card


def test_builtin_check_and_model_card_results(tiny_dirs, tmp_path):
    from fam.eval.metrics import aggregate
    model = tmp_path / "run" / "model"
    import shutil
    shutil.copytree(tiny_dirs["qwen2_vl"], model)
    per = {"MSCOCO_t2i": {"precision@1": 40.0, "n": 10, "n_candidates": 8, "n_encoded": 20,
                          "meta_task": "retrieval", "split": "IND", "chance": 12.5}}
    res = {"metric": "precision@1", "datasets": per,
           **aggregate({"MSCOCO_t2i": 40.0}, chance={"MSCOCO_t2i": 12.5})}
    (model / "eval_results.json").write_text(json.dumps(res))
    (tmp_path / "run" / "train_metrics.json").write_text(json.dumps(
        {"stage": "adapt+vein", "steps": 7, "seconds": 3.0, "final": {"loss": 1.25}}))
    out = export_sentence_transformers(model, tmp_path / "st", prompts={"query": "Q: "})
    assert out.check["min_cosine"] >= PARITY_MIN_COSINE and out.check["items"] == 5
    card = (tmp_path / "st" / "README.md").read_text()
    assert "| MSCOCO_t2i | retrieval | IND | 10 | 40.0 | 12.5 |" in card
    assert "| **overall** | | | | 40.0 | 12.5 |" in card
    assert "adapt+vein" in card and "loss=1.25" in card
    assert json.loads((tmp_path / "st" / "fam_export.json").read_text())["check"] == out.check


def test_lora_adapter_folder_is_merged(tiny_dirs, qwen_lora, tmp_path, scene_images):
    from fam.backbones import load_backbone
    from fam.model import EmbeddingModel
    res = export_sentence_transformers(qwen_lora, tmp_path / "st")
    assert res.check["min_cosine"] >= PARITY_MIN_COSINE
    emb = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"], adapter=qwen_lora))
    item = [MMItem("", scene_images[0])]
    st = st_mod.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    got = st.encode([Image.open(scene_images[0]).convert("RGB")], prompt="",
                    convert_to_tensor=True, show_progress_bar=False)
    base = load_embedding_model(tiny_dirs["qwen2_vl"]).encode(item)
    assert _cos(got, emb.encode(item)).min() >= PARITY_MIN_COSINE
    assert _cos(got, base).min() < 0.999  # the LoRA update is in the export
    # The same adapter given on top of its base model (`fam export --adapter`).
    from fam.cli import main
    assert main(["export", "--model", str(tiny_dirs["qwen2_vl"]), "--adapter",
                 str(qwen_lora), "--out", str(tmp_path / "st2")]) == 0
    st2 = st_mod.SentenceTransformer(str(tmp_path / "st2"), device="cpu")
    got2 = st2.encode([Image.open(scene_images[0]).convert("RGB")], prompt="",
                      convert_to_tensor=True, show_progress_bar=False)
    assert _cos(got2, got).min() >= PARITY_MIN_COSINE


def test_errors_are_one_clear_line(tiny_dirs, tmp_path, caplog):
    from fam.cli import main
    with pytest.raises(ConfigError, match="already exists"):
        export_sentence_transformers(tiny_dirs["qwen2_vl"], tiny_dirs["llava"])
    with pytest.raises(ConfigError, match="does not support the idefics3 family"):
        export_sentence_transformers(tiny_dirs["idefics3"], tmp_path / "x", check=False)
    assert not (tmp_path / "x").exists()
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert main(["export", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(tmp_path / "z"),
                 "--prompt", "broken"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "no such folder" in errors[0] and "expected NAME=TEXT" in errors[1]


def test_chat_template_drops_unknown_tags():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    tpl = ImmutableSandboxedEnvironment().from_string(chat_template("<IMG>", "<s>", "</s>"))

    def render(*content):
        return tpl.render(messages=[{"role": "system", "content": "P: "},
                                    {"role": "user", "content": list(content)}])
    assert render({"type": "text", "text": "x"}) == "<s>P: x</s>"
    assert render({"type": "image"}, {"type": "text", "text": "a <|image_3|>b"}) == \
        "<s><IMG>\nP: a b</s>"
    assert render({"type": "image"}, {"type": "text", "text": "<|image_1|>a<|image_1|>"}) == \
        "<s>P: <IMG>a</s>"


@pytest.mark.parametrize("option", [{"prompt_format": "vlm2vec"}, {"image_resolution": "mid"}])
def test_settings_a_processor_cannot_reproduce_are_refused(tiny_dirs, tmp_path, option):
    from fam.backbones import load_backbone
    load_backbone(tiny_dirs["qwen2_vl"], **option).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=next(iter(option))):
        export_sentence_transformers(tmp_path / "m", tmp_path / "st", check=False)
    assert not (tmp_path / "st").exists()


def test_export_keeps_the_saved_input_settings(tiny_dirs, tmp_path):
    from fam.backbones import load_backbone
    load_backbone(tiny_dirs["qwen2_vl"], max_text_tokens=None).save_pretrained(tmp_path / "m")
    export_sentence_transformers(tmp_path / "m", tmp_path / "st", check=False)
    saved = json.loads((tmp_path / "st" / "fam_backbone.json").read_text())
    assert saved["max_text_tokens"] is None and saved["prompt_format"] == "fam"
    # fam reads the export back with the same inputs.
    assert load_backbone(tmp_path / "st").max_text_tokens is None
