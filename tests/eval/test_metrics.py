"""precision@1 with honest ties, MMEB aggregation and the results table."""
import math

import pytest
import torch

from fam.data.mmeb import MMEB_DATASETS, DatasetInfo
from fam.errors import DataError
from fam.eval.metrics import aggregate, format_table, precision_at_1, recall_at_k


def test_precision_at_1_hits_and_misses():
    scores = torch.tensor([[0.9, 0.1, 0.2],    # positive strictly best -> 1
                           [0.1, 0.9, 0.2],    # positive strictly below -> 0
                           [0.5, 0.5001, 0.4]])  # below by a hair -> 0
    assert precision_at_1(scores).tolist() == [1.0, 0.0, 0.0]


def test_ties_never_favour_the_positive():
    scores = torch.tensor([[0.7, 0.7, 0.1],       # 2-way tie with the positive
                           [0.3, 0.3, 0.3],       # 3-way tie
                           [0.2, 0.8, 0.8]])      # tie at the top without the positive
    got = precision_at_1(scores)
    assert got[0].item() == pytest.approx(0.5)
    assert got[1].item() == pytest.approx(1 / 3)
    assert got[2].item() == 0.0
    assert precision_at_1(scores, ties="pessimistic").tolist() == [0.0, 0.0, 0.0]
    # argmax would pick index 0 for a constant scorer; we give exactly chance (1/C).
    assert precision_at_1(torch.zeros(4, 10)).tolist() == [0.1] * 4


def test_positive_index_tensor_and_errors():
    scores = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    assert precision_at_1(scores, torch.tensor([1, 0])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="NaN"):
        precision_at_1(torch.tensor([[0.1, float("nan")], [0.2, 0.1]]))
    with pytest.raises(ValueError, match="ties must be one of"):
        precision_at_1(scores, ties="random")
    with pytest.raises(ValueError, match="out of range"):
        precision_at_1(scores, 2)
    with pytest.raises(ValueError, match=r"\(Q, C\)"):
        precision_at_1(torch.zeros(3))


def test_the_three_tie_rules_on_hand_made_ties():
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.0],    # 2-way tie at the top with the positive
                           [0.2, 0.8, 0.8, 0.0],    # tie at the top without the positive
                           [0.5, 0.5, 0.5, 0.5],    # 4-way tie (a constant scorer)
                           [0.7, 0.3, 0.7, 0.7],    # 3-way tie with the positive
                           [0.6, 0.3, 0.2, 0.1]])   # no tie, positive first
    assert precision_at_1(scores, ties="expected").tolist() == [0.5, 0.0, 0.25, 1 / 3, 1.0]
    assert precision_at_1(scores, ties="optimistic").tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert precision_at_1(scores, ties="pessimistic").tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    # recall@2 of the 3-way tie behind one better candidate: ranks 2..4
    behind = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    assert recall_at_k(behind, 2, ties="expected").item() == pytest.approx(1 / 3)
    assert recall_at_k(behind, 2, ties="optimistic").item() == 1.0
    assert recall_at_k(behind, 2, ties="pessimistic").item() == 0.0


def test_optimistic_is_vlm2vecs_argmax():
    """VLM2Vec eval.py counts a hit when np.argmax(scores) == 0 (evaluation/eval_utils.py
    get_pred); with coarse scores full of ties, "optimistic" gives exactly that."""
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (500, 7), generator=gen).double()  # many ties
    argmax_hits = torch.tensor([float(np.argmax(row) == 0) for row in scores.numpy()],
                               dtype=torch.float64)
    assert torch.equal(precision_at_1(scores, ties="optimistic"), argmax_hits)
    assert 0 < argmax_hits.mean() < 1
    # ...and the three rules really differ on this data
    means = {t: precision_at_1(scores, ties=t).mean().item()
             for t in ("optimistic", "expected", "pessimistic")}
    assert means["optimistic"] > means["expected"] > means["pessimistic"]


def test_recall_at_k_with_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0],   # positive uniformly at rank 1..4
                           [0.5, 0.9, 0.1, 0.2],   # rank 2
                           [0.5, 0.9, 0.9, 0.5]])  # ranks 3..4
    assert recall_at_k(scores, 2).tolist() == [0.5, 1.0, 0.0]
    assert recall_at_k(scores, 3).tolist() == [0.75, 1.0, 0.5]
    assert recall_at_k(scores, 3, ties="pessimistic").tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(recall_at_k(scores, 1), precision_at_1(scores))


INFOS = {
    "A": DatasetInfo("A", "classification", "IND", 10, 0.1),
    "B": DatasetInfo("B", "classification", "OOD", 4, 0.25),
    "C": DatasetInfo("C", "retrieval", "IND", 100, 0.01),
    "D": DatasetInfo("D", "vqa", "OOD", None, None),
}


def test_aggregate_means_over_datasets():
    agg = aggregate({"A": 60.0, "B": 40.0, "C": 90.0}, INFOS)
    assert agg["meta_task"] == {"classification": 50.0, "vqa": None, "retrieval": 90.0,
                                "grounding": None}
    assert agg["IND"] == 75.0 and agg["OOD"] == 40.0
    assert agg["overall"] == pytest.approx(190 / 3)  # over datasets, not over meta-tasks
    assert agg["n_datasets"] == {"classification": 2, "vqa": 0, "retrieval": 1,
                                 "grounding": 0, "IND": 2, "OOD": 1, "overall": 3}
    ch = agg["chance"]
    assert ch["meta_task"]["classification"] == pytest.approx(17.5)
    assert ch["IND"] == pytest.approx(5.5) and ch["OOD"] == pytest.approx(25.0)
    assert ch["overall"] == pytest.approx(12.0)


def test_aggregate_chance_override_missing_and_unknown():
    agg = aggregate({"A": 50.0, "D": 30.0}, INFOS)
    assert agg["OOD"] == 30.0
    assert agg["chance"]["OOD"] is None and agg["chance"]["overall"] is None
    agg = aggregate({"A": 50.0, "D": 30.0}, INFOS, chance={"D": 20.0})
    assert agg["chance"]["overall"] == pytest.approx(15.0)
    with pytest.raises(DataError, match="datasets.json"):
        aggregate({"Nope": 1.0}, INFOS)


def test_aggregate_full_mmeb_table_counts():
    agg = aggregate({n: 50.0 for n in MMEB_DATASETS})
    assert agg["n_datasets"] == {"classification": 10, "vqa": 10, "retrieval": 12,
                                 "grounding": 4, "IND": 20, "OOD": 16, "overall": 36}


def _results(scores):
    per = {n: {"precision@1": v, "meta_task": INFOS[n].meta_task, "split": INFOS[n].split,
               "chance": 100 * INFOS[n].chance, "n": 5} for n, v in scores.items()}
    out = {"datasets": per}
    out.update(aggregate(scores, INFOS))
    return out


def test_format_table_two_models():
    a, b = _results({"A": 60.0, "B": 40.0, "C": 90.0}), _results({"A": 70.0, "B": 40.0,
                                                                  "C": 80.0})
    text = format_table([("VLM2Vec", a), ("FAM", b)], per_dataset=True)
    lines = text.splitlines()
    assert "VLM2Vec" in lines[0] and "FAM" in lines[0] and "chance" in lines[0]
    assert "diff" in lines[0]
    row = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and not ln.startswith("-")}
    assert row["Classification"][-4:] == ["50.0", "55.0", "17.5", "+5.0"]
    assert row["Retrieval"][-4:] == ["90.0", "80.0", "1.0", "-10.0"]
    assert row["VQA"][-4:] == ["-", "-", "-", "-"]
    assert row["A"][-4:] == ["60.0", "70.0", "10.0", "+10.0"]
    assert row["Overall"][1] == "3"
    assert len({len(ln) for ln in lines if ln.startswith("-")}) == 1
    single = format_table(a)
    assert "diff" not in single and "model" in single.splitlines()[0]
    assert lines[0].startswith("ties=unknown")  # these hand-made results record no rule
    a["ties"], b["ties"] = "optimistic", "optimistic"
    assert format_table([("x", a), ("y", b)]).startswith("ties=optimistic")
    b["ties"] = "expected"
    assert format_table([("x", a), ("y", b)]).startswith("ties=mixed")
    assert not math.isnan(float(single.splitlines()[-1].split()[2]))
