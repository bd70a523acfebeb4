"""The command line surface: every stage is reachable with YAML + key=value overrides."""
from __future__ import annotations

import json

import pytest

from fam.cli import build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "data", "model", "train", "eval", "encode", "bench", "pad", "index",
                "search", "serve", "export"):
        assert cmd in out


@pytest.mark.slow
def test_cli_pipeline_small(tmp_path, capsys):
    data, tiny = tmp_path / "data", tmp_path / "tiny"
    assert main(["data", "scenes", "--out", str(data), "n_train_images=24", "n_eval_images=8",
                 "n_ood_images=4", "eval_rows=4", "n_candidates=4"]) == 0
    assert (data / "datasets.json").exists()
    assert main(["model", "tiny", "--out", str(tiny), "--size", "xs",
                 "--corpus", str(data / "captions.json")]) == 0
    common = ["optim.steps=2", "optim.batch_size=4", "run.progress=false"]
    assert main(["train", "stage0", f"model={tiny}", f"captions={data / 'captions.json'}",
                 f"run.out_dir={tmp_path / 's0'}", *common]) == 0
    assert main(["train", "align", f"model={tmp_path / 's0' / 'model'}",
                 f"captions={data / 'captions.json'}", f"run.out_dir={tmp_path / 'al'}",
                 "lora.r=4", *common]) == 0
    assert main(["train", "adapt", "--vein", f"model={tmp_path / 'al' / 'model'}",
                 f"train_dir={data / 'train'}", f"image_root={data}", "vein.layers=[-1]",
                 f"run.out_dir={tmp_path / 'ad'}", *common]) == 0
    m = json.loads((tmp_path / "ad" / "train_metrics.json").read_text())
    assert m["stage"] == "adapt+vein" and m["steps"] == 2
    assert main(["eval", "--model", str(tmp_path / "ad" / "model"), "--data", str(data / "eval"),
                 "--image-root", str(data), "--max-rows", "2", "--no-progress"]) == 0
    assert "Overall" in capsys.readouterr().out
    # The trained model exports with its training record and results in the model card.
    assert main(["export", "--model", str(tmp_path / "ad" / "model"),
                 "--out", str(tmp_path / "st")]) == 0
    assert "min cosine" in capsys.readouterr().out
    card = (tmp_path / "st" / "README.md").read_text()
    assert "stage: `adapt+vein`, 2 steps" in card and "| **overall** |" in card


def test_encode_cli_matches_library(tiny_dirs, scene_images, tmp_path):
    from safetensors.torch import load_file

    from fam.data.types import MMItem
    from fam.model.encode import load_embedding_model
    root = scene_images[0].parent
    rows = [{"text": "a red circle"}, {"image": scene_images[0].name},
            {"text": "<|image_1|>\nRepresent the given image.", "image": scene_images[1].name}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["encode", "--model", str(tiny_dirs["qwen2_vl"]), "--input",
                 str(tmp_path / "items.jsonl"), "--image-root", str(root),
                 "--out", str(tmp_path / "e.safetensors"), "--batch-size", "2"]) == 0
    got = load_file(str(tmp_path / "e.safetensors"))["embeddings"]
    ref = load_embedding_model(tiny_dirs["qwen2_vl"]).encode(
        [MMItem("a red circle"), MMItem("", scene_images[0]),
         MMItem("<|image_1|>\nRepresent the given image.", scene_images[1])])
    assert (got - ref).abs().max() < 1e-6


def test_config_errors_exit_cleanly(tmp_path):
    assert main(["train", "adapt", "optim.nope=1"]) == 2
    assert main(["train", "stage0", str(tmp_path / "missing.yaml")]) == 2
