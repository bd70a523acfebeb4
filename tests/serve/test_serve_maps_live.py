"""The search page on a multi-vector index in headless Chromium (a real ``fam serve``): query
tokens as chips, each result's similarity map over its image, another token → another map.
Needs Debian's ``chromium`` and the ``playwright`` package (as test_serve_live.py)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
httpx = pytest.importorskip("httpx")

from test_serve_live import CHROMIUM, CHROMIUM_ARGS, serve_process  # noqa: E402

from fam.config.deploy import MultiVectorIndexConfig  # noqa: E402
from fam.index import build_index  # noqa: E402

TOP = [252, 255, 164, 255]  # the colour ramp's ends (index.html: RAMP), opaque
BOTTOM = [0, 0, 4, 255]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine "
                                                         "(apt-get install chromium)")


@pytest.fixture(scope="module")
def mv_server(tmp_path_factory, maps_collection, tiny_dirs):
    items, root = maps_collection
    model = tiny_dirs["qwen2_vl"]
    work = tmp_path_factory.mktemp("maps-live")
    index = build_index(work / "index", items, model=model, image_root=root, progress=False,
                        multivector=MultiVectorIndexConfig(), query_prompt="Find: ")
    with serve_process(model, index, work) as (url, _, _):
        yield url


_CANVASES = """() => Array.from(document.querySelectorAll('.card')).map(c => {
  const cv = c.querySelector('canvas.heat');
  if (!cv) return {id: c.dataset.id, canvas: false};
  const img = c.querySelector('.thumb img'), r = cv.getBoundingClientRect(),
        ir = img.getBoundingClientRect();
  return {id: c.dataset.id, canvas: true, token: cv.dataset.token,
          pixels: Array.from(cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data),
          rect: [r.left, r.top, r.width, r.height], img: [ir.left, ir.top, ir.width, ir.height],
          natural: [img.naturalWidth, img.naturalHeight], visible: cv.style.visibility,
          contrib: c.querySelector('.contrib').textContent};
})"""


def _check_maps(cards, api, t):
    """Each card's canvas shows token t's map: the colour scale spans the shown maps (the
    global max cell is the ramp's top, the min its bottom), laid over the image's letter-box."""
    by_id = {h["id"]: h for h in api["data"]}
    values = [v for h in api["data"] if h["maps"] for v in h["maps"]["values"][t]]
    lo, hi = min(values), max(values)
    for c in cards:
        h = by_id[c["id"]]
        assert c["canvas"] == (h["maps"] is not None)
        if not c["canvas"]:
            continue
        assert c["token"] == str(t) and c["visible"] == "visible"
        v = h["maps"]["values"][t]
        px = [c["pixels"][4 * i:4 * i + 4] for i in range(len(v))]
        for x, p in zip(v, px):
            if x == hi:
                assert p == TOP
            if x == lo:
                assert p == BOTTOM
        assert f"{h['maps']['contribution'][t]:.4f}" in c["contrib"]
        # object-fit: contain — the shown image is the natural one scaled into the square
        (ix, iy, iw, ih), (nw, nh) = c["img"], c["natural"]
        s = min(iw / nw, ih / nh)
        want = [ix + (iw - nw * s) / 2, iy + (ih - nh * s) / 2, nw * s, nh * s]
        assert all(abs(a - b) < 1.0 for a, b in zip(c["rect"], want)), (c["rect"], want)


def test_page_shows_token_maps_and_switches_them(mv_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is "
                                                                 "not installed")
    url = mv_server
    api = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 5,
                                               "maps": True}).json()
    tokens = api["query_tokens"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('info').textContent"
                                   ".includes('7 items')", timeout=20_000)
            page.fill("#text", "a red circle")
            page.select_option("#k", "5")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('.card').length === 5",
                                   timeout=20_000)
            ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
            assert ids == [h["id"] for h in api["data"]]
            chips = page.eval_on_selector_all("#tokens .chip", "cs => cs.map(c => c.textContent)")
            assert chips == [t.strip() or "␣" for t in tokens]
            n_maps = sum(h["maps"] is not None for h in api["data"])
            assert n_maps >= 4
            page.wait_for_function(
                f"Array.from(document.querySelectorAll('canvas.heat')).filter(c => "
                f"c.style.visibility === 'visible').length === {n_maps}", timeout=20_000)
            # the first token shown is the one contributing most to the top result
            top = api["data"][0]["maps"]["contribution"]
            first = top.index(max(top))
            on = page.eval_on_selector_all("#tokens .chip.on", "cs => cs.map(c => c.dataset.t)")
            assert on == [str(first)]
            before = page.evaluate(_CANVASES)
            _check_maps(before, api, first)
            other = (first + 3) % len(tokens)
            page.click(f"#tokens .chip[data-t='{other}']")
            after = page.evaluate(_CANVASES)
            _check_maps(after, api, other)
            assert any(a["pixels"] != b["pixels"] for a, b in zip(after, before) if a["canvas"])
            shot = os.environ.get("FAM_MAPS_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
            assert not errors, errors
        finally:
            browser.close()
