"""Ranking metrics (hit, NDCG, MAP, MRR, precision, recall, F1 at 1/5/10) against independent
implementations on generated rankings with several graded positives."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from fam.eval.ranking import (K_LIST, METRICS, query_metrics, rank_ids, relevance_of,
                              score_rankings, write_score_json)


def _plain(scores: np.ndarray, grades: np.ndarray, k: int) -> dict[str, float]:
    """Textbook metrics of one query from a score vector and a dense grade vector
    (no ties in ``scores``): positions of the relevant items in the full ranking."""
    order = np.argsort(-scores)
    g = grades[order]
    rel_pos = np.flatnonzero(g > 0)            # 0-based ranks of relevant items
    n_rel = int((grades > 0).sum())
    in_top = rel_pos[rel_pos < k]
    disc = 1.0 / np.log2(np.arange(2, len(g) + 2))
    ideal = np.sort(grades)[::-1]
    lin = (g[:k] * disc[:k]).sum() / (ideal[:k] * disc[:k]).sum()
    expo = ((2 ** g[:k] - 1) * disc[:k]).sum() / ((2 ** ideal[:k] - 1) * disc[:k]).sum()
    p, r = len(in_top) / k, len(in_top) / n_rel
    ap = sum((j + 1) / (pos + 1) for j, pos in enumerate(in_top)) / min(n_rel, k)
    return {f"hit@{k}": float(len(in_top) > 0), f"ndcg_linear@{k}": lin,
            f"ndcg_exponential@{k}": expo, f"precision@{k}": p, f"recall@{k}": r,
            f"f1@{k}": 0.0 if p + r == 0 else 2 * p * r / (p + r), f"map@{k}": ap,
            f"mrr@{k}": 1.0 / (in_top[0] + 1) if len(in_top) else 0.0}


def _generated(seed: int, q: int = 40, n: int = 30):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(q, n))           # continuous: no ties
    grades = np.zeros((q, n))
    for i in range(q):
        n_pos = rng.integers(1, 13)             # 1..12 positives: some queries have > k
        cols = rng.choice(n, n_pos, replace=False)
        grades[i, cols] = rng.integers(1, 4, n_pos)   # graded 1..3
        # a few queries put their positives near the top
        if i % 3 == 0:
            scores[i, cols] += 2.0
    return scores, grades


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_an_independent_implementation(seed):
    scores, grades = _generated(seed)
    ids = [f"c{j}" for j in range(scores.shape[1])]
    rel = [relevance_of([ids[j] for j in np.flatnonzero(row)], row[row > 0].tolist())
           for row in grades]
    rankings = rank_ids(torch.from_numpy(scores), ids, rel)
    assert all(len(r) == 10 for r in rankings)
    got = score_rankings(rankings, rel)
    want = {key: np.mean([_plain(s, g, k)[key] for s, g in zip(scores, grades)])
            for k in K_LIST for key in _plain(scores[0], grades[0], k)}
    assert set(got) == set(want) | {"num_pred", "num_data"}
    for key, value in want.items():
        # float64 sums in a different order: equal to rounding.
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # scikit-learn's NDCG (linear gain, log2 discount) is a third implementation.
    for k in K_LIST:
        assert got[f"ndcg_linear@{k}"] == pytest.approx(
            ndcg_score(grades, scores, k=k), abs=1e-12)  # float64, summation order only
    assert got["num_pred"] == got["num_data"] == scores.shape[0]
    # the metrics are not trivially constant on these rankings
    assert 0 < got["map@10"] < 1 and 0 < got["ndcg_exponential@5"] < 1


def test_hand_computed_query():
    rel = relevance_of(["a", "b", "c"], [3, 1, 2])
    m = query_metrics(["x", "a", "y", "c", "z"], rel, ks=(1, 5))
    assert m["hit@1"] == 0 and m["hit@5"] == 1 and m["mrr@5"] == 0.5
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == pytest.approx(2 / 3)
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    dcg = 3 / math.log2(3) + 2 / math.log2(5)
    idcg = 3 / 1 + 2 / math.log2(3) + 1 / 2
    assert m["ndcg_linear@5"] == pytest.approx(dcg / idcg)
    # map@1 divides by min(|R|, k) = 1: a miss at rank 1 scores 0, a hit 1
    assert query_metrics(["a"], rel, ks=(1,))["map@1"] == 1.0


def test_each_label_keeps_its_own_grade():
    # VLM2Vec set()s the labels, then zips them with the grades in the original order, so a
    # label may receive another label's grade. fam pairs them as given.
    rel = relevance_of(["p1", "p2", "p3", "p1"], [1, 2, 3, 1])
    assert rel == {"p1": 1.0, "p2": 2.0, "p3": 3.0}
    with pytest.raises(ValueError, match="twice"):
        relevance_of(["p1", "p1"], [1, 2])
    with pytest.raises(ValueError, match="> 0"):
        relevance_of(["p1"], [0])
    with pytest.raises(ValueError, match="relevance scores"):
        relevance_of(["p1", "p2"], [1])
    assert relevance_of("p") == {"p": 1.0}


def test_ties_go_against_relevant_items():
    ids = ["a", "b", "c", "d"]
    rel = [{"a": 1.0}, {"d": 2.0, "c": 1.0}]
    ranking = rank_ids(torch.zeros(2, 4), ids, rel)
    assert ranking[0][-1] == "a" and ranking[1][-2:] == ["c", "d"]
    assert score_rankings(ranking, rel)["hit@1"] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        rank_ids(torch.tensor([[float("nan")] * 4]), ids, rel[:1])
    with pytest.raises(ValueError, match="do not match"):
        rank_ids(torch.zeros(2, 3), ids, rel)


def test_score_file_has_vlm2vec_keys(tmp_path):
    scores = score_rankings([["a", "b"]], [{"b": 1.0}])
    path = write_score_json(tmp_path / "X_score.json", scores)
    data = json.loads(path.read_text())
    assert {f"{m}@{k}" for m in METRICS for k in K_LIST} <= set(data)
    assert data["hit@1"] == 0.0 and data["hit@5"] == 1.0 and data["mrr@10"] == 0.5
    # precision@k divides by k even when fewer candidates were ranked (VLM2Vec's rule)
    assert data["precision@5"] == pytest.approx(1 / 5)
