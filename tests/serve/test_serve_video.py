"""``/v1/search`` with video and multi-image queries on a multi-vector index (MaxSim): the
query is encoded as ``fam search`` encodes it, the hits carry their frame and image URLs."""
from __future__ import annotations

import base64

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from fam.backbones import load_backbone  # noqa: E402
from fam.config import ServeConfig  # noqa: E402
from fam.config.deploy import MultiVectorIndexConfig  # noqa: E402
from fam.data.types import MMItem  # noqa: E402
from fam.index import Index, build_index  # noqa: E402
from fam.index.multivector import query_encoder  # noqa: E402
from fam.model import EmbeddingModel  # noqa: E402
from fam.serve.app import Service, create_app  # noqa: E402


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_multivector_search_with_a_video_query(tmp_path, tiny_dirs, video_collection):
    items, root = video_collection
    model = tiny_dirs["qwen2_vl"]
    idx = build_index(tmp_path / "mv", items, model=model, image_root=root, progress=False,
                      multivector=MultiVectorIndexConfig())
    index = Index.load(idx)
    emb = EmbeddingModel(load_backbone(model))
    frames = sorted((root / "vid/a").iterdir(), key=lambda p: int(p.stem.split("_")[1]))
    # What fam search does with the same query read from files: MaxSim over the index.
    q = query_encoder(index, emb, str(model)).encode_multi_all(
        [MMItem("a red square moving right", video=frames)])[1][0]
    want = index.search_tokens([q], 4)[0]
    svc = Service(emb, ServeConfig(), index, model_path=str(model))
    with TestClient(create_app(svc)) as c:
        r = c.post("/v1/search", json={"query": {"text": "a red square moving right",
                                                 "video": [_uri(p) for p in frames]}, "k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scoring"] == "maxsim"
        assert [h["id"] for h in body["data"]] == [h.id for h in want]
        # float32 token vectors, the same query through two paths: summation order only
        assert [h["score"] for h in body["data"]] == pytest.approx([h.score for h in want],
                                                                   abs=1e-5)
        clip = next(h for h in body["data"] if h["id"] == "clip-a")
        assert len(clip["frame_urls"]) == 8
        r = c.post("/v1/search", json={"query": {"images": [_uri(root / "img/0.png"),
                                                            _uri(root / "img/1.png")]},
                                       "k": 2})
        assert r.status_code == 200, r.text
