"""MMEB loaders: row validation with file/line/field errors, layouts, parquet == JSONL."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fam.data.mmeb import (EvalRow, TrainPair, TrainPairDataset, collate_train_pairs,
                           dataset_info, discover_datasets, load_dataset_infos, load_eval,
                           load_train, validate_images)
from fam.data.types import MMItem
from fam.errors import DataError


def _png(path: Path, color=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _train_row(i=0, **kw):
    row = {"qry": f"<|image_1|> Represent the given image {i}.", "qry_image_path": "img/a.png",
           "pos_text": f"label {i}", "pos_image_path": ""}
    row.update(kw)
    return row


@pytest.fixture
def root(tmp_path):
    _png(tmp_path / "img/a.png")
    _png(tmp_path / "img/b.png", (0, 255, 0))
    return tmp_path


def test_load_train_jsonl(root):
    _jsonl(root / "train/Cls.jsonl", [
        _train_row(0),
        _train_row(1, neg_text="wrong label", neg_image_path=""),
        _train_row(2, qry="no placeholder", neg_text="", neg_image_path=None),
        {"qry": "find the picture", "qry_image_path": "", "pos_text": "",
         "pos_image_path": "img/b.png", "neg_text": "", "neg_image_path": "img/a.png"},
    ])
    pairs = load_train(root, root)  # a benchmark root: descends into train/
    assert [p.line for p in pairs] == [1, 2, 3, 4]
    p0, p1, p2, p3 = pairs
    assert p0.query == MMItem("<|image_1|> Represent the given image 0.", root / "img/a.png")
    assert p0.pos == MMItem("label 0") and p0.neg is None
    assert p1.neg == MMItem("wrong label")
    assert p2.neg is None and p2.query.image == root / "img/a.png"  # image goes first
    assert p3.pos.image == root / "img/b.png" and p3.neg == MMItem("", root / "img/a.png")
    assert p0.dataset == "Cls" and p0.source.endswith("Cls.jsonl")
    # Items remember their row, so an adapter's image error can name it.
    assert p3.pos.source == p3.source and p3.pos.line == 4 and p3.pos.field == "pos_image_path"
    assert p0.pos.field == "pos_text"
    assert validate_images(pairs) == 2
    assert p0.load_image("query").size == (4, 4) and p0.load_image("pos") is None

    ds = TrainPairDataset(pairs)
    assert len(ds) == 4 and ds[1] is p1 and ds.datasets == ["Cls"]
    assert collate_train_pairs([ds[0], ds[1]]) == [p0, p1]


def test_max_per_subset_and_subset_selection(root):
    _jsonl(root / "d/A.jsonl", [_train_row(i) for i in range(20)])
    _jsonl(root / "d/B.jsonl", [_train_row(i) for i in range(3)])
    a = load_train(root / "d", root, subsets=["A"], max_per_subset=5, seed=1)
    assert len(a) == 5 and {p.dataset for p in a} == {"A"}
    assert [p.line for p in a] == sorted(p.line for p in a)  # file order kept
    assert [p.line for p in load_train(root / "d", root, ["A"], 5, seed=1)] == \
        [p.line for p in a]
    assert len(load_train(root / "d", root, max_per_subset=5)) == 8
    with pytest.raises(DataError, match=r"\['C'\] not found"):
        load_train(root / "d", root, subsets=["C"])


@pytest.mark.parametrize("line,expect", [
    ('{"qry": "x", ', r"Bad\.jsonl, line 2: invalid JSON"),
    (json.dumps({"qry": "x", "qry_image_path": "", "pos_text": "y"}),
     r"Bad\.jsonl, line 2, field 'pos_image_path': field missing"),
    (json.dumps(_train_row(qry=5)), r"line 2, field 'qry': expected a string, got int"),
    (json.dumps(_train_row(pos_image_path=["a.png"])),
     r"line 2, field 'pos_image_path': expected an image path string"),
    (json.dumps(_train_row(qry_image_path="../x.png")),
     r"line 2, field 'qry_image_path': image path '\.\./x\.png' escapes the data root"),
    (json.dumps(_train_row(qry_image_path="/etc/passwd")), r"field 'qry_image_path'.*is absolute and not under the data root"),
    (json.dumps(_train_row(qry_image_path="")),
     r"field 'qry': the text contains <\|image_1\|> but 'qry_image_path' is empty"),
    (json.dumps(_train_row(pos_text="", pos_image_path="")), r"field 'pos_text': empty item"),
    (json.dumps(_train_row(neg_text=3)), r"field 'neg_text': expected a string"),
])
def test_train_row_errors_name_file_line_field(root, line, expect):
    _jsonl(root / "d/Bad.jsonl", [json.dumps(_train_row(0)), line])
    _jsonl(root / "d/Good.jsonl", [_train_row(0)])
    with pytest.raises(DataError, match=expect) as err:
        load_train(root / "d", root)
    assert err.value.line == 2
    # The bad file does not spoil the others.
    assert len(load_train(root / "d", root, subsets=["Good"])) == 1


def test_missing_and_corrupt_images_are_lazy_and_named(root):
    (root / "img/bad.png").write_bytes(b"\x89PNG garbage, not an image")
    _jsonl(root / "d/S.jsonl", [_train_row(0), _train_row(1, qry_image_path="img/gone.png"),
                                _train_row(2, qry_image_path="img/bad.png")])
    pairs = load_train(root / "d", root)  # loading never opens images
    assert len(pairs) == 3
    with pytest.raises(DataError, match=r"S\.jsonl, line 2, field 'qry_image_path': "
                                        r"image not found: .*gone\.png"):
        validate_images(pairs)
    with pytest.raises(DataError, match=r"line 3.*bad\.png: corrupt") as e:
        pairs[2].load_image("query")
    assert e.value.field == "qry_image_path" and e.value.path.endswith("S.jsonl")
    with pytest.raises(DataError, match=r"bad\.png"):
        validate_images([pairs[2]], decode=True)
    assert pairs[0].load_image("query").mode == "RGB"  # the good rows still work


def _eval_rows():
    return [
        {"qry_text": "<|image_1|> What is it?", "qry_img_path": "img/a.png",
         "tgt_text": ["red", "green", "blue"], "tgt_img_path": ["", "", ""]},
        {"qry_text": "find a green picture", "qry_img_path": "",
         "tgt_text": ["", ""], "tgt_img_path": ["img/b.png", "img/a.png"]},
        {"qry_text": "find a red picture", "qry_img_path": "",
         "tgt_text": "", "tgt_img_path": ["img/a.png", "img/b.png"]},  # broadcast string
    ]


def test_parquet_and_jsonl_give_identical_rows(root):
    _jsonl(root / "j/Cls.jsonl", _eval_rows())
    (root / "p").mkdir()
    rows = _eval_rows()
    rows[2]["tgt_text"] = ["", ""]  # parquet columns have one type
    pq.write_table(pa.Table.from_pylist(rows), root / "p/Cls.parquet")
    a, b = load_eval(root / "j", root)["Cls"], load_eval(root / "p", root)["Cls"]
    strip = lambda rs: [(r.query, r.candidates, r.dataset, r.line) for r in rs]  # noqa: E731
    assert strip(a) == strip(b) and len(a) == 3
    assert a[0].candidates[0] == MMItem("red") and a[1].candidates[0].image == root / "img/b.png"
    assert b[0].source.endswith("Cls.parquet") and b[2].line == 3

    # Parquet has one schema for all rows: absent negatives are "" (or null) there.
    train = [_train_row(i, neg_text="", neg_image_path=None) for i in range(3)] + \
        [_train_row(3, neg_text="n", neg_image_path="img/b.png")]
    _jsonl(root / "tj/T.jsonl", train)
    (root / "tp").mkdir()
    pq.write_table(pa.Table.from_pylist(train), root / "tp/T.parquet")
    ta, tb = load_train(root / "tj", root), load_train(root / "tp", root)
    key = lambda ps: [(p.query, p.pos, p.neg, p.dataset, p.line) for p in ps]  # noqa: E731
    assert key(ta) == key(tb) and ta[0].neg is None and ta[3].neg.image == root / "img/b.png"


def test_parquet_errors_name_row_and_column(root):
    (root / "p").mkdir()
    rows = _eval_rows()[:2]
    rows[1]["tgt_img_path"] = ["img/b.png", "../../etc/x.png"]
    pq.write_table(pa.Table.from_pylist(rows), root / "p/E.parquet")
    with pytest.raises(DataError, match=r"E\.parquet, line 2, field 'tgt_img_path\[1\]': "
                                        r"image path .* escapes"):
        load_eval(root / "p", root)
    pq.write_table(pa.Table.from_pylist([{"qry": "x"}]), root / "p/E.parquet")
    with pytest.raises(DataError, match=r"E\.parquet, field 'qry_text': column missing"):
        load_eval(root / "p", root)
    (root / "p/E.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"E\.parquet: cannot read parquet"):
        load_eval(root / "p", root)


@pytest.mark.parametrize("patch,expect", [
    ({"tgt_text": ["a", "b", "c"], "tgt_img_path": ["", ""]},
     r"line 1, field 'tgt_img_path': tgt_text has 3 candidates but tgt_img_path has 2"),
    ({"tgt_text": ["a"], "tgt_img_path": [""]}, r"field 'tgt_text': need at least 2"),
    ({"tgt_text": "a", "tgt_img_path": ""}, r"field 'tgt_text': expected a list"),
    ({"tgt_text": ["a", 7, "c"]}, r"field 'tgt_text\[1\]': expected a string"),
    ({"tgt_text": {"a": 1}}, r"field 'tgt_text': expected a list of strings, got dict"),
    ({"qry_text": None}, r"field 'qry_text': expected a string, got NoneType"),
])
def test_eval_row_errors(root, patch, expect):
    row = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b", "c"],
           "tgt_img_path": ["", "", ""]}
    row.update(patch)
    _jsonl(root / "e/X.jsonl", [row])
    with pytest.raises(DataError, match=expect):
        load_eval(root / "e", root)


def test_hf_folder_layout_picks_split(root):
    rows = [_train_row(i) for i in range(4)]
    d = root / "mmeb_train/ImageNet_1K"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), d / "original-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:3]), d / "original-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows), d / "diverse_instruction-00000-of-00001.parquet")
    pairs = load_train(root / "mmeb_train", root)
    assert len(pairs) == 3 and pairs[2].line == 1 and pairs[2].source.endswith("00002.parquet")
    assert len(load_train(root / "mmeb_train", root, split="diverse_instruction")) == 4
    with pytest.raises(DataError, match="none is 'test'; pass split="):
        discover_datasets(root / "mmeb_train", "eval")
    assert dataset_info("ImageNet_1K").name == "ImageNet-1K"  # train spelling accepted
    _jsonl(root / "mmeb_train/ImageNet_1K.jsonl", rows)
    with pytest.raises(DataError, match="both as a file and as a folder"):
        discover_datasets(root / "mmeb_train", "train")


def test_dataset_info_table_and_datasets_json(tmp_path):
    info = dataset_info("RefCOCO")
    assert (info.meta_task, info.split) == ("grounding", "OOD")
    assert dataset_info("MSCOCO").meta_task == "grounding"
    assert dataset_info("MSCOCO_t2i").meta_task == "retrieval"
    (tmp_path / "eval").mkdir()
    (tmp_path / "datasets.json").write_text(json.dumps({
        "Shapes": {"meta_task": "classification", "split": "IND", "n_candidates": 4,
                   "source": "synthetic"},
        "Colors": {"meta_task": "retrieval", "split": "OOD", "chance": 0.125},
        "ImageNet-1K": {"n_candidates": 10},
    }))
    # Found from the benchmark root and from its eval/ folder.
    for d in (tmp_path, tmp_path / "eval"):
        shapes = dataset_info("Shapes", d)
        assert shapes.chance == 0.25 and shapes.extra == {"source": "synthetic"}
        assert dataset_info("Colors", d).chance == 0.125
        inet = dataset_info("ImageNet-1K", d)
        assert (inet.meta_task, inet.split, inet.chance) == ("classification", "IND", 0.1)
    assert dataset_info("ImageNet-1K").chance is None  # table: computed from the data
    with pytest.raises(DataError, match=r"unknown dataset 'Nope'.*datasets\.json"):
        dataset_info("Nope", tmp_path)
    (tmp_path / "datasets.json").write_text(json.dumps({"Colors": {"meta_task": "retrieval",
                                                                   "split": "OOD",
                                                                   "chance": 12.5}}))
    with pytest.raises(DataError, match=r"field 'Colors\.chance'.*percentage"):
        load_dataset_infos(tmp_path)
    (tmp_path / "datasets.json").write_text(json.dumps({"New": {"split": "IND"}}))
    with pytest.raises(DataError, match=r"field 'New\.meta_task'"):
        load_dataset_infos(tmp_path)


def test_records_are_slotted():
    # Memory: real subsets hold 100K rows, so records carry no per-instance __dict__.
    assert not hasattr(TrainPair(MMItem("a"), MMItem("b"), None, "d", "s", 1), "__dict__")
    assert not hasattr(EvalRow(MMItem("a"), [], "d", "s", 1), "__dict__")


@pytest.mark.parametrize("nested", [False, True], ids=["shards", "split-folders"])
def test_mmeb_train_as_published(tmp_path, caplog, nested):
    """MMEB-train: original / diverse_instruction splits beside a legacy train shard; images
    in the dataset's images/ folder, paths relative to the dataset folder."""
    data = tmp_path / "MMEB-train"
    for sub in ("ImageNet_1K", "N24News"):
        _png(data / "images" / sub / "0.png")
    variants = {"original": "Represent the given image.",
                "diverse_instruction": "Describe this picture for retrieval.",
                "train": "legacy instruction"}
    for sub in ("ImageNet_1K", "N24News"):
        for split, inst in variants.items():
            rows = [_train_row(i, qry=f"<|image_1|> {inst}",
                               qry_image_path=f"images/{sub}/0.png") for i in range(2)]
            if nested:
                f = data / sub / split / "0000.parquet"
            else:
                f = data / sub / f"{split}-00000-of-00001.parquet"
            f.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), f)
    with caplog.at_level("WARNING"):
        pairs = load_train(data, None)  # image root found: the dataset folder
    assert "ignoring the legacy 'train' shard of 2 subset folder(s)" in caplog.text
    assert {p.dataset for p in pairs} == {"ImageNet_1K", "N24News"} and len(pairs) == 4
    assert all(variants["original"] in p.query.text for p in pairs)
    assert pairs[0].query.image == data / "images" / "ImageNet_1K" / "0.png"
    assert pairs[0].load_image("query").size == (4, 4)
    div = load_train(data, None, split="diverse_instruction")
    assert all(variants["diverse_instruction"] in p.query.text for p in div)
    legacy = load_train(data, None, split="train")  # still readable when asked for
    assert all(variants["train"] in p.query.text for p in legacy)
    with pytest.raises(DataError, match="none is 'nope'"):
        load_train(data, None, split="nope")


def test_mmeb_eval_split_folders_and_image_root_guess(tmp_path):
    from fam.data.mmeb.layout import guess_image_root
    data = tmp_path / "MMEB-eval"
    rows = _eval_rows()[:2]  # parquet columns hold lists only
    for name, layout in (("VOC2007", "test-00000-of-00001.parquet"),
                         ("MSCOCO", "test/0000.parquet")):
        (data / name / layout).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), data / name / layout)
    found = discover_datasets(data, "eval")
    assert {k: [p.relative_to(data).as_posix() for p in v] for k, v in found.items()} == {
        "MSCOCO": ["MSCOCO/test/0000.parquet"], "VOC2007": ["VOC2007/test-00000-of-00001.parquet"]}
    fields = ("qry_img_path", "tgt_img_path")
    # no images anywhere: the default stays (validation then names the missing file)
    assert guess_image_root(data, found["VOC2007"], fields, data) == data
    for rel in {r["qry_img_path"] for r in rows} | {p for r in rows for p in r["tgt_img_path"]}:
        if rel:
            _png(tmp_path / "eval_images" / rel)
    assert guess_image_root(data, found["VOC2007"], fields, data) == tmp_path / "eval_images"
