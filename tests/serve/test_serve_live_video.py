"""A real ``fam serve`` over an index of videos and multi-image items (issue 18): the search
page in headless Chromium shows a video result's frame strip (the frames the model sampled)
and a multi-image result's images; the API serves only the files the index lists."""
from __future__ import annotations

import base64
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
httpx = pytest.importorskip("httpx")

from test_serve_live import CHROMIUM, _search_page, serve_process  # noqa: E402

from fam.index import build_index  # noqa: E402


@pytest.fixture(scope="module")
def video_server(tmp_path_factory, video_collection, tiny_dirs):
    """Base url of ``fam serve --model --index`` over the video collection."""
    items, root = video_collection
    model = tiny_dirs["qwen2_vl"]
    work = tmp_path_factory.mktemp("live-video")
    index = build_index(work / "index", items, model=model, image_root=root, progress=False)
    with serve_process(model, index, work) as (url, _, _):
        yield url


def test_search_api_gives_frame_and_image_urls(video_server, video_collection):
    _, root = video_collection
    data = httpx.post(video_server + "/v1/search", json={"query": "a red square", "k": 4}
                      ).json()["data"]
    by_id = {h["id"]: h for h in data}
    clip = by_id["clip-a"]
    assert len(clip["video_frames"]) == len(clip["frame_urls"]) == 8
    r = httpx.get(video_server + clip["frame_urls"][7])
    assert r.status_code == 200 and r.content == (root / "vid/a/frame_10.png").read_bytes()
    assert len(by_id["pair"]["images_urls"]) == 2
    assert "frame_urls" not in by_id["words"] and by_id["words"]["image_url"] is None
    i = clip["index"]
    assert httpx.get(f"{video_server}/v1/index/items/{i}/video_frames/8").status_code == 404
    assert httpx.get(f"{video_server}/v1/index/items/{i}/video/0").status_code == 404


def test_search_queries_with_a_video_or_several_images_find_their_item(video_server,
                                                                        video_collection):
    """A query made of an indexed item's text and visuals (all 11 frames of a folder; two
    images) is embedded as the index embedded that item: it comes first with cosine 1."""
    _, root = video_collection

    def uri(p):
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    frames = [uri(root / "vid/a" / f"frame_{j}.png") for j in range(11)]
    for query, want in (({"text": "a red square moving right", "video": frames}, "clip-a"),
                        ({"text": "<|image_2|> beside <|image_1|>",
                          "images": [uri(root / "img/0.png"), uri(root / "img/1.png")]},
                         "pair")):
        r = httpx.post(video_server + "/v1/search", json={"query": query, "k": 2})
        assert r.status_code == 200, r.text
        top = r.json()["data"][0]
        assert top["id"] == want
        # float32 unit vectors, same item through /v1/search and fam index build
        assert top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install "
                                              "chromium; .ci/run installs it)")
def test_page_shows_a_video_results_frame_strip(video_server):
    api = httpx.post(video_server + "/v1/search", json={"query": "a red square", "k": 4}).json()
    with _search_page(video_server, items=4) as (page, errors):
        page.fill("#text", "a red square")
        page.select_option("#k", "5")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.card').length === 4",
                               timeout=20_000)
        ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
        assert ids == [h["id"] for h in api["data"]]
        # The video's strip: its 8 sampled frames, in order, every one loaded.
        strip = '.card[data-id="clip-a"] .strip.frames img'
        page.wait_for_function(
            f"Array.from(document.querySelectorAll('{strip}')).filter(i => i.complete && "
            "i.naturalWidth === 56).length === 8", timeout=20_000)
        alts = page.eval_on_selector_all(strip, "s => s.map(e => e.alt)")
        assert alts == [f"frame {j}" for j in range(1, 9)]
        clip = next(h for h in api["data"] if h["id"] == "clip-a")
        srcs = page.eval_on_selector_all(strip, "s => s.map(e => e.dataset.src)")
        assert srcs == clip["frame_urls"]  # the sampled frames, in the model's order
        assert "8 sampled frames" in page.text_content('.card[data-id="clip-a"] .kind')
        five = '.card[data-id="clip-b"] .strip.frames img'
        assert len(page.query_selector_all(five)) == 5
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.card[data-id=\"pair\"] .strip.images "
            "img')).filter(i => i.complete && i.naturalWidth > 0).length === 2",
            timeout=20_000)
        assert page.query_selector('.card[data-id="words"] .strip') is None
        if os.environ.get("FAM_VIDEO_PAGE_SCREENSHOT"):
            page.screenshot(path=os.environ["FAM_VIDEO_PAGE_SCREENSHOT"], full_page=True)
        assert not errors, errors
