"""`fam eval --scoring single|maxsim|hybrid` (fam.eval.late) on the Scenes MMEB layout."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fam.cli import main
from fam.errors import ConfigError
from fam.eval.late import row_scores
from fam.eval.mmeb import evaluate
from fam.losses.maxsim import maxsim_reference
from fam.model.encode import load_embedding_model
from fam.model.multivector import TwoReadings, load_multivector


def _toy(u=9, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = F.normalize(torch.randn(u, d, generator=g), dim=-1)
    tokens = [F.normalize(torch.randn(int(n), d, generator=g), dim=-1)
              for n in torch.randint(1, 6, (u,), generator=g)]
    q_idx = torch.tensor([0, 1, 2])
    c_idx = torch.tensor([[3, 4, 5, 6], [4, 7, 8, 3], [8, 6, 5, 4]])
    return pooled, tokens, q_idx, c_idx


@pytest.mark.parametrize("similarity", ["maxsim", "meanmaxsim"])
def test_row_scores_maxsim_equals_the_loop(similarity):
    pooled, tokens, q_idx, c_idx = _toy()
    got = row_scores(pooled, tokens, q_idx, c_idx, "maxsim", similarity=similarity)
    for r in range(3):
        q = tokens[int(q_idx[r])][None]
        for c in range(4):
            d = tokens[int(c_idx[r, c])][None]
            want = maxsim_reference(q, torch.ones(q.shape[:2], dtype=torch.bool), d,
                                    torch.ones(d.shape[:2], dtype=torch.bool),
                                    similarity=similarity)
            torch.testing.assert_close(got[r, c], want[0, 0], rtol=1e-5, atol=1e-6)  # float32


def test_hybrid_reranks_only_the_pooled_top_k():
    pooled, tokens, q_idx, c_idx = _toy()
    full = row_scores(pooled, tokens, q_idx, c_idx, "maxsim")
    assert torch.equal(row_scores(pooled, tokens, q_idx, c_idx, "hybrid", rerank_k=4), full)
    cos = row_scores(pooled, tokens, q_idx, c_idx, "single")
    two = row_scores(pooled, tokens, q_idx, c_idx, "hybrid", rerank_k=2)
    top = cos.topk(2, dim=1).indices
    for r in range(3):
        kept = set(top[r].tolist())
        for c in range(4):
            assert (two[r, c] == full[r, c]) if c in kept else two[r, c] == float("-inf")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from fam.backbones import build_tiny
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("late")
    generate_scenes(ScenesConfig(seed=0, n_train_images=8, n_eval_images=10, n_ood_images=4,
                                 eval_rows=5, n_candidates=4), root / "data", progress=False)
    caps = [c["caption"] for c in json.loads((root / "data" / "captions.json").read_text())]
    build_tiny("qwen2_vl", root / "tiny", size="xs", corpus=caps, vocab_size=400)
    return root


def test_scorings_on_scenes_agree_where_they_must(scenes):
    model = load_embedding_model(scenes / "tiny")
    enc = TwoReadings(model, load_multivector(scenes / "tiny", model.adapter.hidden_size))
    kw = dict(progress=False, per_row=True, datasets=["Scenes-T2I", "Scenes-Grounding"])
    data = scenes / "data" / "eval"
    single = evaluate(model, data, scenes / "data", **kw)
    late = evaluate(enc, data, scenes / "data", scoring="maxsim", **kw)
    top1 = evaluate(enc, data, scenes / "data", scoring="hybrid", rerank_k=1, **kw)
    all_k = evaluate(enc, data, scenes / "data", scoring="hybrid", rerank_k=100, **kw)
    assert late["settings"]["scoring"] == "maxsim" and "scoring" not in single["settings"]
    for name in single["datasets"]:
        credits = {k: r["datasets"][name]["credits"] for k, r in
                   (("single", single), ("maxsim", late), ("top1", top1), ("all", all_k))}
        assert credits["top1"] == credits["single"]  # reranking one candidate changes nothing
        assert credits["all"] == credits["maxsim"]   # reranking every candidate is MaxSim
    with pytest.raises(ConfigError, match="token vectors"):
        evaluate(model, data, scenes / "data", scoring="maxsim", **kw)


def test_cli_eval_scoring(scenes, tmp_path):
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(scenes / "tiny"), "--data", str(scenes / "data" / "eval"),
                 "--image-root", str(scenes / "data"), "--datasets", "Scenes-T2I",
                 "--scoring", "hybrid", "--rerank-k", "2", "--mv-tokens", "all",
                 "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["scoring"] == "hybrid" and res["settings"]["rerank_k"] == 2
    assert 0 <= res["datasets"]["Scenes-T2I"]["precision@1"] <= 100
