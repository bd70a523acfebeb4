"""REC scorer: box text format, parsing, IoU and accuracy on hand-made cases."""
import math

import pytest

from fam.eval.rec import box_iou, box_to_text, normalise_box, parse_box, score_rec


def test_box_to_text_scales_pixel_boxes_to_percent():
    # 112-px image: 28 px = 25 %, 56 px = 50 %, 46 px = 41.07 % → 41, 74 px = 66.07 % → 66
    assert box_to_text([28, 56, 46, 74], 112, 112) == "[25, 50, 41, 66]"
    # non-square image: x by the width, y by the height
    assert normalise_box([0, 0, 50, 20], 200, 40) == (0, 0, 25, 50)
    # the whole image
    assert normalise_box([0, 0, 112, 112], 112, 112) == (0, 0, 100, 100)


def test_normalise_box_keeps_tiny_boxes_one_unit_wide():
    # 0.4 px wide box rounds to zero width; it is kept one unit wide inside 0..100
    assert normalise_box([10, 10, 10.4, 30], 1000, 1000) == (1, 1, 2, 3)
    x0, _, x1, _ = normalise_box([999.8, 0, 1000, 10], 1000, 1000)
    assert (x0, x1) == (99, 100)


def test_normalise_box_rejects_empty_boxes_and_sizes():
    with pytest.raises(ValueError, match="empty box"):
        normalise_box([5, 5, 5, 9], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        normalise_box([0, 0, 1, 1], 0, 10)


@pytest.mark.parametrize("text,box", [
    ("[25, 50, 41, 66]", (25, 50, 41, 66)),
    ("[25,50,41,66]", (25, 50, 41, 66)),
    ("the box is [ 3 , 4 , 90 , 99 ] .", (3, 4, 90, 99)),
    ("25 50 41 66", (25, 50, 41, 66)),           # brackets dropped: first four numbers
    ("[0, 0, 100, 100]", (0, 0, 100, 100)),
    ("[12.5, 10, 40, 60]", (12.5, 10, 40, 60)),  # decimals inside 0..100 are accepted
])
def test_parse_box_reads_the_format(text, box):
    assert parse_box(text) == tuple(float(v) for v in box)


@pytest.mark.parametrize("text", [
    "", "red circle", "[25, 50, 41]",             # fewer than four numbers
    "[41, 50, 25, 66]", "[25, 66, 41, 66]",       # x1 <= x0, y1 <= y0
    "[25, 50, 141, 66]", "[-3, 50, 41, 66]",      # outside 0..100
])
def test_parse_box_rejects_malformed_answers(text):
    assert parse_box(text) is None


def test_fraction_boxes_are_read_in_percent_and_miss():
    # LLaVA-style fractions are not this format: read as percent they are a tiny box near
    # the origin, which misses the object
    box = parse_box("[0.25, 0.5, 0.41, 0.66]")
    assert box == (0.25, 0.5, 0.41, 0.66)
    assert box_iou(box, (25, 50, 41, 66)) == 0.0


def test_box_iou_hand_cases():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0          # touching edges
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (2, 2, 8, 8)) == pytest.approx(36 / 100)
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 2)) == pytest.approx(0.5)


def test_score_rec_threshold_and_invalid_answers():
    gold = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10), (20, 20, 40, 40)]
    answers = ["[0, 0, 10, 10]",        # IoU 1
               "[0, 0, 10, 5]",         # IoU 0.5 exactly: a hit (≥ 0.5)
               "[0, 0, 10, 4]",         # IoU 0.4: a miss
               "I cannot see it"]       # invalid: a miss, IoU 0
    s = score_rec(answers, gold)
    assert s["hits"] == [True, True, False, False]
    assert s["accuracy"] == 0.5
    assert s["invalid"] == 0.25
    assert s["mean_iou"] == pytest.approx((1 + 0.5 + 0.4 + 0) / 4)
    assert s["n"] == 4


def test_score_rec_empty_and_mismatched():
    s = score_rec([], [])
    assert s["n"] == 0 and math.isnan(s["accuracy"])
    with pytest.raises(ValueError, match="2 answers but 1 gold"):
        score_rec(["a", "b"], [(0, 0, 1, 1)])


def test_round_trip_hits_the_pixel_box():
    # the text written for a Scenes box parses back onto a box with IoU ≥ 0.9 of the
    # exact (un-rounded) percentage box: rounding loses at most half a unit per edge
    for px in ([2, 2, 20, 20], [71, 2, 89, 20], [40, 60, 72, 92]):
        exact = [v / 112 * 100 for v in px]
        assert box_iou(parse_box(box_to_text(px, 112, 112)), exact) > 0.9
