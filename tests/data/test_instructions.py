"""Scenes instruction data (VQA colour/count/relation, REC box text) on hand-made records."""
import json

import pytest

from fam.data.instructions import REC_PROMPT, build_instructions, write_instructions
from fam.errors import DataError
from fam.eval.rec import parse_box


def _region(colour, shape, size, box, expression):
    return {"label": f"{colour} {shape}", "score": 1.0, "box": box, "mask": {"size": [112, 112],
            "counts": "0"}, "expression": expression,
            "attributes": {"colour": colour, "shape": shape, "size": size}}


def _record(image, regions):
    return {"image": image, "width": 112, "height": 112, "tags": [], "regions": regions}


SCENE = _record("images/eval/ev00000.png", [
    _region("red", "circle", "small", [10, 10, 28, 28], "the red circle"),
    _region("blue", "square", "large", [70, 10, 102, 42], "the blue square"),
    _region("green", "square", "small", [70, 80, 88, 98], "the green square"),
])


def _rows(records, split="eval", **kw):
    return build_instructions(list(enumerate(records, start=1)), split, seed=0, **kw)


def test_count_colour_relation_rec_rows_are_true_of_the_scene():
    rows = _rows([SCENE], per_task=10)
    by = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r)
        assert r["image"] == SCENE["image"]
    assert by["vqa_count"] == [{"task": "vqa_count", "image": SCENE["image"],
                                "question": "How many objects are in the image?",
                                "answer": "three"}]
    # "square" is ambiguous (two squares): asked with the size; the circle is unique
    colour = {r["question"]: r["answer"] for r in by["vqa_colour"]}
    assert colour == {"What colour is the circle?": "red",
                      "What colour is the large square?": "blue",
                      "What colour is the small square?": "green"}
    # relations: check every answer against the geometry by hand
    centres = {"red circle": (19, 19), "blue square": (86, 26), "green square": (79, 89)}
    for r in by["vqa_relation"]:
        q = r["question"][len("Is the "):-1]
        for phrase, (axis, sign) in {"left of": (0, -1), "right of": (0, 1), "above": (1, -1),
                                     "below": (1, 1)}.items():
            if f" {phrase} the " in q:
                a, b = q.split(f" {phrase} the ")
                d = sign * (centres[a][axis] - centres[b][axis])
                assert (r["answer"] == "yes") == (d > 0), r
                assert abs(d) >= 12          # only clear relations are asked
                break
        else:
            raise AssertionError(r)
    # REC: the text parses back to the gold box, which is the object's box in percent
    for r in by["rec"]:
        assert r["question"] in {REC_PROMPT.format(e) for e in
                                 ("the red circle", "the blue square", "the green square")}
        assert parse_box(r["answer"]) == tuple(float(v) for v in r["box"])
    red = [r for r in by["rec"] if "red circle" in r["question"]][0]
    assert red["box"] == [9, 9, 25, 25]       # 10/112 → 8.9, 28/112 → 25.0


def test_relation_answers_are_balanced_and_deterministic():
    many = [dict(SCENE, image=f"images/train/tr{i:05d}.png") for i in range(200)]
    a = _rows(many, "train")
    b = _rows(many, "train")
    assert a == b
    yes = sum(r["answer"] == "yes" for r in a if r["task"] == "vqa_relation")
    n = sum(r["task"] == "vqa_relation" for r in a)
    assert n == 400 and 0.4 < yes / n < 0.6


def test_splits_and_counterfactuals():
    recs = [SCENE, dict(SCENE, image="images/eval/ev00000-swap.png"),
            dict(SCENE, image="images/train/tr00001.png"),
            dict(SCENE, image="images/train/tr00001-swap.png")]
    ev = {r["image"] for r in _rows(recs, "eval")}
    tr = {r["image"] for r in _rows(recs, "train")}
    assert ev == {"images/eval/ev00000.png"}
    assert tr == {"images/train/tr00001.png", "images/train/tr00001-swap.png"}
    with pytest.raises(ValueError, match="split"):
        _rows(recs, "test")


def test_ambiguous_objects_get_no_colour_or_relation_question():
    twins = _record("images/eval/ev00001.png", [
        _region("red", "circle", "small", [10, 10, 28, 28], "the red circle left of the red circle"),
        _region("red", "circle", "small", [70, 10, 88, 28], "the red circle right of the red circle")])
    tasks = [r["task"] for r in _rows([twins], per_task=5)]
    assert "vqa_colour" not in tasks and "vqa_relation" not in tasks
    assert tasks.count("rec") == 2 and tasks.count("vqa_count") == 1


def test_cap_per_task_and_missing_attributes():
    rows = _rows([dict(SCENE, image=f"images/eval/ev{i:05d}.png") for i in range(10)],
                 max_per_task=3)
    from collections import Counter
    assert set(Counter(r["task"] for r in rows).values()) == {3}
    bad = _record("images/eval/ev00002.png", [{"label": "red circle", "mask": {},
                                                "box": [0, 0, 5, 5]}])
    with pytest.raises(DataError, match="line 1.*attributes"):
        _rows([bad])


def test_write_instructions_files(tmp_path):
    (tmp_path / "pad.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [SCENE, dict(SCENE, image="images/train/tr00000.png")]))
    res = write_instructions(tmp_path, seed=0)
    train = json.loads((tmp_path / "sft_train.json").read_text())
    ev = json.loads((tmp_path / "sft_eval.json").read_text())
    assert {r["image"] for r in train} == {"images/train/tr00000.png"}
    assert {r["image"] for r in ev} == {"images/eval/ev00000.png"}
    assert res["counts"]["eval"]["vqa_count"] == 1
    with pytest.raises(DataError, match="generate the Scenes benchmark"):
        write_instructions(tmp_path / "missing")
