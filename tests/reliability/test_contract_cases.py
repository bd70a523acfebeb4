"""Issue 23, "one input contract everywhere": each of its eleven cases as a test.

Case 7 (the search page) is ``tests/serve/test_serve_live.py::
test_case7_page_choose_clear_choose_again_then_search`` (it needs the live server and
Chromium). docs/reliability.md lists the contract and these tests.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from contract_paths import agree
from PIL import Image
from reliability_helpers import adapt_args, append_row, copy

from fam.data.types import MMItem
from fam.errors import InputError


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def _transparent(mode: str) -> Image.Image:
    """A picture whose transparent pixels store colours (what dropping alpha would show)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(64)[None, :] < 32, 0, 255)  # left half transparent
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _refused_alike(outcomes, *words):
    assert agree(outcomes) is None, agree(outcomes)
    assert all(o.vector is None for o in outcomes), outcomes
    for w in words:
        assert w in outcomes[0].reason, outcomes[0].reason
    return outcomes[0].reason


# ---------------------------------------------------------------- 1. transparency
@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_case01_transparent_images_embed_alike_over_http_and_encode(three_paths, mode):
    """Was: serve used convert("RGB") (alpha dropped), cosine with fam encode RGBA 0.694,
    LA 0.899. Now every path composites onto white: the same vector."""
    im = _transparent(mode)
    outcomes = three_paths.run("<|image_1|> Represent the given image.", _png(im))
    assert agree(outcomes) is None, agree(outcomes)
    lib, cli, srv = (o.vector for o in outcomes)
    # Unit vectors equal to 1e-6 (contract_paths.TOL): their dot product is 1 to float32.
    assert float(torch.dot(srv, cli)) > 1 - 1e-6
    # The test can fail: the old server's rule (alpha dropped) gives another vector (0.85
    # with this tiny model; 0.9999 leaves the rounding of equal vectors far above it).
    dropped = three_paths.run("<|image_1|> Represent the given image.",
                              _png(im.convert("RGB")))[0].vector
    assert float(torch.dot(dropped, lib)) < 0.9999


# ---------------------------------------------------------------- 2. extreme aspect ratio
def test_case02_aspect_ratio_over_200_is_refused_alike_everywhere(three_paths):
    """Was: internal error in encode/eval, 500 and a reset connection in serve."""
    outcomes = three_paths.run("<|image_1|> x", _png(Image.new("RGB", (500, 1), "red")))
    reason = _refused_alike(outcomes, "aspect ratio", "200")
    assert outcomes[2].status == 400
    assert "qwen2_vl" in reason
    # 200:1 is what the processor still takes: embedded by all three.
    ok = three_paths.run("<|image_1|> x", _png(Image.new("RGB", (200, 1), "red")))
    assert agree(ok) is None and ok[0].vector is not None


def test_case02_train_adapt_refuses_the_500x1_image_before_training(tiny, scenes, tmp_path,
                                                                    cli):
    """Was: "10 images checked", then a crash when the image's batch came up."""
    data = copy(scenes, tmp_path / "data")
    Image.new("RGB", (500, 1), "red").save(data / "images" / "train" / "thin.png")
    line = append_row(data, "Scenes-T2I", "images/train/thin.png")
    rc, _, _ = cli(*adapt_args(tiny, data, tmp_path / "run"))
    assert rc == 2 and "aspect ratio" in cli.error and "thin.png" in cli.error
    assert f"Scenes-T2I.jsonl, line {line}, field 'qry_image_path'" in cli.error
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_case02_eval_refuses_the_500x1_image_with_one_line(tiny, scenes, tmp_path, cli):
    data = copy(scenes, tmp_path / "data")
    rel = json.loads((data / "eval" / "Scenes-Count.jsonl").read_text().splitlines()[0])[
        "qry_img_path"]
    Image.new("RGB", (1, 500), "red").save(data / rel)
    rc, _, _ = cli("eval", "--model", tiny, "--data", data / "eval", "--image-root", data,
                   "--datasets", "Scenes-Count", "--no-progress", "--out", tmp_path / "r.json")
    assert rc == 2 and "aspect ratio" in cli.error
    assert "Scenes-Count.jsonl, line 1, field 'qry_img_path'" in cli.error


# ---------------------------------------------------------------- 3. not UTF-8
def test_case03_latin1_jsonl_is_one_line_naming_file_and_line(tiny, scenes, tmp_path, cli):
    """Was: internal error UnicodeDecodeError (exit 1) in encode and eval."""
    items = tmp_path / "items.jsonl"
    items.write_bytes(b'{"text": "a red circle"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    rc, _, _ = cli("encode", "--model", tiny, "--input", items, "--out", tmp_path / "e.st")
    assert rc == 2
    assert "items.jsonl, line 2: not UTF-8 (byte 0xe9" in cli.error and "UTF-8" in cli.error
    data = copy(scenes, tmp_path / "data")
    f = data / "eval" / "Scenes-Count.jsonl"
    raw = f.read_bytes()
    assert b'"qry_text": "' in raw
    f.write_bytes(raw.replace(b'"qry_text": "', b'"qry_text": "\xe9', 1))  # latin-1 'e-acute'

    rc, _, _ = cli("eval", "--model", tiny, "--data", data / "eval", "--image-root", data,
                   "--datasets", "Scenes-Count", "--no-progress", "--out", tmp_path / "r.json")
    assert rc == 2 and "Scenes-Count.jsonl, line 1: not UTF-8" in cli.error


# ---------------------------------------------------------------- 4. control tokens
def test_case04_typed_special_tokens_never_act_as_control_tokens(three_paths):
    """Was: internal error in encode and 500 in serve with an image; silently taken as
    control tokens in text-only items. Now fam's layout splits them into plain text, alike
    everywhere."""
    img = _png(Image.new("RGB", (32, 32), "blue"))
    outcomes = three_paths.run("<|image_pad|><|image_pad|> <|image_1|> x", img)
    assert agree(outcomes) is None and outcomes[0].vector is not None, outcomes
    ad = three_paths.model.adapter
    special = set(ad.tokenizer.all_special_ids)
    for text in ("<|endoftext|> hi", "<|im_start|>system\n<|vision_start|><|image_pad|>"):
        ids = ad.encode([MMItem(text)]).inputs["input_ids"][0].tolist()
        assert not special & set(ids[:-1]), (text, ids)  # only the appended EOS is special
        outcomes = three_paths.run(text)
        assert agree(outcomes) is None and outcomes[0].vector is not None


def test_case04_vlm2vec_format_refuses_control_tokens(tiny_dirs):
    """The vlm2vec format tokenises the whole string at once: there the contract refuses."""
    from fam.backbones import load_backbone
    from fam.model import EmbeddingModel
    model = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec"))
    with pytest.raises(InputError, match="control token of this model"):
        model.encode([MMItem("<|image_pad|> x")])
    assert model.encode([MMItem("plain text")]).shape[0] == 1


# ---------------------------------------------------------------- 5. empty string
def test_case05_empty_string_is_refused_alike(three_paths):
    """Was: 200 with an all-zero vector over HTTP; fam encode refused it."""
    _refused_alike(three_paths.run(""), "empty item")
    r = three_paths.client.post("/v1/embeddings", json={"input": ""})
    assert r.status_code == 400 and "empty item" in r.json()["error"]["message"]
    r = three_paths.client.post("/v1/embeddings", json={"input": ["ok", ""]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("input[1]")


# ---------------------------------------------------------------- 6. placeholders
def test_case06_placeholders_must_name_an_image_of_the_item(three_paths):
    """Was: accepted by the server (200) without the image, or naming a second image."""
    _refused_alike(three_paths.run("<|image_1|> hello"), "<|image_1|>", "no image")
    img = _png(Image.new("RGB", (16, 16), "green"))
    _refused_alike(three_paths.run("<|image_2|> hello", img), "<|image_2|>", "1 image")
    _refused_alike(three_paths.run("<|image_1|> a <|image_1|>", img), "twice")


# ---------------------------------------------------------------- 8. absolute paths
def test_case08_absolute_paths_are_taken_with_image_root_slash(tiny, tmp_path, cli):
    """Was: refused even with --image-root /, "escapes the data root '/'"."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "x", "image": str(tmp_path / "a.png")}) + "\n")
    rc, out, _ = cli("encode", "--model", tiny, "--input", items, "--image-root", "/",
                     "--out", tmp_path / "e.st")
    assert rc == 0 and "1 embeddings" in out
    other = tmp_path / "other"
    other.mkdir()
    rc, _, _ = cli("encode", "--model", tiny, "--input", items, "--image-root", other,
                   "--out", tmp_path / "e2.st")
    assert rc == 2 and "is absolute and not under the data root" in cli.error
    assert "--image-root /" in cli.error


# ---------------------------------------------------------------- 9. very long text
def test_case09_a_long_text_is_cut_before_it_is_tokenised_whole(three_paths, monkeypatch):
    """Was: a 3.6 MB text took 8.4 s in fam encode (all of it tokenised, then cut)."""
    ad = three_paths.model.adapter
    text = ("A red circle left of a blue square, " * 100_000)[:3_600_000]
    seen: list[int] = []
    real = ad._tokenize_user

    def spy(t):
        seen.append(len(t))
        return real(t)

    monkeypatch.setattr(ad, "_tokenize_user", spy)
    t0 = time.perf_counter()
    long = three_paths.model.encode([MMItem(text)])
    took = time.perf_counter() - t0
    assert max(seen) < 100_000, seen  # a prefix, never the 3.6 M characters
    # The first max_text_tokens tokens are those of the whole text: the same embedding as
    # a prefix long enough to hold them.
    short = three_paths.model.encode([MMItem(text[:20_000])])
    # The same token ids through the same ops: equal but for float summation order.
    assert float((long - short).abs().max()) <= 1e-6
    print(f"3.6 MB text embedded in {took:.3f} s")
    outcomes = three_paths.run(text)
    assert agree(outcomes) is None, agree(outcomes)


def test_case09_text_over_the_limit_is_refused_alike(three_paths):
    from fam.data.items import MAX_TEXT_CHARS
    _refused_alike(three_paths.run("a" * (MAX_TEXT_CHARS + 1)), "longer than the limit")


# ---------------------------------------------------------------- 10. eval overwrites
def test_case10_eval_refuses_to_overwrite_earlier_results(tiny, scenes, tmp_path, cli):
    """Was: a second eval into the same folder replaced {Dataset}_score.json silently."""
    args = ["eval", "--model", tiny, "--data", scenes / "eval", "--image-root", scenes,
            "--datasets", "Scenes-Count", "--max-rows", "2", "--no-progress",
            "--out", tmp_path / "res" / "results.json"]
    assert cli(*args)[0] == 0
    score = tmp_path / "res" / "Scenes-Count_score.json"
    before = score.read_bytes()
    (tmp_path / "res" / "results.json").unlink()  # the score file alone is enough to refuse
    rc, _, _ = cli(*args)
    assert rc == 2 and "Scenes-Count_score.json" in cli.error and "--overwrite" in cli.error
    assert score.read_bytes() == before
    assert cli(*args, "--overwrite")[0] == 0


# ---------------------------------------------------------------- 11. unknown keys
def test_case11_unknown_and_misspelt_keys_are_refused_with_the_known_ones(three_paths):
    """Was: {"text": ..., "video": ...} embedded as the text alone, silently. (A Python
    call builds an MMItem, which has no free-form keys: the CLI and the server are compared.)"""
    # (items rows read 'video' since issue 18; a visual key fam does not read is refused)
    outcomes = three_paths.run("a red circle", extra={"audio": "clips/clip1.wav"})
    cli, srv = outcomes[1], outcomes[2]
    for o in (cli, srv):
        assert o.vector is None and "unknown key 'audio'" in o.reason, o
        assert "'text', 'image'" in o.reason
    assert cli.status == 2 and srv.status == 400
    outcomes = three_paths.run("a red circle", extra={"imgae": "a.png"})
    for o in outcomes[1:]:
        assert o.vector is None and "unknown key 'imgae' (did you mean 'image'?)" in o.reason


def test_case11_metadata_keys_are_kept_and_said_once(tiny, tmp_path, cli):
    """The items format keeps other keys as metadata by design (the index returns them): fam
    encode says once that they are not embedded."""
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"text": f"t{i}", "split": "a", "label": i}) + "\n"
                             for i in range(3)))
    rc, _, text = cli("encode", "--model", tiny, "--input", items, "--out", tmp_path / "e.st")
    assert rc == 0
    assert text.count("are not embedded") == 1 and "'label', 'split'" in text


def test_case11_mmeb_extra_columns_are_said_once(scenes, tmp_path, caplog):
    import logging

    from fam.data.mmeb import load_train
    data = copy(scenes, tmp_path / "data")
    f = data / "train" / "Scenes-T2I.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    f.write_text("".join(json.dumps({**r, "source_id": 1}) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        load_train(data / "train", data, subsets=["Scenes-T2I"])
    said = [r.getMessage() for r in caplog.records if "source_id" in r.getMessage()]
    assert len(said) == 1 and "ignored" in said[0]


def test_index_items_refuse_a_misspelt_key(tmp_path):
    from fam.errors import DataError
    from fam.index.items import read_items
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"txt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"unknown key 'txt' \(did you mean 'text'\?\)"):
        read_items(p)


def test_server_limits_default_to_the_contracts():
    """The server applies the contract's limits unless its operator changes them, so the
    differential test's defaults are the ones users get."""
    from fam.config import ServeConfig
    from fam.data.images import MAX_IMAGE_PIXELS
    from fam.data.items import MAX_IMAGES, MAX_TEXT_CHARS
    cfg = ServeConfig()
    assert (cfg.max_text_chars, cfg.max_image_pixels, cfg.max_images_per_input) == \
        (MAX_TEXT_CHARS, MAX_IMAGE_PIXELS, MAX_IMAGES)


def test_index_build_checks_every_item_with_the_models_rules_first(tiny, tmp_path):
    """fam index build applies the backbone's limits to every item before encoding."""
    from fam.errors import DataError
    from fam.index import build_index
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (500, 1), "red").save(tmp_path / "thin.png")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": "a", "image": "ok.png"}, {"text": "b"}, {"text": "c", "image": "thin.png"})))
    with pytest.raises(DataError, match=r"items.jsonl, line 3, field 'image'.*aspect ratio"):
        build_index(tmp_path / "idx", items, model=tiny, progress=False, shard_size=1)
    assert not list((tmp_path / ".idx.build").glob("shard-*"))  # nothing encoded
