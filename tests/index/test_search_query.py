"""Which text a search query is embedded with: an image-only query embeds as the index's
images did (so an indexed image finds itself first), a text query gets the query prompt, an
explicit prompt wins; ``fam search`` says which it used, ``/v1/search`` follows the same rule."""
from __future__ import annotations

import base64
import json

import pytest
import torch

from fam.backbones import load_backbone
from fam.cli import main
from fam.index import Index, build_index, embed
from fam.model import EmbeddingModel

pytest.importorskip("faiss")

DOC = "<|image_1|>\nRepresent the given image."


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs["qwen2_vl"]


@pytest.fixture(scope="module")
def emb_model(model_dir):
    return EmbeddingModel(load_backbone(model_dir))


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_collection, model_dir, emb_model):
    items, root = small_collection
    out = tmp_path_factory.mktemp("qidx") / "index"
    return build_index(out, items, model=model_dir, image_root=root, query_prompt="Find: ",
                       progress=False, embedding_model=emb_model)


def test_an_indexed_image_queried_alone_embeds_as_its_document_and_ranks_first(
        built, small_collection, emb_model):
    _, root = small_collection
    idx = Index.load(built)
    for i in (0, 5, 11):
        item = idx.query_item("", root / "img" / f"{i}.png")
        assert item.text == DOC  # the items' own text, not the query prompt nor nothing
        q = embed(emb_model, [item])
        # The same text and image as the stored row: the same vector (fp32 sums of another
        # batch size differ in the last bits).
        assert torch.allclose(q[0], idx.vectors.embeddings[i], atol=1e-5)
        assert idx.search(q, 3)[0][0].id == f"scene-{i}"


def test_query_text_rules(built):
    idx = Index.load(built)
    assert idx.query_text("a red circle", False) == "Find: a red circle"
    assert idx.query_text("a red circle", True) == "Find: a red circle"  # text + image
    assert idx.query_text("", True) == DOC
    assert idx.query_text("<|image_1|>", True) == DOC  # the messages form of an image alone
    assert idx.query_text("", True, prompt="") == ""  # explicit: the image alone
    assert idx.query_text("x", False, prompt="Q: {text}?") == "Q: x?"
    # A document prompt applies to the shared text; without a majority text it applies alone.
    idx.manifest.document_prompt = "Doc: "
    assert idx.query_text("", True) == "Doc: " + DOC
    for r in idx.rows[:7]:
        r["text"] = r["id"]
    assert idx.query_text("", True) == "Doc: "


def test_cli_search_says_which_prompt_it_used(built, small_collection, capsys):
    _, root = small_collection
    assert main(["search", "--index", str(built), "--image", str(root / "img" / "3.png"),
                 "-k", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[0])["id"] == "scene-3"  # stdout stays JSON
    assert "as the index's images were" in err and repr(DOC) in err and "--query-prompt" in err
    assert main(["search", "--index", str(built), "--text", "a red circle", "-k", "1"]) == 0
    err = capsys.readouterr().err
    assert "'Find: a red circle'" in err and "--query-prompt" in err


def test_http_search_with_an_image_alone_finds_it_first(built, small_collection, model_dir,
                                                        emb_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fam.config import ServeConfig
    from fam.serve.app import Service, create_app
    _, root = small_collection
    svc = Service(emb_model, ServeConfig(), Index.load(built), model_path=str(model_dir))
    uri = "data:image/png;base64," + base64.b64encode(
        (root / "img" / "7.png").read_bytes()).decode()
    with TestClient(create_app(svc)) as client:
        for body in ({"query": {"image": uri}, "k": 2},
                     {"messages": [{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": uri}}]}], "k": 2}):
            r = client.post("/v1/search", json=body)
            assert r.status_code == 200, r.text
            top = r.json()["data"][0]
            # the image embeds as its indexed copy: cosine 1 up to float32 rounding of the
            # forward (different batch) and the JSON round trip
            assert top["id"] == "scene-7" and top["score"] == pytest.approx(1.0, abs=1e-5)
