"""2-rank gloo DDP training (adapt) on rows with videos == 1 process on the global batch,
plain and with GradCache (issue 18): the runs of :mod:`test_ddp_training` (float64, LoRA on a
tiny xs Qwen2-VL, hard negatives, 2 optimizer steps) on rows whose queries and positives are
videos (native Qwen2-VL video input: ``pixel_values_videos``, ``video_grid_thw``), images
and texts, mixed so that every rank's local batch holds videos in every step."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from test_ddp_training import (DTYPE, GLOBAL_BATCH, STEPS, WORLD, _differing, _free_port, _train,
                               _worker)
from test_gradcache import WORDS, make_module

from fam.data.mmeb import TrainPair
from fam.data.types import MMItem
from fam.train.schedule import ResumableBatchSampler

N = 16


def _videos(root, n_videos: int = 4) -> list:
    """Frame folders of a square moving at different speeds (5, 7, 9, 11 frames: the 11-frame
    one is sampled to 8; odd counts pad the temporal patch)."""
    out = []
    for v in range(n_videos):
        folder = root / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(5 + 2 * v):
            im = Image.new("RGB", (56, 56), (70, 70, 70))
            x = 2 + (i * (v + 1) * 3) % 36
            ImageDraw.Draw(im).rectangle([x, 16, x + 12, 28], fill=(240, 40 * v, 40))
            im.save(folder / f"f{i}.png")
        out.append(folder)
    return out


def video_pairs(images, videos, n: int = N) -> list[TrainPair]:
    """Rows mixing video queries, video positives, image queries, texts and negatives."""
    pairs = []
    for i in range(n):
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 3))
        vid = videos[i % len(videos)]
        if i % 4 == 3:
            q = MMItem("<|image_1|>\nRepresent the given image.", images[i % len(images)])
        elif i % 4 == 2:
            q = MMItem(f"Find the clip: {text}")
        else:
            q = MMItem("<|video_1|>\nRepresent the given video.", video=vid)
        pos = MMItem(f"a clip of {text}") if i % 2 == 0 else \
            MMItem("<|video_1|> the clip", video=videos[(i + 1) % len(videos)])
        neg = MMItem(f"not {text} {i}") if i % 3 == 0 else None
        pairs.append(TrainPair(q, pos, neg, "toy", "toy.jsonl", i + 1))
    return pairs


@pytest.mark.slow
def test_two_rank_ddp_on_video_rows_equals_one_process(scene_images, tmp_path):
    torch.set_num_threads(1)
    pairs = video_pairs(scene_images, _videos(tmp_path / "frames"))
    for r in range(WORLD):  # the premise: every rank sees videos in every step
        for rows in ResumableBatchSampler(N, GLOBAL_BATCH // WORLD, STEPS, 0, rank=r,
                                          world_size=WORLD):
            assert any(pairs[i].query.video or pairs[i].pos.video for i in rows)
    chunks = (0, 2)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), pairs, chunks), nprocs=WORLD,
             join=True)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0)
    init = {n: p for n, p in make_module("task", dtype=DTYPE)[0].named_parameters()
            if p.requires_grad}
    assert any(not torch.allclose(init[n], ref[n]) for n in ref)  # the weights moved
    for chunk in chunks:
        got = torch.load(tmp_path / f"ddp-c{chunk}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        bad = _differing(got, ref)
        assert not bad, f"chunk {chunk}: {len(bad)} of {len(ref)} tensors differ: {bad}"
