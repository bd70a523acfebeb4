"""``/v1/search`` on a multi-vector index: MaxSim hits as ``fam search``, similarity maps that
are the score's own terms, the grid each adapter reports, and the one-line refusals."""
from __future__ import annotations

import base64
import contextlib
import io
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from fam.backbones import load_backbone  # noqa: E402
from fam.cli import main  # noqa: E402
from fam.config import ServeConfig  # noqa: E402
from fam.config.deploy import MultiVectorIndexConfig  # noqa: E402
from fam.data.types import MMItem  # noqa: E402
from fam.index import Index, build_index  # noqa: E402
from fam.index.maps import similarity_maps  # noqa: E402
from fam.model import EmbeddingModel  # noqa: E402
from fam.model.multivector import load_multivector  # noqa: E402
from fam.serve.app import Service, create_app  # noqa: E402

DOC = "<|image_1|>\nRepresent the given image."
N_IMAGES = 6  # maps_collection (conftest): six images of several aspects, one caption


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dirs, maps_collection):
    """(model dir, image root, {name: index dir}) for content / image / capped indexes."""
    work = tmp_path_factory.mktemp("maps")
    model = tiny_dirs["qwen2_vl"]
    items, root = maps_collection
    out = {}
    for name, mv in [("content", MultiVectorIndexConfig()),
                     ("image", MultiVectorIndexConfig(tokens="image", similarity="maxsim")),
                     ("capped", MultiVectorIndexConfig(max_tokens=6))]:
        out[name] = build_index(work / name, items, model=model, image_root=root,
                                progress=False, multivector=mv, query_prompt="Find: ")
    out["single"] = build_index(work / "single", items, model=model, image_root=root,
                                progress=False)
    return model, root, out


@contextlib.contextmanager
def _client(model, index):
    svc = Service(EmbeddingModel(load_backbone(model)), ServeConfig(), Index.load(index),
                  model_path=str(model))
    with TestClient(create_app(svc)) as c:
        yield c, svc


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_hits_are_fam_search_and_maps_are_the_score_terms(setup):
    model, root, idx = setup
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["search", "--index", str(idx["content"]), "--text", "a red circle", "-k",
                     "5", "--json"]) == 0
    cli = [json.loads(line) for line in buf.getvalue().splitlines()]
    with _client(model, idx["content"]) as (c, svc):
        r = c.post("/v1/search", json={"query": "a red circle", "k": 5, "maps": True})
        assert r.status_code == 200, r.text
        body = r.json()
        plain = c.post("/v1/search", json={"query": "a red circle", "k": 5}).json()
        assert c.get("/health").json()["multivector"] is True
    # the same hits and scores as fam search on the same index (the same code path)
    assert [(h["index"], h["score"]) for h in body["data"]] == \
        [(h["index"], h["score"]) for h in cli]
    assert [h["id"] for h in plain["data"]] == [h["id"] for h in cli]
    assert "maps" not in plain["data"][0] and "query_tokens" not in plain
    assert body["scoring"] == "maxsim" and body["similarity"] == "meanmaxsim"
    # the query tokens offered are the vectors: the prompt and the text, no special token
    toks = body["query_tokens"]
    assert "".join(toks) == "Find: a red circle"
    special = set(svc.model.adapter.tokenizer.all_special_tokens)
    assert not special & set(toks)
    for h in body["data"]:
        if h["image"] is None:  # the caption-only item has no image: no map, and says so
            assert h["maps"] is None and "no image" in h["maps_note"]
            continue
        m = h["maps"]
        w, hgt = Image.open(root / h["image"]).size
        rows, cols = m["grid"]
        # Qwen2-VL resizes the whole image (no crop: the box is all of it) to a multiple of
        # 28 px within its pixel budget: the grid follows the aspect
        assert m["box"] == [0.0, 0.0, 1.0, 1.0]
        assert (cols > rows, cols == rows) == (w > hgt, w == hgt)
        assert len(m["values"]) == len(m["contribution"]) == len(toks)
        assert all(len(v) == rows * cols for v in m["values"])
        # meanmaxsim: the score is the mean of the terms (terms rounded to 5 digits)
        assert abs(sum(m["contribution"]) / len(toks) - h["score"]) < 1e-5
        # a map never exceeds its term (the item's text tokens are vectors too)
        assert all(max(v) <= t for v, t in zip(m["values"], m["contribution"]))


@pytest.fixture(scope="module")
def llava_index(tmp_path_factory, tiny_dirs, maps_collection):
    items, root = maps_collection
    model = tiny_dirs["llava"]
    return model, build_index(tmp_path_factory.mktemp("maps-llava") / "idx", items, model=model,
                              image_root=root, progress=False,
                              multivector=MultiVectorIndexConfig())


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_maps_equal_a_plain_reading_of_the_item(setup, llava_index, family):
    """values[t, r·C + c] = q_t · (the head's vector of the item's image token at (r, c)),
    from a fresh per-item forward; contribution[t] = max over every stored vector. LLaVA's
    grid covers the centre crop of a non-square image."""
    model, root, idx = setup
    model, index = (model, idx["content"]) if family == "qwen2_vl" else llava_index
    with _client(model, index) as (c, svc):
        late = svc.late
        q, _ = late.query(svc.index.query_item("a blue circle"))
        emb, head = svc.model, late.head
        for i in range(N_IMAGES):
            m = late.maps(q, i)
            item = MMItem(DOC, root / "img" / f"{i}.png")
            batch = emb.adapter.encode([item])
            with torch.no_grad():
                out = emb(batch)
                vecs, _ = head(out)
            img_vecs = vecs[0][batch.image_mask[0]]  # sequence order = raster order
            assert m.values.shape == (len(q), m.grid.rows * m.grid.cols)
            ref = torch.tensor([[float(q[t] @ img_vecs[g]) for g in range(len(img_vecs))]
                                for t in range(len(q))])
            # float32 forwards of other batch shapes (index build vs one item)
            assert torch.allclose(m.values, ref, atol=1e-5)
            doc = svc.index.late.store.tokens[int(svc.index.late.store.offsets[i]):
                                              int(svc.index.late.store.offsets[i + 1])]
            want = torch.tensor([max(float(q[t] @ d) for d in doc) for t in range(len(q))])
            assert torch.allclose(m.contribution, want, atol=1e-6)  # float32 dot products
            w, h = Image.open(root / "img" / f"{i}.png").size
            if family == "llava":  # shortest edge to 112, a 112x112 centre crop: 8x8 patches
                assert (m.grid.rows, m.grid.cols) == (8, 8)
                want_box = ((1 - h / w) / 2 if w > h else 0.0, (1 - w / h) / 2 if h > w else 0.0,
                            (1 + h / w) / 2 if w > h else 1.0, (1 + w / h) / 2 if h > w else 1.0)
                # the same fractions computed in another order (pixels, then divided)
                assert m.grid.box == pytest.approx(want_box, abs=1e-12)


def test_image_token_index_each_maps_max_is_its_contribution(setup):
    """With only image tokens as vectors, every query token's map maximum IS its MaxSim term
    (exactly: one product), and their sum is the score."""
    model, root, idx = setup
    with _client(model, idx["image"]) as (c, svc):
        body = c.post("/v1/search", json={"query": {"image": _uri(root / "img" / "1.png")},
                                          "k": 4, "maps": True}).json()
        assert body["data"][0]["id"] == "im-1"  # the image finds itself
        toks = body["query_tokens"]
        g = svc.model.adapter.image_token_grid(Image.open(root / "img" / "1.png"))
        assert toks == [f"<image {n}>" for n in range(1, g.rows * g.cols + 1)]
        for h in body["data"]:
            m = h["maps"]
            assert [max(v) for v in m["values"]] == m["contribution"]
            assert abs(sum(m["contribution"]) - h["score"]) < 1e-3  # 24 terms rounded to 1e-5
        # a text query has no vectors in this token set: one line, 400
        r = c.post("/v1/search", json={"query": "a red circle", "maps": True})
        assert r.status_code == 400 and "no token vectors" in r.json()["error"]["message"]


def test_similarity_maps_is_one_product():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 8, generator=g), torch.randn(10, 8, generator=g)
    rows = torch.tensor([1, 2, 5, 7])
    values, contrib = similarity_maps(q, d, rows)
    assert torch.equal(values, (q @ d.T)[:, rows])
    assert torch.equal(contrib, (q @ d.T).max(1).values)


def test_refusals_and_capped_items(setup):
    model, _, idx = setup
    with _client(model, idx["single"]) as (c, _):
        r = c.post("/v1/search", json={"query": "a red circle", "maps": True})
        assert r.status_code == 400 and "--multivector" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "maps" and "\n" not in r.json()["error"]["message"]
        assert c.post("/v1/search", json={"query": "red"}).status_code == 200
        assert c.get("/health").json()["multivector"] is False
    with _client(model, idx["capped"]) as (c, _):
        for bad in (1, "yes", None):
            r = c.post("/v1/search", json={"query": "red", "maps": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "maps"
        body = c.post("/v1/search", json={"query": "a red circle", "k": 7, "maps": True}).json()
        capped = [h for h in body["data"] if h["image"]]
        assert capped and all(h["maps"] is None and "--max-tokens 6" in h["maps_note"]
                              for h in capped)


def test_grids_match_the_image_token_counts(tiny_dirs):
    """Each adapter's grid (+ leading tokens) is the number of image tokens it makes, and
    LLaVA's centre crop is the box."""
    for fam_ in ("qwen2_vl", "llava"):
        ad = load_backbone(tiny_dirs[fam_])
        for size in [(112, 112), (200, 100), (90, 150)]:
            im = Image.new("RGB", size, (9, 9, 9))
            grid = ad.image_token_grid(im)
            _, counts = ad.process_images([ad.prepare_image(im)])
            assert grid.first + grid.rows * grid.cols == counts[0]
    ad = load_backbone(tiny_dirs["llava"])
    assert ad.image_token_grid(Image.new("RGB", (200, 100))).box == (0.25, 0.0, 0.75, 1.0)
    assert ad.image_token_grid(Image.new("RGB", (100, 200))).box == (0.0, 0.25, 1.0, 0.75)


def test_fam_search_maps_writes_the_same_maps_as_png(setup, tmp_path, caplog):
    model, root, idx = setup
    out = tmp_path / "maps"
    assert main(["search", "--index", str(idx["content"]), "--image",
                 str(root / "img" / "2.png"), "-k", "4", "--maps", str(out)]) == 0
    saved = json.loads((out / "maps.json").read_text())
    with _client(model, idx["content"]) as (c, _):
        api = c.post("/v1/search", json={"query": {"image": _uri(root / "img" / "2.png")},
                                         "k": 4, "maps": True}).json()
    assert saved["query_tokens"] == api["query_tokens"]
    assert [(h["id"], h["maps"]) for h in saved["hits"]] == \
        [(h["id"], h["maps"]) for h in api["data"]]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{h['rank']:02d}-{h['id']}.png" for h in api["data"] if h["maps"]]
    sheet = Image.open(out / pngs[0])
    # the image, then one panel per query token
    assert sheet.width > len(api["query_tokens"]) * 100
    caplog.clear()
    assert main(["search", "--index", str(idx["single"]), "--text", "red", "--maps",
                 str(tmp_path / "x")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--multivector" in errors[0] and "\n" not in errors[0]


def test_overlay_covers_exactly_the_grid_box():
    """fam search --maps: a grid on the centre crop of a 2:1 image colours only that crop, one
    block per token, the hottest block at the hottest token's place."""
    from fam.backbones.batch import TokenGrid
    from fam.index.maps import RAMP, TokenMaps, overlay
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    values = torch.zeros(1, 4)
    values[0, 3] = 1.0  # bottom-right cell of a 2x2 grid
    m = TokenMaps(TokenGrid(2, 2, 0, (0.25, 0.0, 0.75, 1.0)), values, torch.ones(1))
    out = overlay(im, m, 0, 0.0, 1.0, alpha=1.0)
    assert out.getpixel((10, 50)) == (0, 0, 0) and out.getpixel((190, 50)) == (0, 0, 0)
    assert out.getpixel((60, 20)) == RAMP[0] and out.getpixel((140, 80)) == RAMP[-1]
    assert out.getpixel((140, 20)) == RAMP[0] and out.getpixel((60, 80)) == RAMP[0]
