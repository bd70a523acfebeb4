"""Issue 8, item 7: bad input that used to crash, double, truncate or pass silently.

Each case runs the command the issue names; the answer is one line naming the file, line
or field (exit 2, no traceback), or, where the issue asks for it, the bad part is skipped
and counted or reported apart.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from reliability_helpers import adapt_args, append_row, bomb_png, copy


def _first_row_images(jsonl: Path, field: str) -> str:
    return json.loads(jsonl.read_text().splitlines()[0])[field]


def _eval_args(model: Path, data: Path, tmp: Path, *extra: object) -> list[object]:
    return ["eval", "--model", model, "--data", data / "eval", "--image-root", data,
            "--no-progress", "--max-rows", "2", "--out", tmp / "res.json", *extra]


# ---------------------------------------------------------------- decompression bombs
def test_decompression_bomb_in_eval_is_one_line_naming_the_row(tiny, scenes, tmp_path, cli):
    data = copy(scenes, tmp_path / "data")
    rel = _first_row_images(data / "eval" / "Scenes-Count.jsonl", "qry_img_path")
    bomb_png(data / rel)  # a 30000 x 30000 PNG header in place of the image
    rc, _, _ = cli(*_eval_args(tiny, data, tmp_path, "--datasets", "Scenes-Count"))
    assert rc == 2
    assert "Scenes-Count.jsonl, line 1, field 'qry_img_path'" in cli.error
    assert "larger than the limit of" in cli.error and rel in cli.error


def test_decompression_bomb_in_training_stops_before_the_first_step(tiny, scenes, tmp_path,
                                                                     cli):
    data = copy(scenes, tmp_path / "data")
    bomb_png(data / "images" / "train" / "bomb.png")
    line = append_row(data, "Scenes-T2I", "images/train/bomb.png")  # a late batch
    rc, _, _ = cli(*adapt_args(tiny, data, tmp_path / "run"))
    assert rc == 2 and "larger than the limit of" in cli.error and "bomb.png" in cli.error
    assert f"Scenes-T2I.jsonl, line {line}, field 'qry_image_path'" in cli.error
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_pad_build_skips_a_bomb_and_counts_it(scenes, tmp_path, cli):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for src in sorted((scenes / "images" / "train").glob("*.png"))[:2]:
        shutil.copy(src, images / src.name)
    bomb_png(images / "sub" / "bomb.png")
    gt = tmp_path / "gt.jsonl"  # ground truth for the two real images
    recs = [json.loads(line) for line in (scenes / "pad.jsonl").read_text().splitlines()]
    names = {p.name for p in images.glob("*.png")}
    gt.write_text("".join(json.dumps({**r, "image": Path(r["image"]).name}) + "\n"
                          for r in recs if Path(r["image"]).name in names))
    out = tmp_path / "pad.jsonl"
    rc, stdout, _ = cli("pad", "build", "--images", images, "--out", out, "--provider", "gt",
                        "--gt", gt, "--no-progress")
    assert rc == 0
    stats = json.loads(stdout)
    assert stats["images_done"] == 2 and stats["images_failed"] == 1
    assert stats["failed"][0]["image"] == "sub/bomb.png"
    assert "larger than the limit" in stats["failed"][0]["error"]
    assert len(out.read_text().splitlines()) == 2


# ---------------------------------------------------------------- training data, up front
def test_training_checks_every_image_before_the_first_step(tiny, scenes, tmp_path, cli):
    """A truncated image in the last row used to fail when its batch came up (step 10/10);
    now the run refuses before training, naming the row."""
    data = copy(scenes, tmp_path / "data")
    png = next((data / "images" / "train").glob("*.png")).read_bytes()
    (data / "images" / "train" / "cut.png").write_bytes(png[:len(png) // 2])
    line = append_row(data, "Scenes-VQA-Relation", "images/train/cut.png")
    rc, _, _ = cli(*adapt_args(tiny, data, tmp_path / "run"))
    assert rc == 2 and "corrupt or truncated image" in cli.error and "cut.png" in cli.error
    assert f"Scenes-VQA-Relation.jsonl, line {line}, field 'qry_image_path'" in cli.error
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- eval data layout
def test_eval_refuses_one_split_stored_as_jsonl_and_parquet(tiny, scenes, tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "eval" / "Scenes-Count"
    folder.mkdir(parents=True)
    src = scenes / "eval" / "Scenes-Count.jsonl"
    shutil.copy(src, folder / "test.jsonl")
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    rc, _, _ = cli("eval", "--model", tiny, "--data", tmp_path / "eval", "--image-root",
                   scenes, "--no-progress", "--out", tmp_path / "res.json")
    assert rc == 2
    assert "Scenes-Count" in cli.error and "test.jsonl" in cli.error
    assert "test.parquet" in cli.error and "keep one format" in cli.error


def test_eval_reports_a_non_mmeb_dataset_apart(tiny, scenes, tmp_path, cli):
    data = copy(scenes, tmp_path / "data")
    shutil.copy(data / "eval" / "Scenes-Count.jsonl", data / "eval" / "MyOwnSet.jsonl")
    rc, out, text = cli(*_eval_args(tiny, data, tmp_path, "--datasets", "Scenes-Count",
                                    "MyOwnSet"))
    assert rc == 0
    assert "MyOwnSet: not MMEB dataset(s)" in text and "left out of the" in text
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["other_datasets"] == ["MyOwnSet"] and res["n_datasets"]["overall"] == 1
    assert res["overall"] == res["datasets"]["Scenes-Count"]["precision@1"]
    head, _, tail = out.partition("Other datasets (not in the means)")
    assert "MyOwnSet" in tail and "MyOwnSet" not in head


# ---------------------------------------------------------------- encode
@pytest.mark.parametrize("row,says", [
    ({}, "line 2, field 'text': empty item"),
    ({"text": "<|image_1|> a photo"}, "line 2, field 'text': the text names <|image_1|> but "
                                      "the item has no image"),
    ({"text": 3}, "line 2, field 'text': expected a string, got a number"),
    ({"text": "x", "image": ["a.png"]}, "line 2, field 'image': expected an image path"),
    ({"text": "", "image": ""}, "line 2, field 'text': empty item"),
])
def test_encode_refuses_bad_items_with_one_line(row, says, tiny, scenes, tmp_path, cli):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "a red circle"}) + "\n" + json.dumps(row) + "\n")
    rc, _, _ = cli("encode", "--model", tiny, "--input", items, "--image-root", scenes,
                   "--out", tmp_path / "emb.safetensors")
    assert rc == 2 and says in cli.error and "items.jsonl" in cli.error
    assert not (tmp_path / "emb.safetensors").exists()


def test_encode_never_writes_nan_embeddings(tiny, scenes, tmp_path, cli, monkeypatch):
    from fam.model import EmbeddingModel

    def nan_encode(self, items, batch_size=32, **kwargs):
        return torch.full((len(items), 8), float("nan"))
    monkeypatch.setattr(EmbeddingModel, "encode", nan_encode)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "a red circle"}) + "\n")
    out = tmp_path / "emb.safetensors"
    rc, _, _ = cli("encode", "--model", tiny, "--input", items, "--out", out)
    assert rc == 2 and "non-finite embeddings" in cli.error and "nothing was written" in cli.error
    assert not out.exists()


def test_eval_never_reports_numbers_from_nan_embeddings(tiny, scenes, tmp_path, cli,
                                                        monkeypatch):
    from fam.model import EmbeddingModel

    def nan_encode(self, items, batch_size=32, **kwargs):
        return torch.full((len(items), 8), float("nan"))
    monkeypatch.setattr(EmbeddingModel, "encode", nan_encode)
    monkeypatch.setattr(EmbeddingModel, "encode_all", nan_encode)  # what evaluate() calls
    rc, _, _ = cli(*_eval_args(tiny, scenes, tmp_path, "--datasets", "Scenes-Count"))
    assert rc == 2 and "non-finite embeddings" in cli.error
    assert "Scenes-Count.jsonl, line 1" in cli.error  # the first item's row
    assert not (tmp_path / "res.json").exists()


# ---------------------------------------------------------------- outputs that are not ours
def test_pad_build_never_touches_a_file_that_is_not_a_pad(scenes, tmp_path, cli):
    for text in ("my notes, one line without a newline", "line one\nline two\n",
                 '{"not": "a pad record"}\n{"image": "x.png", "regions": []}\n{"partial'):
        notes = tmp_path / "notes.txt"
        notes.write_text(text)
        rc, _, _ = cli("pad", "build", "--images", scenes, "--out", notes, "--provider", "gt",
                       "--no-progress", "--limit", "1")
        assert rc == 2 and "notes.txt, line 1" in cli.error and "not a PAD" in cli.error
        assert notes.read_text() == text  # untouched


def test_scenes_refuses_a_folder_with_foreign_subsets(tmp_path, cli):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    foreign = out / "train" / "ImageNet_1K.jsonl"
    foreign.write_text('{"qry": "x"}\n')
    small = ["n_train_images=6", "n_eval_images=3", "n_ood_images=1", "eval_rows=2",
             "n_candidates=2"]
    rc, _, _ = cli("data", "scenes", "--out", out, *small)
    assert rc == 2 and "ImageNet_1K.jsonl" in cli.error and "not part of Scenes" in cli.error
    assert foreign.read_text() == '{"qry": "x"}\n'
    foreign.unlink()
    # its own earlier generation is replaced: a smaller one leaves no stale image behind
    assert cli("data", "scenes", "--out", out, "n_train_images=8", *small[1:])[0] == 0
    assert len(list((out / "images" / "train").glob("tr*.png"))) >= 8
    assert cli("data", "scenes", "--out", out, *small)[0] == 0
    listed = {p.name for p in (out / "images" / "train").glob("*.png")}
    wanted = {Path(c["image"]).name for c in json.loads((out / "captions.json").read_text())}
    assert listed == wanted  # exactly this generation's images


# ---------------------------------------------------------------- permissions
def test_models_checkpoints_and_results_have_normal_permissions(finished_run, tiny, scenes,
                                                                tmp_path, cli):
    """Temporary folders are created 0700 and files 0600; every writer renames them into
    place with the modes a plain mkdir/open would give (umask applied)."""
    from fam.utils.checkpoint import default_mode
    dirs = [finished_run / "model", finished_run / "adapter",
            *sorted((finished_run / "checkpoints").iterdir())]
    assert cli(*_eval_args(finished_run / "model", scenes, tmp_path, "--datasets",
                           "Scenes-Count"))[0] == 0
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "a red circle"}) + "\n")
    assert cli("encode", "--model", tiny, "--input", items, "--out", tmp_path / "e.st")[0] == 0
    files = [tmp_path / "res.json", tmp_path / "e.st", finished_run / "train_metrics.json",
             *(f for d in dirs for f in d.iterdir())]
    for d in dirs:
        assert stat.S_IMODE(os.stat(d).st_mode) == default_mode(True), d
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == default_mode(False), f
