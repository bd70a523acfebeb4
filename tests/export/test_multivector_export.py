"""`fam export --format multivector`: sentence-transformers' MultiVectorEncoder loads the folder
without remote code and gives fam's token vectors and MaxSim scores (max |Δ| ≤ 1e-5)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from torch.nn.utils.rnn import pad_sequence

from fam.cli import main
from fam.data.types import MMItem
from fam.errors import ConfigError
from fam.losses.maxsim import maxsim
from fam.model.encode import EncodePipeline, load_embedding_model
from fam.model.multivector import MultiVectorHead, load_multivector, save_multivector

st_mod = pytest.importorskip("sentence_transformers")
# The acceptance bound: both sides run the same float32 forward (measured: tokens ≤ 1.8e-7,
# summed maxsim scores ≤ 9.5e-7 on the four exportable families).
MAX_ABS = 1e-5
QP = "Find me an everyday image that matches the given caption: "
DP = "<|image_1|>\nRepresent the given image."


def _model(tiny_dirs, tmp_path, family, dim, tokens, similarity):
    src = tmp_path / "model"
    shutil.copytree(tiny_dirs[family], src)
    torch.manual_seed(7)
    hidden = load_embedding_model(src).adapter.hidden_size
    save_multivector(MultiVectorHead(hidden, dim, tokens, similarity), src)
    return src


def _padded(toks):
    return (pad_sequence(toks, batch_first=True),
            pad_sequence([torch.ones(len(t), dtype=torch.bool) for t in toks], batch_first=True))


@pytest.mark.parametrize("family,dim,tokens,similarity", [
    ("qwen2_vl", 16, "content", "meanmaxsim"), ("qwen2_vl", 0, "all", "maxsim"),
    ("llava", 24, "content", "maxsim")])
def test_multivector_encoder_scores_like_fam(tiny_dirs, tmp_path, family, dim, tokens,
                                             similarity):
    src = _model(tiny_dirs, tmp_path, family, dim, tokens, similarity)
    out = tmp_path / "export"
    assert main(["export", "--model", str(src), "--out", str(out), "--format", "multivector",
                 "--no-check"]) == 0
    from sentence_transformers import MultiVectorEncoder
    mve = MultiVectorEncoder(str(out), device="cpu")  # trust_remote_code defaults to False
    assert mve.similarity_fn_name == similarity
    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert any(t.endswith(".Dense") for t in types) == bool(dim)
    ims = []
    for i, col in enumerate([(220, 30, 30), (30, 60, 220), (20, 180, 40)]):
        im = Image.new("RGB", (96 + 16 * i, 112), (120, 128, 128))
        ImageDraw.Draw(im).ellipse([8, 8, 60, 60], fill=col)
        ims.append(im)
    queries = ["a red circle left of a blue square", "a small green triangle above a yellow star"]
    q_st = mve.encode_query(queries, prompt=QP, show_progress_bar=False)
    d_st = mve.encode_document(ims, prompt=DP, show_progress_bar=False) + mve.encode_document(
        [{"image": ims[0], "text": "<|image_1|> what colour is the circle?"}],
        prompt="", show_progress_bar=False)
    model = load_embedding_model(src)
    pipe = EncodePipeline(model, prefetch=0, multivector=load_multivector(src, model.adapter.hidden_size))
    _, q_fam = pipe.encode_multi([MMItem(QP + q) for q in queries])
    _, d_fam = pipe.encode_multi([MMItem(DP)] * 3 + [MMItem("<|image_1|> what colour is the circle?")],
                                 ims + [ims[0]])
    for a, b in zip(q_fam + d_fam, list(q_st) + list(d_st)):
        assert a.shape == b.shape and a.shape[-1] == (dim or model.adapter.hidden_size)
        assert float((a - b.float()).abs().max()) <= MAX_ABS
    fam_scores = maxsim(*_padded(q_fam), *_padded(d_fam), similarity=similarity)
    st_scores = mve.similarity(list(q_st), list(d_st)).float()
    assert float((fam_scores - st_scores).abs().max()) <= MAX_ABS
    assert fam_scores.std() > 0  # the scores tell the documents apart


def test_export_runs_its_own_check_and_records_it(tiny_dirs, tmp_path):
    src = _model(tiny_dirs, tmp_path, "qwen2_vl", 16, "content", "meanmaxsim")
    main(["export", "--model", str(src), "--out", str(tmp_path / "e"), "--format", "multivector"])
    rec = json.loads((tmp_path / "e" / "fam_export.json").read_text())
    assert rec["format"] == "multivector" and rec["dim"] == 16
    assert rec["check"]["max_token_diff"] <= MAX_ABS and rec["check"]["max_score_diff"] <= MAX_ABS


def test_token_sets_without_a_counterpart_are_refused(tiny_dirs, tmp_path):
    from fam.export.multivector import export_multivector
    src = _model(tiny_dirs, tmp_path, "qwen2_vl", 0, "image", "maxsim")
    with pytest.raises(ConfigError, match="tokens='image'"):
        export_multivector(src, tmp_path / "e")
    assert not (tmp_path / "e").exists()
