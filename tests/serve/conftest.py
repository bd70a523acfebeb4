"""Fixtures of the serve tests."""
from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

MAPS_DOC = "<|image_1|>\nRepresent the given image."
#: (width, height): square and non-square images (Qwen2-VL's grid follows the aspect).
MAPS_SIZES = [(112, 112), (168, 112), (112, 168), (112, 112), (224, 112), (140, 140)]


@pytest.fixture(scope="session")
def maps_collection(tmp_path_factory):
    """``(items.jsonl, image root)``: drawn images of several aspects and a caption-only row
    (the similarity-map tests)."""
    root = tmp_path_factory.mktemp("maps-col")
    (root / "img").mkdir()
    rows = []
    for i, (w, h) in enumerate(MAPS_SIZES):
        im = Image.new("RGB", (w, h), (40, 40, 40))
        ImageDraw.Draw(im).ellipse([8 + 6 * i, 10, 50 + 6 * i, 60],
                                   fill=[(230, 30, 30), (30, 30, 230), (30, 200, 30)][i % 3])
        im.save(root / "img" / f"{i}.png")
        rows.append({"id": f"im-{i}", "text": MAPS_DOC, "image": f"img/{i}.png"})
    rows.append({"id": "caption", "text": "a red circle on grey"})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "items.jsonl", root
