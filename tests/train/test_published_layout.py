"""`fam train adapt` and `fam eval` on MMEB data in the published Hugging Face layout
(one folder per subset holding parquet files), made by the test from Scenes."""
from __future__ import annotations

import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _to_hf_layout(src_dir, dst_dir, split):
    for f in sorted(src_dir.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out = dst_dir / f.stem
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}-00000-of-00001.parquet")


@pytest.mark.slow
def test_adapt_and_eval_on_parquet_folders(tmp_path):
    from fam.backbones import build_tiny
    from fam.cli import main
    from fam.data.scenes import ScenesConfig, generate_scenes
    data = tmp_path / "scenes"
    generate_scenes(ScenesConfig(seed=0, n_train_images=24, n_eval_images=8, n_ood_images=4,
                                 eval_rows=4, n_candidates=4), data, progress=False)
    _to_hf_layout(data / "train", tmp_path / "MMEB-train", "original")
    _to_hf_layout(data / "eval", tmp_path / "MMEB-eval", "test")
    (tmp_path / "MMEB-eval" / "datasets.json").write_text((data / "datasets.json").read_text())
    caps = [c["caption"] for c in json.loads((data / "captions.json").read_text())]
    build_tiny("qwen2_vl", tmp_path / "tiny", size="xs", corpus=caps, vocab_size=400)
    assert main(["train", "adapt", f"model={tmp_path / 'tiny'}",
                 f"train_dir={tmp_path / 'MMEB-train'}", f"image_root={data}",
                 "subsets=[Scenes-T2I,Scenes-Count]", "optim.steps=2", "optim.batch_size=4",
                 "lora.r=4", f"run.out_dir={tmp_path / 'run'}", "run.progress=false"]) == 0
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data",
                 str(tmp_path / "MMEB-eval"), "--image-root", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert len(res["datasets"]) == 14 and res["overall"] is not None
