"""Scenes-Video and Scenes-Docs: deterministic, in the published layouts, and order matters."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fam.config.scenes import ScenesMediaConfig
from fam.data.mmeb import load_train
from fam.data.mmeb.v2 import discover_v2, read_task
from fam.data.scenes.media import MEDIA_DATASETS, generate_media
from fam.data.scenes.video import EVENTS, REVERSED, render_clip, sample_clip
from fam.errors import ConfigError

SMALL = dict(n_train_videos=14, n_eval_videos=7, n_moments=3, n_train_docs=3, n_eval_docs=4,
             n_frames=8)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_seeded(tmp_path):
    a = generate_media(ScenesMediaConfig(**SMALL), tmp_path / "a")
    generate_media(ScenesMediaConfig(**SMALL), tmp_path / "b")
    generate_media(ScenesMediaConfig(seed=1, **SMALL), tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a["eval"]["SceneVideoCls"] == 7 and a["train"]["SceneDocRet"] == 9
    with pytest.raises(ConfigError, match="n_frames"):
        ScenesMediaConfig(n_frames=2)


@pytest.mark.parametrize("event", EVENTS)
def test_no_single_frame_tells_the_event(event):
    rng = np.random.default_rng(0)
    clip = sample_clip(rng, "x", 56, event)
    frames = render_clip(clip, 12, 56)
    rev = render_clip(clip.__class__(**{**clip.__dict__, "event": REVERSED[event]}), 12, 56)
    if event == "changes colour":
        # the colours swap roles when played backwards: the same frames, in reverse order
        back = clip.__class__(**{**clip.__dict__, "colour": clip.colour2,
                                 "colour2": clip.colour})
        rev = render_clip(back, 12, 56)
    # played backwards, the clip IS the reversed event: the same bag of frames...
    assert [f.tobytes() for f in frames[::-1]] == [f.tobytes() for f in rev]
    # ...in another order: only the order tells the two events apart
    assert [f.tobytes() for f in frames] != [f.tobytes() for f in rev]


def test_layouts_are_read_by_the_real_loaders(tmp_path):
    generate_media(ScenesMediaConfig(**SMALL), tmp_path)
    ev = tmp_path / "eval_media"
    found = discover_v2(ev)
    assert set(found) == set(MEDIA_DATASETS)
    assert found["SceneDocRet"][0] == "beir" and found["SceneMomentRet"][0] == "rows"
    assert (ev / "SceneDocRet" / "qrels.parquet").is_file()
    doc = read_task("SceneDocRet", *found["SceneDocRet"], ev)
    grades = [sorted(q.relevance.values()) for q in doc.queries]
    assert all(g[-1] == 2.0 and 1.0 in g for g in grades)  # graded, several relevant pages
    mret = read_task("SceneMomentRet", *found["SceneMomentRet"], ev)
    assert all(len(q.candidates) == 6 and len(q.item.video) == 32 for q in mret.queries)
    ret = read_task("SceneVideoRet", *found["SceneVideoRet"], ev)
    assert ret.kind == "beir" and ret.has_video and len(ret.corpus) == 7
    pairs = load_train(tmp_path / "train_media", tmp_path)
    by = {p.dataset for p in pairs}
    assert by == {"SceneVideoCls", "SceneVideoRet", "SceneDocRet"}
    assert all(len(p.query.video) == 8 for p in pairs if p.dataset == "SceneVideoCls")
