"""The one LLaVA caption reader (fam.data.captions): layouts, validation, error messages."""
from __future__ import annotations

import json

import pytest

from fam.data.captions import caption_map as load_captions  # the {image: caption} view
from fam.data.captions import load_captions as load_caption_samples
from fam.errors import DataError


def test_caption_loader_errors_name_file_line_field(tmp_path):
    p = tmp_path / "caps.json"
    p.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "b.png"}]))
    with pytest.raises(DataError) as ei:
        load_caption_samples(p, tmp_path)
    assert str(p) in str(ei.value) and "line 2" in str(ei.value) and "caption" in str(ei.value)
    p.write_text(json.dumps([{"image": "../../etc/passwd", "caption": "x"}]))
    with pytest.raises(DataError, match="escapes the data root"):
        load_caption_samples(p, tmp_path)
    p.write_text("[{\"image\": ")
    with pytest.raises(DataError, match="invalid JSON"):
        load_caption_samples(p, tmp_path)


def test_load_captions_llava_conversations_and_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nRender a clear description."},
        {"from": "gpt", "value": "a dog on a sofa"}]}) + "\n" + json.dumps({"image": "y.jpg"})
        + "\n")
    with pytest.raises(DataError) as e:
        load_captions(f)
    assert e.value.line == 2 and str(f) in str(e.value)
    f.write_text(f.read_text().splitlines()[0] + "\n")
    assert load_captions(f) == {"x.jpg": "a dog on a sofa"}
