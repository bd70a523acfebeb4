"""A real ``fam serve`` process on 127.0.0.1: the search page in headless Chromium, the bounded
load test (both batching modes), graceful shutdown. The page test needs Debian's ``chromium``
(``apt-get install chromium``; ``.ci/run`` installs it) and the ``playwright`` package."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
httpx = pytest.importorskip("httpx")

from fam.bench.serve import free_port  # noqa: E402
from fam.index import build_index  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def serve_process(model, index, work):
    """(base url, process, log path) of ``fam serve --model --index`` on a free port; the
    process is killed on exit if still running."""
    port = free_port()
    log = work / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fam", "serve", "--model", str(model),
                                 "--index", str(index), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fam serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 120:
                pytest.fail("fam serve did not start within 120 s")
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_collection, tiny_dirs):
    """(base url, process, log path) of ``fam serve --model --index`` on a free port."""
    items, root = small_collection
    model = tiny_dirs["qwen2_vl"]
    work = tmp_path_factory.mktemp("live")
    index = build_index(work / "index", items, model=model, image_root=root, progress=False)
    with serve_process(model, index, work) as out:
        yield out


@contextlib.contextmanager
def _search_page(url, items: int = 13):
    """The search page loaded in headless Chromium (its header showing ``items`` items);
    yields (page, the page's JS errors)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is "
                                                                 "not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: the page forbids eval, which Playwright's wait_for_function uses.
            page = browser.new_page(viewport={"width": 1100, "height": 760}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('info').textContent"
                                   f".includes('{items} items')", timeout=20_000)
            yield page, errors
        finally:
            browser.close()


def _wait_for_the_api_hits(page, url, png: bytes, k: int) -> None:
    """Wait until the page shows the hits /v1/search gives for the image ``png``, in order."""
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    api = httpx.post(url + "/v1/search", json={"query": {"image": uri}, "k": k}).json()
    want = [h["id"] for h in api["data"]]
    page.wait_for_function(
        "ids => JSON.stringify(Array.from(document.querySelectorAll('.card'))"
        ".map(c => c.dataset.id)) === JSON.stringify(ids)", arg=want, timeout=20_000)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install "
                                              "chromium; .ci/run installs it)")
def test_search_page_in_headless_chromium(server, small_collection):
    url, _, _ = server
    _, root = small_collection
    with _search_page(url) as (page, errors):
        # A text query: top 5 cards with scores, images fetched from the index.
        page.fill("#text", "a red circle")
        page.select_option("#k", "5")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.card').length === 5",
                               timeout=20_000)
        api = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 5}).json()
        ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
        assert ids == [h["id"] for h in api["data"]]
        scores = page.eval_on_selector_all(".card .score", "s => s.map(e => e.textContent)")
        assert scores == [f"{h['score']:.4f}" for h in api["data"]]
        n_img = sum(1 for h in api["data"] if h["image_url"])
        page.wait_for_function(
            f"Array.from(document.querySelectorAll('.card img')).filter(i => i.complete && "
            f"i.naturalWidth > 0).length === {n_img}", timeout=20_000)
        assert "5 results" in page.text_content("#status")
        # Drop an image (a real drop event with a File), no text: image search.
        png = (root / "img" / "4.png").read_bytes()
        page.fill("#text", "")
        page.evaluate("""b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "query.png", {type: "image/png"}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", base64.b64encode(png).decode())
        page.wait_for_selector("#drop img", timeout=10_000)
        page.click("#go")
        _wait_for_the_api_hits(page, url, png, 5)
        shot = os.environ.get("FAM_PAGE_SCREENSHOT")
        if shot:
            page.screenshot(path=shot, full_page=True)
        # An empty query is refused on the page itself.
        page.click("#clear")
        page.click("#go")
        assert "type a query" in page.text_content("#status")
        assert not errors, errors


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install "
                                              "chromium; .ci/run installs it)")
def test_case7_page_choose_clear_choose_again_then_search(server, small_collection):
    """Issue 23 case 7: choosing an image or pressing "Clear image" removed the hidden file
    input, and the next click on the drop box threw ``Cannot read properties of null``."""
    url, _, _ = server
    _, root = small_collection
    with _search_page(url) as (page, errors):

        def choose(path):  # the real path: a click on the drop box opens the file chooser
            with page.expect_file_chooser(timeout=10_000) as fc:
                page.click("#drop")
            fc.value.set_files(str(path))
            page.wait_for_selector("#drop img", timeout=10_000)

        choose(root / "img" / "2.png")
        page.click("#clear")
        assert page.query_selector("#drop img") is None
        assert page.query_selector("#file") is not None  # the input survives clearing
        choose(root / "img" / "2.png")  # the same file again, after clearing
        page.click("#clear")
        choose(root / "img" / "4.png")
        page.click("#go")
        _wait_for_the_api_hits(page, url, (root / "img" / "4.png").read_bytes(), 10)
        assert not errors, errors


def test_graceful_shutdown_finishes_and_stops_the_worker(server):
    url, proc, log = server
    assert httpx.post(url + "/v1/embeddings", json={"input": "last one"}).status_code == 200
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    text = log.read_text()
    assert "Application shutdown complete" in text and "model worker stopped" in text
    assert "Traceback" not in text


def test_bounded_load_test_of_a_real_server(tiny_dirs):
    """`fam bench serve`'s measurement: its own server, bounded load, graceful stop (one mode
    here; the benchmark runs both and prints their ratio)."""
    from fam.bench.serve import run_load
    m = run_load(Path(tiny_dirs["qwen2_vl"]), max_batch=8, clients=8, requests=40,
                 inputs="mixed", timeout=120)
    assert m["errors"] == 0 and m["ok"] == 40, m["error_examples"]
    assert m["graceful_shutdown"]
    assert 0 < m["p50_ms"] <= m["p99_ms"] and m["throughput_rps"] > 0
    assert 1 <= m["largest_batch"] <= 8
    json.dumps(m)  # the figures serialise (--json)
