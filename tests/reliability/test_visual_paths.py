"""Items with several images or a video through the three entry points (issue 18 item 6):
the library (``MMItem(images=..., video=...)``), ``fam encode`` (the ``images``/``video``
keys of an items JSONL) and ``fam serve`` (the same keys in ``/v1/embeddings``, images and
frames as data URIs) agree as :func:`contract_paths.agree` says: the same embedding
(max |Δ| ≤ 1e-6) or the same one-line reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from contract_paths import agree
from PIL import Image


def _png(seed: int, size: tuple[int, int] = (56, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _frames(n: int, seed: int = 0, size: tuple[int, int] = (56, 56)) -> list[bytes]:
    return [_png(seed * 100 + j, size) for j in range(n)]


@pytest.mark.parametrize("case", [
    dict(text="<|image_2|> is left of <|image_1|>", images=[_png(1), _png(2)]),
    dict(text="three views", image=_png(3), images=[_png(4), _png(5)]),
    dict(text="<|video_1|>\nWhat happens in the video?", video=_frames(5, 1)),
    dict(text="a clip", video=_frames(11, 2)),  # 8 of 11 frames sampled
    dict(text=None, video=_frames(3, 3)),  # a video alone
    dict(text="<|image_1|> then <|video_1|>", image=_png(6), video=_frames(4, 4)),
], ids=["two-images-reordered", "image-plus-images", "video-5-frames", "video-11-frames",
        "video-only", "image-and-video"])
def test_multi_image_and_video_items_embed_alike_on_all_three_paths(three_paths, case):
    out = three_paths.run_visual(**case)
    assert all(o.vector is not None for o in out), out
    assert agree(out) is None, agree(out)


def _truncated() -> bytes:
    data = _png(9)
    return data[:len(data) // 2]


@pytest.mark.parametrize("case,reason", [
    (dict(text="clip", video=[*_frames(3, 5), _png(7, (64, 48))]), "must share one size"),
    (dict(text="clip", video=[*_frames(3, 6), _truncated()]), "corrupt or truncated"),
    (dict(text="clip", video=[_png(8, (56, 56)), _png(10, (600, 2))]), "aspect ratio"),
    (dict(text="both", images=[_png(11)], video=_frames(2, 7)), "not both"),
    (dict(text="<|image_3|>", images=[_png(12), _png(13)]), "<|image_3|>"),
], ids=["frame-sizes-differ", "truncated-frame", "frame-aspect", "images-and-video",
        "placeholder-beyond-images"])
def test_bad_visual_items_are_refused_alike_on_all_three_paths(three_paths, case, reason):
    out = three_paths.run_visual(**case)
    assert agree(out) is None, agree(out)
    assert reason in out[0].reason


def test_server_frame_and_pixel_limits(tiny_dirs):
    """The transport limits a request declares: frames per video, pixels per request."""
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    from fam.backbones import load_backbone
    from fam.config import ServeConfig
    from fam.model import EmbeddingModel
    from fam.serve.app import Service, create_app

    uri = lambda b: "data:image/png;base64," + base64.b64encode(b).decode()  # noqa: E731
    svc = Service(EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"])),
                  ServeConfig(max_video_frames=4, max_request_pixels=5 * 56 * 56))
    with TestClient(create_app(svc)) as c:
        r = c.post("/v1/embeddings", json={"input": {"video": [uri(b) for b in _frames(5)]}})
        assert r.status_code == 413
        assert r.json()["error"]["message"] == "input.video: 5 frames; at most 4 per video"
        ok = {"text": "x", "video": [uri(b) for b in _frames(4)]}
        assert c.post("/v1/embeddings", json={"input": ok}).status_code == 200
        r = c.post("/v1/embeddings", json={"input": [ok, {"image": uri(_png(1)),
                                                          "images": [uri(_png(2))]}]})
        assert r.status_code == 413
        msg = r.json()["error"]["message"]
        assert msg.startswith("input[1].images[0]: the request's images and video frames have "
                              f"more than {5 * 56 * 56} pixels"), msg
        r = c.post("/v1/embeddings", json={"input": {"text": "x", "video": "frames/"}})
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("input.video: expected a list of images")


def test_library_takes_decoded_frames_as_visuals(three_paths, tmp_path):
    """``EncodePipeline.encode(items, images=[Visuals(images, video)])`` (what the server
    hands the model) equals the item read from frame files; decoded frames outside the
    backbone's limits are refused naming the field."""
    from fam.data.types import MMItem, Visuals
    from fam.errors import InputError
    from fam.model.encode import EncodePipeline

    for j, b in enumerate(_frames(10, 8)):
        (tmp_path / f"f{j}.png").write_bytes(b)
    paths = [tmp_path / f"f{j}.png" for j in range(10)]
    frames = [Image.open(p).convert("RGB") for p in paths]
    model = three_paths.model
    want = model.encode([MMItem("a clip", video=paths)], batch_size=1)
    pipe = EncodePipeline(model, batch_size=1, prefetch=0)
    got = pipe.encode([MMItem("a clip")], images=[Visuals((), frames)])
    # the same frames, the same ops in one process: equal up to float summation order
    assert float((got - want).abs().max()) <= 1e-6
    with pytest.raises(InputError, match="aspect ratio") as e:
        pipe.encode([MMItem("a clip")], images=[Visuals((), [Image.new("RGB", (600, 2))])])
    assert e.value.field == "items[0].video"
