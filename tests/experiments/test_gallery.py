"""Retrieval gallery (first rows, top-k per model, correct = candidate 0) and the plots."""
import json

import pytest
import torch
from PIL import Image

from fam.analysis.plots import plot_gallery
from fam.experiments.gallery import retrieval_gallery

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class _ColourEncoder:
    """One-hot of the colour: an image's first pixel, else the last word of the text;
    ``flip`` swaps red and blue for images (a model that gets some rows wrong)."""

    def __init__(self, flip=False):
        self.flip = flip

    def encode(self, items):
        names = list(COLOURS)
        out = torch.zeros(len(items), 3)
        for i, it in enumerate(items):
            if it.image is not None:
                px = Image.open(it.image).getpixel((0, 0))
                c = max(range(3), key=lambda j: px[j])
                if self.flip and c in (0, 2):
                    c = 2 - c
            else:
                c = names.index(it.text.split()[-1])
            out[i, c] = 1.0
        return out


@pytest.fixture
def bench(tmp_path):
    (tmp_path / "img").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "eval").mkdir()
    t2i = [{"qry_text": f"find {c}", "qry_img_path": "", "tgt_text": [""] * 3,
            "tgt_img_path": [f"img/{c}.png"] + [f"img/{o}.png" for o in COLOURS if o != c]}
           for c in COLOURS]
    i2t = [{"qry_text": "<|image_1|> caption it", "qry_img_path": f"img/{c}.png",
            "tgt_text": [f"a {c}"] + [f"a {o}" for o in COLOURS if o != c],
            "tgt_img_path": [""] * 3} for c in COLOURS]
    for name, rows in (("ColT2I", t2i), ("ColI2T", i2t)):
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / "eval" / f"{name}.jsonl").write_text(lines)
    (tmp_path / "datasets.json").write_text(json.dumps({
        "ColT2I": {"meta_task": "retrieval", "split": "IND"},
        "ColI2T": {"meta_task": "retrieval", "split": "IND"}}))
    return tmp_path


def test_gallery_top_k_and_correctness(bench, tmp_path):
    g = retrieval_gallery({"good": _ColourEncoder(), "flipped": _ColourEncoder(flip=True)},
                          bench / "eval", bench, n=2, k=2)
    assert g["models"] == ["good", "flipped"] and g["t2i"]["dataset"] == "ColT2I"
    assert [len(g[d]["rows"]) for d in ("t2i", "i2t")] == [2, 2]  # the first 2 rows
    for d in ("t2i", "i2t"):
        for row in g[d]["rows"]:
            assert row["top"]["good"][0][0] == 0  # the positive ranks first
    # "find red": the flipped model sees red images as blue, so its top-1 is not the positive.
    assert g["t2i"]["rows"][0]["top"]["flipped"][0][0] != 0
    assert g["t2i"]["rows"][1]["top"]["flipped"][0][0] == 0  # green is not flipped
    out = plot_gallery(g, tmp_path / "gallery.png")
    assert out.exists() and out.stat().st_size > 1000


def test_precision_plot(tmp_path):
    from fam.analysis.plots import plot_precision
    p = plot_precision({"baseline": {"retrieval": 30.0, "overall": 25.0},
                        "fam": {"retrieval": {"mean": 35.0, "ci95": [31.0, 39.0]},
                                "overall": {"mean": 27.0, "ci95": None}}},
                       {"retrieval": 12.5, "overall": 12.5}, tmp_path / "p.png")
    assert p.exists() and p.stat().st_size > 1000


def test_gallery_scores_show_the_digits_that_tell_them_apart():
    from fam.analysis.plots import _tie_digits
    assert _tie_digits([0.91, 0.52]) == 2
    assert _tie_digits([0.998326, 0.998320, 0.998318]) == 6  # the demo's near-ties
    assert _tie_digits([0.99787, 0.99755, 0.99755]) == 4  # a real tie stays a tie
    assert _tie_digits([0.5, 0.5]) == 2


def test_plots_carry_a_title_values_and_headers(monkeypatch, tmp_path):
    """results.png: a title and each value on its bar; gallery.png: every cell names its
    model, scores in as many digits as tell them apart (text read back from the figure)."""
    import matplotlib.figure
    from fam.analysis import plots
    texts = []
    real = plots._save

    def keep(fig, path):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return real(fig, path)
    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_precision({"a": {"overall": 25.04}, "b": {"overall": 31.25}}, {"overall": 12.5},
                         tmp_path / "p.png", heading="my heading")
    assert {"my heading", "25.0", "31.2"} <= set(texts)
    texts.clear()
    img = tmp_path / "q.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    row = {"query": {"text": "find red"}, "candidates": [{"image": str(img)}] * 2,
           "top": {"A": [[0, 0.998326], [1, 0.998320]], "B": [[1, 0.5], [0, 0.25]]}}
    g = {"models": ["A", "B"], "k": 2, "t2i": {"dataset": "D", "rows": [row, row]}}
    assert isinstance(plots.plot_gallery(g, tmp_path / "g.png"), type(tmp_path))
    titles = [t for t in texts if "#" in t]
    assert len(titles) == 2 * 4 and sum(t.startswith("A #") for t in titles) == 4
    assert "A #1 ✓\n0.99833" in titles and "B #2 ✓\n0.25000" in titles  # 5 digits tell them
