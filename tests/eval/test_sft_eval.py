"""SFT evaluation: VQA matching rules, file validation, and the end-to-end scoring path."""
import json

import numpy as np
import pytest
from PIL import Image

from fam.backbones import build_tiny
from fam.errors import DataError
from fam.eval import sft as sft_eval
from fam.eval.sft import evaluate_captions, evaluate_sft, score_vqa


def test_score_vqa_first_word_rules():
    s = score_vqa(["Red.", "three objects", "no", "", "yes"], ["red", "two", "no", "one", "no"])
    assert s["hits"] == [True, False, True, False, False]
    assert s["accuracy"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        score_vqa(["a"], [])


def _files(tmp_path):
    img = tmp_path / "images" / "eval"
    img.mkdir(parents=True)
    Image.fromarray(np.full((56, 56, 3), 128, np.uint8)).save(img / "ev00000.png")
    rows = [{"image": "images/eval/ev00000.png", "question": "What colour is the circle?",
             "answer": "red", "task": "vqa_colour"},
            {"image": "images/eval/ev00000.png", "question": "Where is the red circle? Answer "
             "with a box.", "answer": "[10, 10, 30, 30]", "task": "rec", "box": [10, 10, 30, 30]}]
    (tmp_path / "sft_eval.json").write_text(json.dumps(rows))
    pad = {"image": "images/eval/ev00000.png", "width": 56, "height": 56, "regions": [
        {"label": "red circle", "box": [5, 5, 17, 17], "mask": {},
         "attributes": {"colour": "red", "shape": "circle", "size": "small"}}]}
    (tmp_path / "pad.jsonl").write_text(json.dumps(pad) + "\n")
    (tmp_path / "captions_eval.json").write_text(json.dumps(
        [{"image": "images/eval/ev00000.png", "caption": "a small red circle",
          "blip_caption": "a picture of a red circle"}]))
    return rows


def test_evaluate_sft_scores_what_generate_returns(tmp_path, monkeypatch):
    _files(tmp_path)
    # the scoring path, with the generator replaced by fixed answers
    monkeypatch.setattr(sft_eval, "generate", lambda a, prompts, **kw: ["red", "[10, 10, 30, 29]"])
    res = evaluate_sft(None, tmp_path / "sft_eval.json", tmp_path)
    assert res["vqa_colour"]["accuracy"] == 1.0 and res["vqa"]["n"] == 1
    assert res["rec"]["accuracy"] == 1.0 and res["rec"]["mean_iou"] == pytest.approx(0.95)
    monkeypatch.setattr(sft_eval, "generate", lambda a, prompts, **kw: ["a red circle"])
    cap = evaluate_captions(None, tmp_path / "pad.jsonl", tmp_path / "captions_eval.json",
                            tmp_path)
    assert cap["object_f1"] == 1.0 and cap["n"] == 1


def test_bad_rows_are_named(tmp_path):
    rows = _files(tmp_path)
    del rows[1]["box"]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="line 2.*box"):
        evaluate_sft(None, tmp_path / "bad.json", tmp_path)
    with pytest.raises(DataError, match="write the SFT data first"):
        evaluate_sft(None, tmp_path / "missing.json", tmp_path)


def test_real_generation_runs_end_to_end(tmp_path):
    _files(tmp_path)
    adapter = build_tiny("llava", size="xs", image_size=56, corpus=["a red circle"], seed=0)
    res = evaluate_sft(adapter, tmp_path / "sft_eval.json", tmp_path, max_new_tokens=4)
    assert res["rec"]["n"] == 1 and res["vqa"]["n"] == 1
    assert isinstance(res["examples"]["rec"][0]["answer"], str)
