"""fam index build / fam search: the folder, parity with fam encode, resume, model check, CLI."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fam.backbones import load_backbone
from fam.cli import main
from fam.errors import ConfigError, DataError
from fam.index import Index, build_index, model_identity
from fam.index import build as build_mod
from fam.index.items import read_items
from fam.model import EmbeddingModel

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs["qwen2_vl"]


@pytest.fixture(scope="module")
def emb_model(model_dir):
    return EmbeddingModel(load_backbone(model_dir))


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_collection, model_dir, emb_model):
    items, root = small_collection
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(out, items, model=model_dir, image_root=root, query_prompt="Find: ",
                shard_size=5, batch_size=4, progress=False, embedding_model=emb_model)
    return out


def test_index_folder_manifest_and_vectors_equal_fam_encode(built, small_collection, model_dir,
                                                            emb_model, tmp_path):
    items, root = small_collection
    m = json.loads((built / "manifest.json").read_text())
    assert m["format"] == "fam-index" and m["kind"] == "flat" and m["metric"] == "inner_product"
    assert m["normalized"] is True and m["query_prompt"] == "Find: "
    assert m["model_identity"] == model_identity(model_dir) and m["count"] == 13
    assert not (built.parent / ".index.build").exists()  # the work folder is gone
    # The vectors are what `fam encode` writes for the same items.
    enc = tmp_path / "emb.safetensors"
    assert main(["encode", "--model", str(model_dir), "--input", str(items), "--image-root",
                 str(root), "--out", str(enc)]) == 0
    ref = load_file(str(enc))["embeddings"]
    idx = Index.load(built)
    assert idx.vectors.embeddings.shape == ref.shape == (13, m["dim"])
    assert torch.allclose(idx.vectors.embeddings, ref, atol=1e-6)  # batch 4 vs 32: fp32 sums
    hits = idx.search(ref[:3], k=4)
    assert [h[0].id for h in hits] == ["scene-0", "scene-1", "scene-2"]
    assert hits[0][0].metadata == {"split": "test"} and hits[0][0].image == "img/0.png"
    assert idx.image_file(0) == (root / "img" / "0.png").resolve()
    assert idx.image_file(12) is None and idx.image_file(99) is None


def test_build_from_fam_encode_embeddings_carries_the_model_identity(
        built, small_collection, model_dir, tmp_path):
    items, root = small_collection
    enc = tmp_path / "emb.safetensors"
    main(["encode", "--model", str(model_dir), "--input", str(items), "--image-root", str(root),
          "--out", str(enc)])
    out = build_index(tmp_path / "idx2", items, embeddings=enc, image_root=root, kind="hnsw",
                      progress=False)
    idx = Index.load(out)
    assert idx.manifest.model_identity == model_identity(model_dir)
    assert idx.manifest.kind == "hnsw" and (out / "index.faiss").is_file()
    # Without the identity metadata the model must be named.
    from safetensors.torch import save_file
    bare = tmp_path / "bare.safetensors"
    save_file({"embeddings": load_file(str(enc))["embeddings"]}, str(bare))
    with pytest.raises(ConfigError, match="does not say which model"):
        build_index(tmp_path / "idx3", items, embeddings=bare, image_root=root, progress=False)
    with pytest.raises(ConfigError, match="12 items|13 items"):
        short = tmp_path / "short.jsonl"
        short.write_text("".join(items.read_text().splitlines(True)[:12]))
        build_index(tmp_path / "idx4", short, embeddings=enc, image_root=root, progress=False)


class _Killed(BaseException):
    """Stands for the process being killed mid-build (not an Exception: nothing catches it)."""


def test_killed_build_resumes_without_redoing_finished_shards(small_collection, model_dir,
                                                              emb_model, built, tmp_path,
                                                              monkeypatch):
    items, root = small_collection
    calls = []
    kill = [True]
    real = build_mod.embed

    def flaky(model, its, **kw):
        calls.append(len(its))
        if kill[0] and len(calls) == 3:  # dies inside the second shard (shards of 4, batches of 2)
            raise _Killed
        return real(model, its, **kw)

    monkeypatch.setattr(build_mod, "embed", flaky)
    out = tmp_path / "idx"
    kw = dict(model=model_dir, image_root=root, query_prompt="Find: ", shard_size=4,
              batch_size=2, progress=False, embedding_model=emb_model)
    with pytest.raises(_Killed):
        build_index(out, items, **kw)
    assert not out.exists()
    work = tmp_path / ".idx.build"
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-00000.safetensors"]
    calls.clear()
    kill[0] = False
    build_index(out, items, **kw)
    assert sum(calls) == 13 - 4  # the finished shard was not encoded again
    assert not work.exists()
    ref = Index.load(built).vectors.embeddings
    # float32 unit vectors encoded in a resumed run: different batch composition, summation order only
    assert torch.allclose(Index.load(out).vectors.embeddings, ref, atol=1e-6)


def test_build_with_other_inputs_starts_over(small_collection, model_dir, emb_model, tmp_path,
                                             monkeypatch, caplog):
    items, root = small_collection
    work = tmp_path / ".idx.build"
    work.mkdir()
    (work / "build.json").write_text(json.dumps({"model_identity": "sha256:other"}))
    (work / "shard-00000.safetensors").write_bytes(b"stale")
    with caplog.at_level(logging.WARNING):
        build_index(tmp_path / "idx", items, model=model_dir, image_root=root, shard_size=20,
                    progress=False, embedding_model=emb_model)
    assert "starting over" in caplog.text
    assert Index.load(tmp_path / "idx").manifest.count == 13


def test_items_errors_name_file_line_and_field(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"items.jsonl, line 2, field 'text'"):
        read_items(p)
    p.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match=r"line 2, field 'id': duplicate id 'a'"):
        read_items(p)
    p.write_text('{"text": "x", "image": "../../etc/passwd"}\n')
    with pytest.raises(DataError, match="escapes the data root"):
        read_items(p)


def test_cli_search_table_json_and_refusal_of_another_model(built, small_collection, tiny_dirs,
                                                           capsys, caplog):
    items, root = small_collection
    assert main(["search", "--index", str(built), "--text", "a red circle", "-k", "3",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    assert main(["search", "--index", str(built), "--image", str(root / "img" / "5.png"),
                 "--text", "<|image_1|>\nRepresent the given image."]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["rank", "score", "id"]
    assert "scene-5" in out.splitlines()[1]  # the same image and text find themselves first
    # Another model (LLaVA) is refused with one line and exit code 2.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["search", "--index", str(built), "--model", str(tiny_dirs["llava"]),
                     "--text", "x"]) == 2
    msg = caplog.records[-1].getMessage()
    assert "was built by model sha256:" in msg and "\n" not in msg
    assert main(["search", "--index", str(built)]) == 2  # no query


def test_moved_index_and_missing_manifest(built, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(built, moved)
    assert Index.load(moved).manifest.count == 13
    (moved / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="not an index folder"):
        Index.load(moved)


def test_encode_options_and_adapters_are_part_of_the_identity(small_collection, model_dir,
                                                              tmp_path):
    """Vectors made with another input layout live in another space: their index refuses the
    plain model."""
    from safetensors import safe_open
    items, root = small_collection
    plain, other = tmp_path / "plain.safetensors", tmp_path / "vlm2vec.safetensors"
    base = ["encode", "--model", str(model_dir), "--input", str(items), "--image-root", str(root)]
    assert main(base + ["--out", str(plain)]) == 0
    assert main(base + ["--out", str(other), "--prompt-format", "vlm2vec"]) == 0

    def ident(p):
        with safe_open(str(p), "pt") as f:
            return f.metadata()["fam_model_identity"]

    assert ident(plain) == model_identity(model_dir)
    assert ident(other) != ident(plain)
    assert ident(other) == model_identity(model_dir, options={"prompt_format": "vlm2vec"})
    out = build_index(tmp_path / "idx", items, embeddings=other, image_root=root,
                      progress=False)
    assert main(["search", "--index", str(out), "--model", str(model_dir), "--text", "x"]) == 2
