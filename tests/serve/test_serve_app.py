"""The HTTP API in-process (FastAPI's TestClient): parity with fam encode, forms, errors."""
from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from fam.backbones import load_backbone  # noqa: E402
from fam.cli import main  # noqa: E402
from fam.index import Index, build_index  # noqa: E402
from fam.model import EmbeddingModel  # noqa: E402
from fam.serve.app import Service, create_app  # noqa: E402
from fam.config import ServeConfig  # noqa: E402

KEY = "s3cret-token"
DOC = "<|image_1|>\nRepresent the given image."


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs["qwen2_vl"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, small_collection, model_dir):
    items, root = small_collection
    return build_index(tmp_path_factory.mktemp("sidx") / "index", items, model=model_dir,
                       image_root=root, progress=False)


def _client(model_dir, index_dir=None, **cfg):
    svc = Service(EmbeddingModel(load_backbone(model_dir)), ServeConfig(**cfg),
                  Index.load(index_dir) if index_dir else None, model_path=str(model_dir))
    return TestClient(create_app(svc))


@pytest.fixture(scope="module")
def client(model_dir, index_dir):
    with _client(model_dir, index_dir, max_image_bytes=200_000, max_image_pixels=1_000_000,
                 max_request_bytes=2_000_000) as c:
        yield c


@pytest.fixture(scope="module")
def auth_client(model_dir):
    with _client(model_dir, api_key=KEY) as c:
        yield c


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _png(w: int, h: int, raw: bytes) -> bytes:
    """A 1-bit grayscale PNG of w×h pixels from raw (filtered) scanlines."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def test_server_embeddings_equal_fam_encode(client, small_collection, model_dir, tmp_path):
    items, root = small_collection
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    ref_path = tmp_path / "emb.safetensors"
    assert main(["encode", "--model", str(model_dir), "--input", str(items), "--image-root",
                 str(root), "--out", str(ref_path)]) == 0
    ref = load_file(str(ref_path))["embeddings"]
    inputs = [{"text": r["text"], "image": _uri(root / r["image"])} if r.get("image")
              else r["text"] for r in rows]
    r = client.post("/v1/embeddings", json={"input": inputs, "model": model_dir.name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == model_dir.name
    assert [d["index"] for d in body["data"]] == list(range(len(rows)))
    assert all(d["object"] == "embedding" for d in body["data"])
    assert body["usage"]["prompt_tokens"] > 0
    got = torch.tensor([d["embedding"] for d in body["data"]], dtype=torch.float32)
    # Same items, same model, same encode function: equal up to float32 summation order (an
    # encoder that groups items into batches differently pads them differently); unit vectors
    # of dimension 64 carry rounding of a few 1e-8 per component.
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    # base64 is the same float32 vectors, little-endian, bit for bit.
    r64 = client.post("/v1/embeddings", json={"input": inputs, "encoding_format": "base64"})
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            for d in r64.json()["data"]]
    assert torch.equal(torch.tensor(np.stack(vecs)), got)


def test_messages_form_equals_input_object_form_and_text_only(client, small_collection):
    _, root = small_collection
    uri = _uri(root / "img" / "3.png")
    obj = client.post("/v1/embeddings", json={"input": {"text": DOC, "image": uri}}).json()
    msg = client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "Represent the given image."}]}]}).json()
    assert obj["data"][0]["embedding"] == msg["data"][0]["embedding"]
    one = client.post("/v1/embeddings", json={"input": "a red circle"}).json()
    many = client.post("/v1/embeddings", json={"input": ["a red circle"]}).json()
    assert len(one["data"]) == 1
    e1, e2 = np.array(one["data"][0]["embedding"]), np.array(many["data"][0]["embedding"])
    # float32 unit vector sent as JSON decimals: its norm is 1 up to float32 rounding
    assert np.allclose(np.linalg.norm(e1), 1.0, atol=1e-5) and np.array_equal(e1, e2)


def test_health_models_search_and_item_images(client, small_collection, model_dir):
    _, root = small_collection
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["index"] == 13 and h["auth"] is False
    m = client.get("/v1/models").json()
    assert m["data"][0]["id"] == model_dir.name and m["data"][0]["object"] == "model"
    r = client.post("/v1/search", json={"query": {"text": DOC, "image": _uri(root / "img/7.png")},
                                        "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 5 and hits[0]["id"] == "scene-7"
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    img = client.get(hits[0]["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (root / "img" / "7.png").read_bytes()
    text_hits = client.post("/v1/search", json={"query": "a red circle", "k": 13}).json()["data"]
    assert {h["id"] for h in text_hits} >= {"caption-only"}
    assert [h for h in text_hits if h["id"] == "caption-only"][0]["image_url"] is None
    page = client.get("/")
    assert page.status_code == 200 and "fam search" in page.text


def test_item_images_are_only_files_the_index_references(model_dir, index_dir, small_collection,
                                                         tmp_path):
    _, root = small_collection
    (root / "secret.txt").write_text("not for clients")
    bad = tmp_path / "idx"
    shutil.copytree(index_dir, bad)
    rows = (bad / "items.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"id": "x", "text": "t", "image": "../../../../etc/passwd"})
    rows[1] = json.dumps({"id": "y", "text": "t", "image": "secret.txt"})
    (bad / "items.jsonl").write_text("\n".join(rows) + "\n")
    with _client(model_dir, bad) as c:
        for path in ("/v1/index/items/0/image", "/v1/index/items/1/image",
                     "/v1/index/items/13/image", "/v1/index/items/-1/image",
                     "/v1/index/items/..%2F..%2Fetc%2Fpasswd/image"):
            r = c.get(path)
            assert r.status_code in (400, 404), path
            assert "not for clients" not in r.text and "root:" not in r.text
        assert c.get("/v1/index/items/2/image").status_code == 200


def test_no_index_loaded(auth_client):
    r = auth_client.post("/v1/search", json={"query": "x"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "--index" in r.json()["error"]["message"]
    assert auth_client.get("/").status_code == 404


def _check_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status
    for w in words:
        assert w in err["message"], err["message"]
    assert "Traceback" not in r.text and "\n" not in err["message"]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, small_collection):
    _, root = small_collection
    post = client.post
    _check_error(post("/v1/embeddings", content=b'{"input": "a",',
                      headers={"Content-Type": "application/json"}), 400, "malformed JSON")
    _check_error(post("/v1/embeddings", content=b"[1, 2]"), 400, "must be an object")
    _check_error(post("/v1/embeddings", content=b""), 400, "empty request body")
    _check_error(post("/v1/embeddings", json={"input": 5}), 400, "input", "got a number")
    _check_error(post("/v1/embeddings", json={"input": [1, 2]}), 400, "input[0]", "token-id")
    _check_error(post("/v1/embeddings", json={"input": ["ok", {"txt": "a"}]}), 400,
                 "input[1].txt", "unknown key")
    _check_error(post("/v1/embeddings", json={"input": []}), 400, "empty list")
    _check_error(post("/v1/embeddings", json={"input": "a", "encoding_format": "hex"}), 400,
                 "encoding_format")
    _check_error(post("/v1/embeddings", json={"input": "a", "model": "gpt-4"}), 404,
                 "'gpt-4' is not served")
    _check_error(post("/v1/embeddings", json={"input": "a", "dimensions": 7}), 400, "dimensions")
    _check_error(post("/v1/embeddings", json={"input": "a", "messages": []}), 400,
                 "exactly one of")
    _check_error(post("/v1/embeddings", json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {}}]}]}), 400, "messages[0].content[0]", "image_url")
    # Images: not base64, not an image, oversized, a decompression bomb, a truncated file, URLs.
    _check_error(post("/v1/embeddings", json={"input": {"image": "data:image/png;base64,@@@"}}),
                 400, "input.image", "base64")
    _check_error(post("/v1/embeddings", json={"input": {"image": base64.b64encode(
        b"hello world, not an image").decode()}}), 400, "input.image", "accepted format")
    big = base64.b64encode(np.random.default_rng(0).bytes(300_000)).decode()
    _check_error(post("/v1/embeddings", json={"input": {"image": big}}), 413, "larger than")
    bomb = _png(20_000, 20_000, b"\x00" + bytes(2500) * 1)  # header says 400 Mpx; 200 bytes
    assert len(bomb) < 1000
    _check_error(post("/v1/embeddings", json={"input": {"image": base64.b64encode(bomb)
                                                        .decode()}}), 413, "pixels")
    trunc = (root / "img" / "0.png").read_bytes()[:300]
    _check_error(post("/v1/embeddings", json={"input": {"image": base64.b64encode(trunc)
                                                        .decode()}}), 400, "input.image")
    _check_error(post("/v1/embeddings", json={"input": {"image": "https://example.com/a.png"}}),
                 400, "--allow-image-urls")
    _check_error(post("/v1/embeddings", json={"input": {"image": "file:///etc/passwd"}}), 400,
                 "scheme")
    _check_error(post("/v1/embeddings", content=b'{"input": "' + b"a" * 2_100_000 + b'"}'),
                 413, "request body")
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b" " * 100_000
    _check_error(post("/v1/embeddings", content=chunks()), 413, "request body")
    _check_error(post("/v1/search", json={"query": "a", "k": 0}), 400, "k:")
    _check_error(post("/v1/search", json={"query": ["a", "b"]}), 400, "one query")
    _check_error(client.get("/v1/nothing"), 404, "no such endpoint")
    _check_error(client.get("/v1/embeddings"), 405, "not allowed")
    # Still serving.
    assert post("/v1/embeddings", json={"input": "still here"}).status_code == 200


def test_auth(auth_client):
    _check_error(auth_client.post("/v1/embeddings", json={"input": "a"}), 401, "bearer token")
    r = auth_client.post("/v1/embeddings", json={"input": "a"},
                         headers={"Authorization": "Bearer wrong"})
    _check_error(r, 401, "invalid API key")
    assert r.headers["www-authenticate"] == "Bearer"
    _check_error(auth_client.get("/v1/models"), 401, "bearer")
    assert auth_client.get("/health").json()["auth"] is True  # liveness stays open
    ok = auth_client.post("/v1/embeddings", json={"input": "a"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_internal_error_is_a_500_without_internals(model_dir):
    svc = Service(EmbeddingModel(load_backbone(model_dir)), ServeConfig(),
                  model_path=str(model_dir))
    def boom(items, images):
        raise RuntimeError("secret internal detail")

    svc.encoder.encode = boom
    with TestClient(create_app(svc), raise_server_exceptions=False) as c:
        r = c.post("/v1/embeddings", json={"input": "a"})
        assert r.status_code == 500
        assert "secret" not in r.text and "Traceback" not in r.text
        assert "server log" in r.json()["error"]["message"]


def test_decoded_images_are_rgb_and_small_images_pass(client):
    im = Image.new("L", (20, 30), 128)
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.post("/v1/embeddings", json={"input": {"text": DOC, "image": uri}})
    assert r.status_code == 200, r.text


def test_image_urls_are_fetched_only_when_allowed(model_dir, small_collection):
    """--allow-image-urls: a local HTTP server on 127.0.0.1 stands for the web."""
    import functools
    import http.server
    import threading

    _, root = small_collection
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with _client(model_dir, allow_image_urls=True, max_image_bytes=5_000) as c:
            by_url = c.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{base}/img/0.png"}},
                {"type": "text", "text": "Represent the given image."}]}]})
            assert by_url.status_code == 200, by_url.text
            inline = c.post("/v1/embeddings", json={"input": {
                "text": DOC, "image": _uri(root / "img" / "0.png")}})
            assert by_url.json()["data"][0]["embedding"] == inline.json()["data"][0]["embedding"]
            _check_error(c.post("/v1/embeddings", json={"input": {"image": f"{base}/nope.png"}}),
                         400, "HTTP 404")
            (root / "big.bin").write_bytes(bytes(10_000))
            _check_error(c.post("/v1/embeddings", json={"input": {"image": f"{base}/big.bin"}}),
                         413, "larger than")
    finally:
        httpd.shutdown()


def test_search_with_messages_form(client, small_collection):
    _, root = small_collection
    r = client.post("/v1/search", json={"k": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _uri(root / "img" / "9.png")}},
        {"type": "text", "text": "Represent the given image."}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"] == "scene-9"
