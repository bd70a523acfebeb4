"""An MMEB-V2-layout folder (frame folders, moment-retrieval clips, BEIR parquet pages, image
rows) evaluated end to end with ``fam eval``; the visual-document score recomputed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import ndcg_score

from fam.backbones import load_backbone
from fam.cli import main
from fam.data.mmeb.v2 import discover_v2, read_task
from fam.data.types import MMItem
from fam.eval.mmeb_v2 import V2_GROUPS, is_v2_benchmark
from fam.eval.ranking import K_LIST, METRICS
from fam.model.embedding import EmbeddingModel

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLORS = [(220, 30, 30), (30, 200, 40), (40, 40, 230), (230, 220, 30)]


def _video(folder, colour, direction, n=10, size=(56, 56)):
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", size, (80, 80, 80))
        x = 4 + (i if direction > 0 else n - 1 - i) * 3
        ImageDraw.Draw(im).ellipse([x, 20, x + 14, 34], fill=colour)
        im.save(folder / f"{i:04d}.png")


def _page(path, lines):
    im = Image.new("RGB", (84, 112), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for k, (txt, col) in enumerate(lines):
        d.text((4, 4 + 14 * k), txt, fill=col)
    im.save(path)


def _write(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    for v, col in enumerate(COLORS):
        _video(root / "frames" / f"vid{v}", col, 1 if v % 2 else -1)
    # video classification, local over labels
    _write(root / "K700.jsonl", [
        {"qry_text": "<|video_1|> Recognize the category of the video content.",
         "qry_video": f"frames/vid{v}",
         "tgt_text": [f"label {v}"] + [f"label {o}" for o in range(4) if o != v]}
        for v in range(4)])
    # moment retrieval: clip folders, two positives in one row
    for q in range(2):
        d = root / "clips" / f"q{q}"
        _video(d / "query", COLORS[q], 1)
        _video(d / "positive_1", COLORS[q], 1, n=4)
        _video(d / "positive_2", COLORS[q], -1, n=4)
        for k in range(3):
            _video(d / f"negative_{k}", COLORS[(q + k + 1) % 4], 1, n=4)
    _write(root / "MomentSeeker.jsonl", [
        {"qry_text": f"find the moment of colour {q}", "clip_dir": f"clips/q{q}",
         "tgt_text": "Understand the content of the provided video."} for q in range(2)])
    # caption -> video over the pool (BEIR, jsonl)
    d = root / "MSR-VTT"
    d.mkdir()
    _write(d / "queries.jsonl", [{"query-id": f"c{v}", "query": f"a ball of colour {v}"}
                                 for v in range(4)])
    _write(d / "corpus.jsonl", [{"corpus-id": f"v{v}", "video": f"frames/vid{v}"}
                                for v in range(4)])
    _write(d / "qrels.jsonl", [{"query-id": f"c{v}", "corpus-id": f"v{v}", "score": 1}
                               for v in range(4)])
    # visual documents (BEIR parquet, graded, several positives)
    (root / "pages").mkdir()
    for p in range(6):
        _page(root / "pages" / f"p{p}.png", [(f"page {p}", COLORS[p % 4]), ("table", (0, 0, 0))])
    d = root / "ViDoRe_arxivqa"
    d.mkdir()
    _write(d / "queries.parquet", [{"query-id": q, "query": f"question {q}"} for q in range(3)]
           + [{"query-id": 9, "query": "no relevant page"}])
    _write(d / "corpus.parquet", [{"corpus-id": p, "image": f"pages/p{p}.png"}
                                  for p in range(6)])
    _write(d / "qrels.parquet", [
        {"query-id": 0, "corpus-id": 0, "score": 2}, {"query-id": 0, "corpus-id": 3, "score": 1},
        {"query-id": 1, "corpus-id": 1, "score": 1}, {"query-id": 1, "corpus-id": 4, "score": 2},
        {"query-id": 1, "corpus-id": 5, "score": 1}, {"query-id": 2, "corpus-id": 2, "score": 1},
        {"query-id": 9, "corpus-id": 2, "score": 0}])
    # an image task in MMEB's rows
    _write(root / "VOC2007.jsonl", [
        {"qry_text": "<|image_1|>\nRepresent the given image for classification.",
         "qry_img_path": f"pages/p{p}.png", "tgt_text": [f"page {p}", "other", "none"],
         "tgt_img_path": ["", "", ""]} for p in range(3)])
    return root


def test_layouts_read_and_validated(bench):
    found = discover_v2(bench)
    assert {n: k for n, (k, _) in found.items()} == {
        "K700": "rows", "MomentSeeker": "rows", "MSR-VTT": "beir", "ViDoRe_arxivqa": "beir",
        "VOC2007": "rows"}
    assert is_v2_benchmark(bench)
    mret = read_task("MomentSeeker", *found["MomentSeeker"], bench)
    q = mret.queries[0]
    assert len(q.candidates) == 5 and len(q.relevance) == 2 and len(q.item.video) == 10
    assert [mret.corpus[c].video[0].parent.name for c in q.relevance] == \
        ["positive_1", "positive_2"]
    doc = read_task("ViDoRe_arxivqa", *found["ViDoRe_arxivqa"], bench)
    assert doc.dropped == 1 and doc.queries[1].relevance == {"1": 1.0, "4": 2.0, "5": 1.0}
    assert doc.queries[0].item.text.startswith("Find a document image")
    assert doc.corpus["0"].text.startswith("<|image_1|> Understand the content")


def test_fam_eval_end_to_end(bench, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    assert main(["eval", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(bench),
                 "--out", str(out), "--no-progress", "--batch-size", "4"]) == 0
    res = json.loads(out.read_text())
    assert set(res["groups"]) == {f"{m}/{g}" for m, gs in V2_GROUPS.items() for g in gs}
    assert len(res["groups"]) == 9
    for key in ("image", "video", "visdoc", "overall"):
        assert res[key] is not None and 0 <= res[key] <= 100
    assert res["n_datasets"] == {**res["n_datasets"], "video": 3, "visdoc": 1, "image": 1,
                                 "overall": 5}
    assert res["datasets"]["MSR-VTT"]["ranking"] == "global"
    assert res["datasets"]["MomentSeeker"]["ranking"] == "local"
    score = json.loads((out.parent / "ViDoRe_arxivqa_score.json").read_text())
    assert {f"{m}@{k}" for m in METRICS for k in K_LIST} <= set(score)
    assert score["num_pred"] == 3
    assert res["datasets"]["ViDoRe_arxivqa"]["score"] == pytest.approx(
        100 * score["ndcg_linear@5"])
    # the visdoc score recomputed by hand: the documented prompts, cosine, sklearn's NDCG
    m = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"])).eval()
    pages = [MMItem("<|image_1|> Understand the content of the provided document image.",
                    bench / "pages" / f"p{p}.png") for p in range(6)]
    queries = [MMItem(f"Find a document image that matches the given query: question {q}")
               for q in range(3)]
    with torch.no_grad():
        qe, pe = m.encode(queries), m.encode(pages)
    grades = np.zeros((3, 6))
    for q, p, s in [(0, 0, 2), (0, 3, 1), (1, 1, 1), (1, 4, 2), (1, 5, 1), (2, 2, 1)]:
        grades[q, p] = s
    # the same float32 embeddings: only the rounding of the cosine differs.
    assert score["ndcg_linear@5"] == pytest.approx(
        ndcg_score(grades, (qe @ pe.T).numpy(), k=5), abs=1e-6)  # scores in float32
    assert "visdoc" in capsys.readouterr().out
    # --compare reads V2 results: the nine groups and the modalities, with differences
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert "video/moment_retrieval" in table and "+0.0" in table and "visdoc" in table


def test_bad_qrels_get_one_clear_error(bench, tiny_dirs, tmp_path, caplog):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(bench, bad)
    _write(bad / "ViDoRe_arxivqa" / "qrels.parquet",
           [{"query-id": 0, "corpus-id": 77, "score": 1}])
    code = main(["eval", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(bad),
                 "--out", str(tmp_path / "r.json"), "--no-progress",
                 "--datasets", "ViDoRe_arxivqa"])
    err = caplog.text
    assert code == 2 and "qrels.parquet" in err and "corpus-id" in err and "77" in err
    assert "Traceback" not in err


def test_vlm2vec_format_reproduces_v2_prompts(bench, tiny_dirs):
    """The loaders' items under prompt_format="vlm2vec" tokenise as VLM2Vec-V2 writes them:
    "<|image_pad|>"*N + " " + instruction for a page, the same with <|video_pad|> for a
    video, the instruction and the query for a text query."""
    a = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec")
    found = discover_v2(bench)
    doc = read_task("ViDoRe_arxivqa", *found["ViDoRe_arxivqa"], bench)
    ret = read_task("MSR-VTT", *found["MSR-VTT"], bench)
    tok = a.tokenizer
    for item, pad in ((doc.corpus["0"], "<|image_pad|>"), (ret.corpus["v0"], "<|video_pad|>")):
        b = a.encode([item])
        n = int(b.image_mask.sum())
        inst = ("Understand the content of the provided document image." if pad.startswith(
            "<|image") else "Understand the content of the provided video.")
        assert b.inputs["input_ids"][0].tolist() == tok(pad * n + " " + inst)["input_ids"]
    q = doc.queries[0].item
    assert a.encode([q]).inputs["input_ids"][0].tolist() == tok(
        "Find a document image that matches the given query: question 0")["input_ids"]


@pytest.mark.parametrize("case", ["no_positive", "lengths", "dup_corpus", "score", "missing_query",
                                  "frames"])
def test_bad_v2_rows_name_file_line_and_field(bench, tmp_path, case):
    import shutil

    from fam.errors import DataError
    root = tmp_path / "b"
    shutil.copytree(bench, root)
    if case == "no_positive":
        shutil.rmtree(root / "clips" / "q1" / "positive_1")
        shutil.rmtree(root / "clips" / "q1" / "positive_2")
        name, field, line = "MomentSeeker", "clip_dir", 2
    elif case == "lengths":
        _write(root / "K700.jsonl", [{"qry_text": "x", "tgt_text": ["a", "b"],
                                      "tgt_video": ["frames/vid0"] * 3}])
        name, field, line = "K700", "tgt_text", 1
    elif case == "dup_corpus":
        _write(root / "MSR-VTT" / "corpus.jsonl", [{"corpus-id": "v0", "video": "frames/vid0"}] * 2)
        name, field, line = "MSR-VTT", "corpus-id", 2
    elif case == "score":
        _write(root / "MSR-VTT" / "qrels.jsonl", [{"query-id": "c0", "corpus-id": "v0",
                                                   "score": "high"}])
        name, field, line = "MSR-VTT", "score", 1
    elif case == "missing_query":
        _write(root / "MSR-VTT" / "queries.jsonl", [{"query-id": "c0"}])
        name, field, line = "MSR-VTT", "query", 1
    else:
        _write(root / "K700.jsonl", [{"qry_text": "x", "qry_video": "frames/none",
                                      "tgt_text": ["a", "b"]}])
        name, field, line = "K700", "qry_video", 1
    found = discover_v2(root)
    with pytest.raises(DataError) as e:
        read_task(name, *found[name], root)
    assert e.value.field == field and e.value.line == line, str(e.value)
