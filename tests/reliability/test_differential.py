"""Differential test of the input contract (issue 23): generated items through the library,
``fam encode`` and ``fam serve`` must agree, item by item.

Hypothesis generates items (seeded and derandomised: the same items on every run, no
example database): texts with special tokens, placeholders, empty, unicode (lone
surrogates included), very long; images of every PIL mode a file can hold, with and
without alpha, tiny, large, extreme aspect ratios, EXIF-rotated, truncated, garbage, header
bombs. For each one :func:`contract_paths.agree` must hold: all three refuse with the same
one-line reason (exit 2 / HTTP 4xx), or all three return the same embedding (≤ 1e-6).
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from contract_paths import agree

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

#: Items per run of the differential test (each goes through all three paths).
N_ITEMS = int(os.environ.get("FAM_DIFFERENTIAL_ITEMS", "300"))

SPECIAL = ["<|image_pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|video_pad|>"]
PLACEHOLDERS = ["<|image_1|>", "<|image_2|>", "<|image_0|>", "<|image_10|>", "<|image_1|>"]
WORDS = ["a red circle", "left of", "a blue square", " ", "\n", "Represent the given image.",
         "Здравствуй", "日本語のテキスト", "🌍🚀", "e\u0301", "\u200b", "\x00", "\ud800", "\udfff",
         "<", "|>", "<|", "image_1", "ǅ", "\t\t"]

# Modes a file can hold, and the formats that store each (PIL writes and reads them back).
MODES = {"1": ["PNG", "TIFF", "BMP", "GIF"], "L": ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"],
         "P": ["PNG", "GIF", "TIFF", "BMP"], "P+trns": ["PNG", "GIF"],
         "RGB": ["PNG", "JPEG", "WEBP", "TIFF", "BMP"], "RGBA": ["PNG", "WEBP", "TIFF"],
         "LA": ["PNG", "TIFF"], "PA": ["TIFF"], "CMYK": ["JPEG", "TIFF"],
         "YCbCr": ["TIFF"], "LAB": ["TIFF"], "I": ["TIFF", "PNG"], "I;16": ["PNG", "TIFF"],
         "F": ["TIFF"], "RGBa": ["TIFF"]}
SIZES = [(1, 1), (2, 3), (5, 7), (16, 16), (33, 21), (64, 48), (200, 1), (1, 200), (201, 1),
         (1, 500), (500, 1), (1000, 4), (3, 700), (900, 700), (1600, 1200)]


def _image(mode: str, size: tuple[int, int], fmt: str, seed: int, exif: int | None) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, rgba[..., 3])
    base = Image.fromarray(rgba, "RGBA")
    if mode == "P+trns":
        im = base.convert("RGB").convert("P")
        im.info["transparency"] = int(rng.integers(0, 256))
    elif mode in ("I", "I;16", "F"):
        depth = {"I": 2 ** 20, "I;16": 65535, "F": 1}[mode]
        arr = rng.random((h, w)) * depth
        im = Image.fromarray(arr.astype(np.float32), "F") if mode == "F" else \
            Image.fromarray(arr.astype(np.int32), "I").convert(mode) if mode == "I;16" else \
            Image.fromarray(arr.astype(np.int32), "I")
    elif mode == "RGBa":
        im = base.convert("RGBa")
    elif mode in ("YCbCr", "LAB", "CMYK"):
        im = base.convert("RGB").convert(mode) if mode != "LAB" else Image.merge(
            "LAB", [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
                    for _ in range(3)])
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    kw = {}
    if exif is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        ex = Image.Exif()
        ex[0x0112] = exif
        kw["exif"] = ex.tobytes()
    try:
        im.save(buf, fmt, **kw)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        im.convert("RGBA" if "A" in im.mode else "RGB").save(buf, "PNG")
    return buf.getvalue()


def _bomb(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0,
                                                              0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@st.composite
def texts(draw) -> str | None:
    kind = draw(st.sampled_from(["none", "empty", "words", "words", "words", "unicode", "long"]))
    if kind == "none":
        return None
    if kind == "empty":
        return ""
    if kind == "unicode":
        return draw(st.text(max_size=30))
    if kind == "long":
        n = draw(st.sampled_from([5_000, 60_000, 400_000]))
        return (draw(st.sampled_from(WORDS[:6])) + " ") * (n // 8)
    parts = draw(st.lists(st.sampled_from(WORDS + SPECIAL + PLACEHOLDERS), min_size=1,
                          max_size=8))
    return "".join(parts)


@st.composite
def images(draw) -> tuple[bytes, str] | None:
    kind = draw(st.sampled_from(["none", "none", "ok", "ok", "ok", "ok", "truncated",
                                 "garbage", "bomb"]))
    if kind == "none":
        return None
    if kind == "garbage":
        return draw(st.sampled_from([b"", b"hello", b"\x89PNG\r\n\x1a\nnot really",
                                     b"GIF89a" + bytes(20), b"BM" + bytes(60)])), "PNG"
    if kind == "bomb":
        return _bomb(draw(st.sampled_from([9_000, 30_000]))), "PNG"
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    size = draw(st.sampled_from(SIZES))
    exif = draw(st.sampled_from([None, None, 6, 3, 8]))
    data = _image(mode, size, fmt, draw(st.integers(0, 2 ** 16)), exif)
    if kind == "truncated":
        data = data[:max(8, int(len(data) * draw(st.sampled_from([0.3, 0.6, 0.9]))))]
    return data, fmt


@pytest.mark.slow
def test_differential_library_encode_serve_agree_on_generated_items(three_paths):
    """Zero disagreements over ``N_ITEMS`` generated items (issue 23 acceptance)."""
    seen: list[str] = []
    tally = {"embedded": 0, "refused": 0}
    t0 = time.perf_counter()

    @settings(max_examples=N_ITEMS, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False,
              verbosity=hypothesis.Verbosity.quiet)
    @given(texts(), images())
    def check(text, image):
        if text is None and image is None:
            text = ""
        data, fmt = image if image is not None else (None, None)
        outcomes = three_paths.run(text, data, fmt)
        problem = agree(outcomes)
        tally["embedded" if outcomes[0].vector is not None else "refused"] += 1
        if problem is not None:
            seen.append(f"text={text[:80] if text else text!r} image={fmt} "
                        f"{len(data) if data else 0} bytes: {problem}")
        assert problem is None, seen[-1]

    check()
    took = time.perf_counter() - t0
    n = tally["embedded"] + tally["refused"]
    print(f"differential: {n} items ({tally['embedded']} embedded, {tally['refused']} refused "
          f"alike) in {took:.1f} s, 0 disagreements")
    assert n >= min(N_ITEMS, 200)  # hypothesis ran them all (none filtered away)
    assert tally["embedded"] > n // 5 and tally["refused"] > n // 5  # both sides exercised


def test_differential_real_subprocess_calls(three_paths, tmp_path):
    """A few items through a real ``python -m fam encode`` process (no cached model, the
    installed entry point), against the library."""
    import torch
    from safetensors.torch import load_file

    from fam.data.types import MMItem
    d = tmp_path
    rgba = np.random.default_rng(1).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "a.png")
    Image.new("RGB", (500, 1)).save(d / "thin.png")
    rows = [{"text": "<|image_1|> <|im_start|>x", "image": "a.png"}, {"text": "Здравствуй 🌍"}]
    (d / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "bad.jsonl").write_text(json.dumps({"text": "x", "image": "thin.png"}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

    def fam(*args):
        return subprocess.run([sys.executable, "-m", "fam", "encode", "--model",
                               str(three_paths.model_dir), "--image-root", str(d), *args],
                              capture_output=True, text=True, env=env, timeout=300)

    r = fam("--input", str(d / "ok.jsonl"), "--out", str(d / "ok.st"))
    assert r.returncode == 0, r.stderr
    got = load_file(str(d / "ok.st"))["embeddings"]
    want = three_paths.model.encode([MMItem(rows[0]["text"], d / "a.png"),
                                     MMItem(rows[1]["text"])], batch_size=1)
    assert float((got - want).abs().max()) <= 1e-6  # see contract_paths.TOL
    r = fam("--input", str(d / "bad.jsonl"), "--out", str(d / "bad.st"))
    outcomes = three_paths.run("x", (d / "thin.png").read_bytes())
    assert r.returncode == 2 and outcomes[0].reason in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert "Traceback" not in r.stderr and torch.isfinite(want).all()
