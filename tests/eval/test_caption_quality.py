"""Scenes caption-quality metric on hand-made captions."""
import math

import pytest

from fam.eval.captions import caption_scores, parse_mentions, parse_relations, relation_holds

RED = {"colour": "red", "shape": "circle", "size": "small", "box": [10, 10, 28, 28]}
BLUE = {"colour": "blue", "shape": "square", "size": "large", "box": [60, 10, 92, 42]}
GREEN = {"colour": "green", "shape": "star", "size": "small", "box": [10, 70, 28, 88]}


def test_parse_mentions_grammar():
    m = parse_mentions("A small red circle is left of the blue square, with two stars")
    assert [(x.size, x.colour, x.shape) for x in m] == [
        ("small", "red", "circle"), (None, "blue", "square"), (None, None, "star")]
    # size after colour, and a word in between breaks the phrase
    m = parse_mentions("a red large circle; a red shiny square")
    assert [(x.size, x.colour, x.shape) for x in m] == [("large", "red", "circle"),
                                                        (None, None, "square")]


def test_parse_relations_between_consecutive_mentions():
    text = "a red circle is left of a blue square, with a green star"
    rels = parse_relations(text)
    assert rels == [(0, "left of", 1)]
    assert parse_relations("a red circle and a blue square below it") == []


def test_relation_holds_uses_box_centres():
    assert relation_holds("left of", RED["box"], BLUE["box"])
    assert not relation_holds("right of", RED["box"], BLUE["box"])
    assert relation_holds("above", RED["box"], GREEN["box"])
    assert relation_holds("below", GREEN["box"], RED["box"])


def test_perfect_caption():
    s = caption_scores(["a small red circle is left of a large blue square"], [[RED, BLUE]])
    assert s["object_precision"] == s["object_recall"] == s["object_f1"] == 1.0
    assert s["colour_recall"] == s["shape_recall"] == 1.0
    assert s["size_accuracy"] == 1.0 and s["count_accuracy"] == 1.0
    assert s["relation_accuracy"] == 1.0 and s["relations_stated"] == 1


def test_binding_error_counts_as_wrong_object_but_right_words():
    # colours swapped between the shapes: every word is in the image, no object is right
    s = caption_scores(["a blue circle is left of a red square"], [[RED, BLUE]])
    assert s["object_precision"] == 0.0 and s["object_recall"] == 0.0
    assert s["object_f1"] == 0.0
    assert s["colour_recall"] == 1.0 and s["shape_recall"] == 1.0
    # the relation is between unmatched mentions: wrong
    assert s["relation_accuracy"] == 0.0


def test_partial_caption_micro_averages():
    caps = ["a red circle",                                   # 1 of 3 objects, 1 mention
            "a large blue square is right of a small green star and a purple cross"]
    objs = [[RED, BLUE, GREEN], [BLUE, GREEN]]
    s = caption_scores(caps, objs)
    # mentions: 1 + 3 = 4, matched 1 + 2 = 3; objects 3 + 2 = 5
    assert s["object_precision"] == pytest.approx(3 / 4)
    assert s["object_recall"] == pytest.approx(3 / 5)
    p, r = 3 / 4, 3 / 5
    assert s["object_f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["count_accuracy"] == 0.0                        # 1≠3 mentions, 3≠2
    # blue square (x 76) right of green star (x 19): true
    assert s["relation_accuracy"] == 1.0
    # sizes stated on matched mentions: large blue, small green: both right
    assert s["size_accuracy"] == 1.0
    # colours: {red, blue, green} named red → 1/3; {blue, green} both → 2/2
    assert s["colour_recall"] == pytest.approx(3 / 5)
    assert s["per_caption"][0] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_wrong_size_and_false_relation():
    s = caption_scores(["a large red circle is below a small blue square"], [[RED, BLUE]])
    assert s["object_f1"] == 1.0                  # binding right, sizes wrong
    assert s["size_accuracy"] == 0.0
    assert s["relation_accuracy"] == 0.0          # same height: "below" is false


def test_each_object_matched_once():
    twin = dict(RED, box=[60, 60, 78, 78])
    s = caption_scores(["a red circle and a red circle and a red circle"], [[RED, twin]])
    assert s["object_recall"] == 1.0
    assert s["object_precision"] == pytest.approx(2 / 3)


def test_no_relation_stated_is_nan_and_empty_caption_scores_zero():
    s = caption_scores(["", "a red circle"], [[RED], [RED]])
    assert math.isnan(s["relation_accuracy"]) and s["relations_stated"] == 0
    assert s["per_caption"] == [0.0, 1.0]


def test_bleu4_against_references():
    refs = [["a small red circle is left of a large blue square"]]
    same = caption_scores(refs[0], [[RED, BLUE]], references=refs)["bleu4"]
    other = caption_scores(["a green star"], [[RED, BLUE]], references=refs)["bleu4"]
    assert same == pytest.approx(100.0)
    assert other < 5.0
    with pytest.raises(ValueError, match="reference lists"):
        caption_scores(["a"], [[RED]], references=[])
