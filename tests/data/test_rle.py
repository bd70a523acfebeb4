"""COCO RLE: round trips, hand-computed counts and compressed strings (pycocotools format)."""
from __future__ import annotations

import numpy as np
import pytest

from fam.data.rle import (counts_to_string, mask_to_counts, rle_area, rle_decode,
                          rle_encode, rle_to_bbox, string_to_counts)
from fam.errors import DataError

# 3x3 example, worked by hand. Column-major flattening reads column 0 top to bottom, then
# column 1, ...: 0,0,1 | 1,1,0 | 0,1,0 -> runs of (0:2)(1:3)(0:2)(1:1)(0:1).
SMALL = np.array([[0, 1, 0],
                  [0, 1, 1],
                  [1, 0, 0]], dtype=bool)
SMALL_COUNTS = [2, 3, 2, 1, 1]
# rleToString by hand: 2 -> '2', 3 -> '3', 2 -> '2' (no delta for i <= 2);
# i=3: 1 - 3 = -2 -> low 5 bits 30 (sign bit 0x10 set, rest is -1) -> chr(48+30) = 'N';
# i=4: 1 - 2 = -1 -> 31 -> chr(48+31) = 'O'.
SMALL_STRING = "232NO"


def test_small_mask_uncompressed_counts_by_hand():
    assert mask_to_counts(SMALL) == SMALL_COUNTS
    np.testing.assert_array_equal(rle_decode({"size": [3, 3], "counts": SMALL_COUNTS}), SMALL)


def test_small_mask_compressed_string_by_hand():
    rle = rle_encode(SMALL)
    assert rle == {"size": [3, 3], "counts": SMALL_STRING}
    np.testing.assert_array_equal(rle_decode(rle), SMALL)


@pytest.mark.parametrize("counts,expected", [
    ([0, 4], "04"),                 # full 2x2 mask: leading empty 0-run
    ([100], "T3"),                  # 100 = 3*32 + 4: '4'|0x20 -> 'T', then '3'
    ([16], "`0"),                   # 16 has bit 0x10 set: needs a second char to stay positive
    ([5000, 10, 4990], "Xl4:nk4"),  # 5000 = 4*1024 + 28*32 + 8 ; 4990 = 4*1024 + 27*32 + 30
    ([1, 2, 3, 18], "123`0"),       # i=3 writes the delta 18 - 2 = 16 -> '`0'
])
def test_known_compressed_strings(counts, expected):
    assert counts_to_string(counts) == expected
    assert string_to_counts(expected) == counts


def test_negative_deltas_by_hand():
    # 18 has bit 0x10 set, so it takes two chars: (18|0x20) -> 'b', then 0 -> '0'.
    # i=3: 2 - 18 = -16 -> low bits 16 with the sign bit, the rest is -1 -> one char '@'.
    assert counts_to_string([1, 18, 3, 2]) == "1b03@"
    # i=3: 1 - 18 = -17 -> low bits 15 (no sign bit) and more follow -> '_', then -1 -> 'O'.
    assert counts_to_string([1, 18, 3, 1]) == "1b03_O"
    assert string_to_counts("1b03@") == [1, 18, 3, 2]
    assert string_to_counts("1b03_O") == [1, 18, 3, 1]


def test_single_column_object_in_100x100():
    m = np.zeros((100, 100), bool)
    m[0:10, 50] = True  # flat (column-major) indices 5000..5009
    rle = rle_encode(m)
    assert rle["counts"] == "Xl4:nk4"
    assert rle_area(rle) == 10
    assert rle_to_bbox(rle) == [50, 0, 51, 10]
    assert rle_to_bbox(rle, fmt="xywh") == [50, 0, 1, 10]


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (28, 28), (112, 112), (3, 200)])
def test_round_trip_random_empty_full(shape):
    rng = np.random.default_rng(sum(shape))
    masks = [np.zeros(shape, bool), np.ones(shape, bool)]
    for p in (0.05, 0.5, 0.95):
        masks.append(rng.random(shape) < p)
    # a blob, so long runs and big deltas occur too
    blob = np.zeros(shape, bool)
    blob[shape[0] // 4: 3 * shape[0] // 4 + 1, shape[1] // 3: 2 * shape[1] // 3 + 1] = True
    masks.append(blob)
    for m in masks:
        rle = rle_encode(m)
        assert rle["size"] == list(shape)
        assert isinstance(rle["counts"], str)
        back = rle_decode(rle)
        assert back.dtype == bool and back.shape == shape
        np.testing.assert_array_equal(back, m)
        # uncompressed and bytes forms decode the same
        np.testing.assert_array_equal(
            rle_decode({"size": list(shape), "counts": mask_to_counts(m)}), m)
        np.testing.assert_array_equal(
            rle_decode({"size": list(shape), "counts": rle["counts"].encode()}), m)
        assert rle_area(rle) == int(m.sum())
        ys, xs = np.nonzero(m)
        if m.any():
            assert rle_to_bbox(rle) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        else:
            assert rle_to_bbox(rle) == [0, 0, 0, 0]


def test_empty_and_full_counts():
    assert mask_to_counts(np.zeros((2, 3), bool)) == [6]
    assert mask_to_counts(np.ones((2, 3), bool)) == [0, 6]
    assert rle_encode(np.ones((2, 2), bool))["counts"] == "04"


def test_bad_rle_raises_data_error():
    with pytest.raises(DataError, match="sum to"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(DataError, match="invalid character"):
        rle_decode({"size": [2, 2], "counts": "0~"})
    with pytest.raises(DataError, match="middle of a value"):
        rle_decode({"size": [2, 2], "counts": "T"})
    with pytest.raises(DataError, match="size"):
        rle_decode({"size": [2], "counts": [4]})
