"""`fam export` and videos: sentence-transformers embeds a video item like fam.

- Qwen2-VL/2.5-VL (``--video``): transformers' stock processor with a Qwen2VLVideoProcessor.
  What runs everywhere: the exported files, and the chat template + video-token expansion
  giving fam's token ids exactly. What needs torchvision (which that video processor
  imports; it does not load with the CPU torch of this project's machines): the embeddings
  and pixels through sentence-transformers, skipped with the reason elsewhere.
- LLaVA-1.5 / LLaVA-NeXT take a video as its frames: sentence-transformers gets the frames
  fam samples as images, placed where the video is; equal to fam's video item everywhere.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fam.backbones import load_backbone
from fam.data.types import MMItem
from fam.data.video import sample
from fam.errors import ConfigError
from fam.export import PARITY_MIN_COSINE, export_sentence_transformers, st_video
from fam.export.video import probe_video, torchvision_missing
from fam.model.encode import load_embedding_model

st_mod = pytest.importorskip("sentence_transformers")
NO_TORCHVISION = torchvision_missing()


def _frames(n, size=(96, 40)):
    return probe_video(n, size)


def _folder(tmp_path, name, frames):
    d = tmp_path / name
    d.mkdir()
    for k, f in enumerate(frames):
        f.save(d / f"frame_{k + 1}.png")
    return d


@pytest.fixture(scope="module")
def video_exports(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("video_exports")
    out = {}
    for fam in ("qwen2_vl", "qwen2_5_vl"):
        res = export_sentence_transformers(tiny_dirs[fam], root / fam, video=True)
        out[fam] = (root / fam, res)
    return out


def test_video_export_files(video_exports, tiny_dirs):
    path, res = video_exports["qwen2_vl"]
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == \
        "Qwen2VLProcessor"
    assert json.loads((video_exports["qwen2_5_vl"][0] / "processor_config.json").read_text()
                      )["processor_class"] == "Qwen2_5_VLProcessor"
    vp = json.loads((path / "video_preprocessor_config.json").read_text())
    ip = json.loads((tiny_dirs["qwen2_vl"] / "preprocessor_config.json").read_text())
    assert vp["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert vp["size"] == ip["size"]  # fam's pixel budget: the image processor's
    assert (vp["do_sample_frames"], vp["cap_pixels_per_frame"]) == (False, False)
    assert vp["temporal_patch_size"] == 2 and vp["image_mean"] == ip["image_mean"]
    modes = json.loads((path / "sentence_bert_config.json").read_text())["modality_config"]
    assert {"video", "text+video", "image+text", "message"} <= set(modes)
    tok = json.loads((path / "tokenizer_config.json").read_text())["extra_special_tokens"]
    assert tok["video_token"] == "<|video_pad|>" and tok["image_token"] == "<|image_pad|>"
    meta = json.loads((path / "fam_export.json").read_text())
    assert meta["video"] is True and meta["check"] == res.check
    if NO_TORCHVISION:
        assert "torchvision" in res.check["skipped"]
    else:
        assert res.check["min_cosine"] >= PARITY_MIN_COSINE and res.check["videos"] == 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_chat_template_gives_fams_token_ids(video_exports, tiny_dirs, tmp_path, family):
    """The exported chat template, with each <|video_pad|> expanded to the video's token count
    (what the processor does: t·h·w / merge²), gives fam's ids, item by item."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer
    path = video_exports[family][0]
    tpl = ImmutableSandboxedEnvironment().from_string((path / "chat_template.jinja").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    adapter = load_backbone(tiny_dirs[family])
    im = Image.new("RGB", (60, 50), (20, 200, 30))
    (tmp_path / "im.png").parent.mkdir(exist_ok=True)
    im.save(tmp_path / "im.png")
    cases = [  # (prompt, text, frames, with an image)
        ("", "what happens?", 11, False),
        ("Find the clip: ", "a circle moves right", 5, False),
        ("", "clip: <|video_1|> where does it go?", 8, False),
        ("", "<|image_1|> and then <|video_1|>", 3, True),
        ("", "a still and a clip", 9, True),
    ]
    for prompt, text, n, with_image in cases:
        frames = sample(_frames(n))
        folder = _folder(tmp_path, f"{family}{n}{with_image}{len(prompt)}", _frames(n))
        item = MMItem(prompt + text, tmp_path / "im.png" if with_image else None, video=folder)
        want = adapter.encode([item]).inputs["input_ids"][0].tolist()
        _, (count,) = adapter.process_videos([frames])
        content = ([{"type": "image"}] if with_image else []) + [
            {"type": "video"}, {"type": "text", "text": text}]
        messages = ([{"role": "system", "content": prompt}] if prompt else []) + [
            {"role": "user", "content": content}]
        rendered = tpl.render(messages=messages)
        assert rendered.count("<|video_pad|>") == 1
        rendered = rendered.replace("<|video_pad|>", "<|video_pad|>" * count)
        if with_image:
            _, (img_count,) = adapter.process_images([im.convert("RGB")])
            rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * img_count)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == want, (family, text)


@pytest.mark.skipif(NO_TORCHVISION is not None,
                    reason=f"the stock Qwen2-VL video processor needs torchvision: {NO_TORCHVISION}")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_sentence_transformers_embeds_a_video_like_fam(video_exports, tiny_dirs, tmp_path,
                                                       family):
    from transformers import AutoProcessor
    path = video_exports[family][0]
    st = st_mod.SentenceTransformer(str(path), device="cpu")
    model = load_embedding_model(tiny_dirs[family])
    texts = ["what happens in the clip?", "clip: <|video_1|> where does it go?"]
    clips = [_frames(11), _frames(5, (64, 64))]
    items = [MMItem(t, video=_folder(tmp_path, f"v{i}", c))
             for i, (t, c) in enumerate(zip(texts, clips))]
    got = st.encode([{"video": st_video(c), "text": t} for t, c in zip(texts, clips)],
                    prompt="", convert_to_tensor=True, show_progress_bar=False)
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), model.encode(items), dim=-1)
    assert cos.min() >= PARITY_MIN_COSINE, cos
    # The processor's inputs: fam's ids and grid; pixels within two grey levels (torchvision
    # resizes the uint8 frames, fam's PIL image processor resizes them with PIL).
    proc = AutoProcessor.from_pretrained(str(path))
    for t, c, item in zip(texts, clips, items):
        out = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "video", "video": sample(c)},
                                          {"type": "text", "text": t}]}],
            tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"videos_kwargs": {"video_metadata": [st_video(c)["video_metadata"]]}})
        want = model.adapter.encode([item]).inputs
        assert out["input_ids"][0].tolist() == want["input_ids"][0].tolist()
        assert out["video_grid_thw"].tolist() == want["video_grid_thw"].tolist()
        if "second_per_grid_ts" in out:  # Qwen2.5-VL: fam's time scale (none = 1 s per patch)
            assert out["second_per_grid_ts"].tolist() == [1.0]
        # two uint8 levels / the smallest std of the normalisation: 2 / 255 / 0.2613 < 0.031
        assert (out["pixel_values_videos"] - want["pixel_values_videos"]).abs().max() < 0.031


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_frame_families_take_the_video_frames_as_images(tiny_dirs, tmp_path, family):
    """A video item of a family that takes frames = sentence-transformers given fam's sampled
    frames as images, the video's place written as <|image_1|>..<|image_k|>."""
    path = tmp_path / "st"
    export_sentence_transformers(tiny_dirs[family], path, check=False)
    st = st_mod.SentenceTransformer(str(path), device="cpu")
    model = load_embedding_model(tiny_dirs[family])
    clips = [_frames(11), _frames(3)]
    texts = ["clip: <|video_1|> where does it go?", "what happens?"]
    items = [MMItem(t, video=_folder(tmp_path, f"v{i}", c))
             for i, (t, c) in enumerate(zip(texts, clips))]
    st_in = []
    for t, c in zip(texts, clips):
        frames = sample(c)
        tags = "".join(f"<|image_{k + 1}|>" for k in range(len(frames)))
        st_in.append({"image": frames, "text": t.replace("<|video_1|>", tags)
                      if "<|video_1|>" in t else tags + "\n" + t})
    got = st.encode(st_in, prompt="", convert_to_tensor=True, show_progress_bar=False)
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), model.encode(items), dim=-1)
    assert cos.min() >= PARITY_MIN_COSINE, cos


def test_video_export_refusals(tiny_dirs, tmp_path, caplog):
    with pytest.raises(ConfigError, match="takes a video as its frames"):
        export_sentence_transformers(tiny_dirs["llava_next"], tmp_path / "x", video=True)
    assert not (tmp_path / "x").exists()
    from fam.cli import main
    assert main(["export", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(tmp_path / "y"),
                 "--format", "multivector", "--video"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--video" in errors[0] and "\n" not in errors[0]
