"""End-to-end MMEB evaluation with a fake encoder whose precision@1 is known by hand."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fam.data.images import load_image
from fam.data.types import MMItem
from fam.errors import DataError
from fam.eval.metrics import format_table
from fam.eval.mmeb import Encoder, evaluate, load_results, save_results

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
VOCAB = ["red", "green", "blue", "purple"]


class ColorEncoder:
    """Embeds an item as the one-hot of its colour: the image's dominant channel if it has
    an image (a real PNG is decoded), else the last word of the text. Records every item
    it encodes, to check deduplication."""

    def __init__(self):
        self.seen: list[MMItem] = []
        self.calls = 0

    def encode(self, items):
        self.calls += 1
        self.seen.extend(items)
        out = torch.zeros(len(items), len(VOCAB))
        for i, it in enumerate(items):
            if it.image is not None:
                px = load_image(it.image, source=it.source, line=it.line,
                                field=it.field).getpixel((0, 0))
                word = VOCAB[max(range(3), key=lambda c: px[c])]
            else:
                word = it.text.split()[-1]
            out[i, VOCAB.index(word)] = 1.0
        return out


class ConstantEncoder:
    def encode(self, items):
        return torch.ones(len(items), 3) / 3 ** 0.5


def _write(root: Path, name: str, rows) -> None:
    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def cls_row(img, cands):
    return {"qry_text": "<|image_1|> What colour is it? red", "qry_img_path": img,
            "tgt_text": cands, "tgt_img_path": [""] * len(cands)}


def ret_row(text, imgs, texts=None):
    return {"qry_text": f"Find an image of the colour {text}", "qry_img_path": "",
            "tgt_text": texts or [""] * len(imgs), "tgt_img_path": imgs}


@pytest.fixture
def bench(tmp_path):
    for name, rgb in COLORS.items():
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (3, 3), rgb).save(tmp_path / "img" / f"{name}.png")
    lab = lambda *ws: [f"The colour is {w}" for w in ws]  # noqa: E731
    _write(tmp_path, "ColorCls", [
        cls_row("img/red.png", lab("red", "green", "blue")),     # hit          -> 1
        cls_row("img/green.png", lab("green", "red", "blue")),   # hit          -> 1
        cls_row("img/blue.png", lab("green", "blue", "red")),    # miss         -> 0
    ])                                                           # mean 2/3
    _write(tmp_path, "ColorRet", [
        ret_row("blue", ["img/blue.png", "img/red.png"]),              # hit    -> 1
        ret_row("red", ["img/red.png", ""], ["", "a red thing, red"]),  # 2-way tie -> 1/2
        ret_row("green", ["img/green.png", "img/red.png", "img/blue.png"]),  # hit -> 1
        ret_row("purple", ["img/red.png", "img/blue.png"]),  # all scores 0: tie -> 1/2
    ])                                                           # mean 3/4
    (tmp_path / "datasets.json").write_text(json.dumps({
        "ColorCls": {"meta_task": "classification", "split": "IND", "n_candidates": 3},
        "ColorRet": {"meta_task": "retrieval", "split": "OOD"},
    }))
    return tmp_path


def test_evaluate_end_to_end(bench, tmp_path):
    enc = ColorEncoder()
    assert isinstance(enc, Encoder)
    res = evaluate(enc, bench, batch_size=2, progress=False)
    cls, ret = res["datasets"]["ColorCls"], res["datasets"]["ColorRet"]
    assert cls["precision@1"] == pytest.approx(200 / 3)
    assert ret["precision@1"] == pytest.approx(75.0)
    assert (cls["n"], cls["n_candidates"], cls["meta_task"], cls["split"]) == \
        (3, 3, "classification", "IND")
    assert ret["n"] == 4 and ret["n_candidates"] == pytest.approx(9 / 4)
    assert res["meta_task"] == {"classification": pytest.approx(200 / 3), "vqa": None,
                                "retrieval": 75.0, "grounding": None}
    assert res["IND"] == pytest.approx(200 / 3) and res["OOD"] == 75.0
    assert res["overall"] == pytest.approx((200 / 3 + 75) / 2)
    # Chance: datasets.json's n_candidates (1/3) for ColorCls, the rows' mean 1/C for ColorRet.
    assert cls["chance"] == pytest.approx(100 / 3)
    assert ret["chance"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert res["chance"]["overall"] == pytest.approx((cls["chance"] + ret["chance"]) / 2)

    # Deduplication: each distinct (text, image) is encoded exactly once per dataset:
    # ColorCls has 3 queries + 3 labels; ColorRet 4 queries + 3 images + 1 text.
    assert cls["n_encoded"] == 6 and ret["n_encoded"] == 8
    assert len(enc.seen) == 14 and len(set(enc.seen[:6])) == 6 and len(set(enc.seen[6:])) == 8

    out = tmp_path / "out" / "results.json"
    save_results(res, out)
    assert load_results(out) == json.loads(json.dumps(res))
    table = format_table([("color", res), ("const", evaluate(ConstantEncoder(), bench,
                                                              progress=False))])
    assert "Classification" in table and "Overall" in table


def test_per_row_credits_are_kept_in_row_order(bench):
    # the hand-made rows of `bench`: hits, misses and the expected credit of ties
    res = evaluate(ColorEncoder(), bench, batch_size=2, progress=False, per_row=True)
    assert res["datasets"]["ColorCls"]["credits"] == [1.0, 1.0, 0.0]
    assert res["datasets"]["ColorRet"]["credits"] == [1.0, 0.5, 1.0, 0.5]
    for d in res["datasets"].values():     # the dataset score is their mean
        assert 100 * sum(d["credits"]) / len(d["credits"]) == pytest.approx(d["precision@1"])
    assert "credits" not in evaluate(ColorEncoder(), bench, progress=False)["datasets"]["ColorCls"]


def test_constant_encoder_scores_exactly_chance(bench):
    # A naive argmax would give 100% here (the positive is always listed first).
    res = evaluate(ConstantEncoder(), bench, progress=False)
    for d in res["datasets"].values():
        assert d["precision@1"] == pytest.approx(d["chance"])
    res = evaluate(ConstantEncoder(), bench, progress=False, ties="pessimistic")
    assert res["overall"] == 0.0
    # optimistic = argmax with the positive first: a constant scorer "wins" everything,
    # which is why it is not the default (it is what leaderboard numbers use)
    res = evaluate(ConstantEncoder(), bench, progress=False, ties="optimistic")
    assert res["overall"] == 100.0 and res["ties"] == "optimistic"


def test_score_files_like_vlm2vec(bench, tmp_path):
    from fam.eval.mmeb import save_score_files
    for ties in ("optimistic", "expected"):
        res = evaluate(ConstantEncoder(), bench, progress=False, ties=ties)
        paths = save_score_files(res, tmp_path / ties)
        assert sorted(p.name for p in paths) == sorted(f"{n}_score.json" for n in res["datasets"])
        for name, d in res["datasets"].items():
            got = json.loads((tmp_path / ties / f"{name}_score.json").read_text())
            assert set(got) == {"acc", "num_correct", "num_pred"}
            assert got["num_pred"] == d["n"]
            assert got["acc"] == pytest.approx(d["precision@1"] / 100)
            assert got["num_correct"] == pytest.approx(got["acc"] * d["n"])
            if ties == "optimistic":
                assert isinstance(got["num_correct"], int) and got["acc"] == 1.0


def test_dataset_selection_max_rows_and_single_file(bench):
    res = evaluate(ColorEncoder(), bench / "eval", image_root=bench, datasets=["ColorRet"],
                   max_rows=1, progress=False)
    assert list(res["datasets"]) == ["ColorRet"] and res["datasets"]["ColorRet"]["n"] == 1
    assert res["overall"] == 100.0 and res["IND"] is None and res["n_datasets"]["IND"] == 0
    res = evaluate(ColorEncoder(), bench / "eval/ColorCls.jsonl", image_root=bench,
                   progress=False)
    assert res["datasets"]["ColorCls"]["precision@1"] == pytest.approx(200 / 3)
    with pytest.raises(DataError, match=r"\['Nope'\] not found"):
        evaluate(ColorEncoder(), bench, datasets=["Nope"], progress=False)


def test_non_mmeb_dataset_is_evaluated_under_its_own_heading_outside_the_means(bench, caplog):
    # Issue 8: a dataset that is neither one of the 36 MMEB names nor in datasets.json no
    # longer refuses the whole run; it is scored, listed apart, kept out of every mean.
    _write(bench, "Mystery", [ret_row("red", ["img/red.png", "img/blue.png"])])
    res = evaluate(ColorEncoder(), bench, progress=False)
    mystery = res["datasets"]["Mystery"]
    assert mystery["precision@1"] == 100.0 and mystery["n"] == 1
    assert mystery["meta_task"] is None and mystery["split"] is None
    assert res["other_datasets"] == ["Mystery"]
    # the means are those of the two declared datasets alone
    assert res["overall"] == pytest.approx((200 / 3 + 75) / 2)
    assert res["n_datasets"]["overall"] == 2
    assert "Mystery: not MMEB dataset(s)" in caplog.text and "left out of" in caplog.text
    table = format_table([("color", res)])
    head, _, tail = table.partition("Other datasets (not in the means)")
    assert "Mystery" not in head and "Mystery" in tail and "100.0" in tail


def test_missing_and_corrupt_images(bench):
    _write(bench, "ColorRet", [ret_row("red", ["img/red.png", "img/gone.png"])])
    with pytest.raises(DataError, match=r"ColorRet\.jsonl, line 1, field 'tgt_img_path\[1\]'"
                                        r": image not found"):
        evaluate(ColorEncoder(), bench, progress=False)
    (bench / "img/gone.png").write_bytes(b"garbage bytes, not a png")
    # A corrupt image surfaces from the encoder's load_image, still naming the row.
    with pytest.raises(DataError, match=r"line 1.*gone\.png: corrupt"):
        evaluate(ColorEncoder(), bench, datasets=["ColorRet"], progress=False)


def test_bad_encoder_outputs(bench):
    class Wrong:
        def encode(self, items):
            return torch.zeros(len(items) + 1, 4)

    class Nan:
        def encode(self, items):
            return torch.full((len(items), 4), float("nan"))

    with pytest.raises(ValueError, match=r"expected a tensor of shape \(n, d\)"):
        evaluate(Wrong(), bench, progress=False)
    with pytest.raises(ValueError, match="ColorCls.*NaN"):
        evaluate(Nan(), bench, progress=False)
