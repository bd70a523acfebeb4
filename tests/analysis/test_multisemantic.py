"""Multi-semantic check: words true of Scenes objects and atom precision/recall."""
import math

import pytest
import torch

from fam.analysis.multisemantic import multisemantic_scores, object_words, word_token_sets

OBJS = [{"colour": "red", "shape": "circle", "box": [10, 10, 28, 28]},
        {"colour": "blue", "shape": "square", "box": [70, 10, 102, 42]},
        {"colour": "green", "shape": "star", "box": [14, 80, 32, 98]}]


def test_object_words_relations_by_centres_and_margin():
    w = object_words(OBJS, 112, 112)
    # red (19, 19): left of blue (86, 26), above green (23, 89); |Δx| to green = 4 < 12
    assert w[0] == {"colour": ["red"], "shape": ["circle"], "relation": ["left", "above"]}
    # blue: right of red and of green; above green (Δy 63); not below red (Δy 7 < 12)
    assert w[1]["relation"] == ["right", "above"]
    # green: below both, left of blue
    assert w[2]["relation"] == ["left", "below"]
    # one object: no relation word
    assert object_words(OBJS[:1], 112, 112)[0]["relation"] == []


def test_scores_hand_case():
    vocab = {"red": [1], "circle": [2], "left": [3], "above": [4], "blue": [5], "big": [6, 7]}
    truth = [word_token_sets({"colour": ["red"], "shape": ["circle"],
                              "relation": ["left", "above"]}, vocab.__getitem__),
             word_token_sets({"colour": ["blue"], "shape": ["circle"], "relation": []},
                             vocab.__getitem__)]
    atoms = torch.tensor([[1, 2, 9, 3, 8, 4],     # first 5: red, circle, left (+2 misses)
                          [9, 9, 9, 9, 5, 2]])    # first 5: blue only
    s = multisemantic_scores(atoms, truth, k=5)
    assert s["precision"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert s["recall"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert s["recall_colour"] == pytest.approx(1.0)
    assert s["recall_shape"] == pytest.approx(0.5)
    assert s["recall_relation"] == pytest.approx(0.5)     # only patch 0 has relations
    # k = 6 reaches "above" for patch 0 and "circle" for patch 1
    s6 = multisemantic_scores(atoms, truth, k=6)
    assert s6["recall"] == pytest.approx(1.0)
    assert s6["recall_relation"] == pytest.approx(1.0)


def test_multi_token_words_count_once_and_repeated_atoms():
    truth = [{"colour": [{6, 7}], "shape": [], "relation": []}]
    s = multisemantic_scores(torch.tensor([[6, 7, 6, 1, 1]]), truth, k=5)
    assert s["recall"] == 1.0
    assert s["precision"] == pytest.approx(3 / 5)   # every atom that is a true token counts
    assert math.isnan(s["recall_relation"])


def test_bad_shapes():
    with pytest.raises(ValueError, match="M = 2"):
        multisemantic_scores(torch.zeros(3, 5), [{}, {}])
    with pytest.raises(ValueError, match="k=6"):
        multisemantic_scores(torch.zeros(1, 5), [{}], k=6)
