"""Items as `fam encode` reads them: rows, image paths under the root, bad rows."""
from __future__ import annotations

import json

import pytest

from fam.data.items import read_items
from fam.data.types import MMItem
from fam.errors import DataError


def test_read_items_and_bad_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"image": "a.png"}) + "\n")
    items = read_items(f)
    assert items[0] == MMItem("hi") and items[1].image == (tmp_path / "a.png").resolve()
    f.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="line 1.*'text' must be a string"):
        read_items(f)
    f.write_text(json.dumps({"image": "../x.png"}) + "\n")
    with pytest.raises(DataError):
        read_items(f)
