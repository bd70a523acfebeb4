"""Background texture: objects untouched, background varied, deterministic per stream."""
import numpy as np
import pytest

from fam.data.texture import add_background_texture


def _scene():
    img = np.full((56, 56, 3), 120, np.uint8)
    img[5:20, 5:20] = (220, 40, 40)
    fg = np.zeros((56, 56), bool)
    fg[5:20, 5:20] = True
    return img, fg


def test_objects_keep_their_pixels_and_background_patches_differ():
    img, fg = _scene()
    out = add_background_texture(img, fg, np.random.default_rng(0), amplitude=25)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out[fg], img[fg])
    # 14-px background patches are no longer identical to each other
    patches = [out[r:r + 14, c:c + 14].reshape(-1) for r in (28, 42) for c in (0, 14, 28, 42)]
    assert len({p.tobytes() for p in patches}) == len(patches)
    # the texture is centred on the background grey (no global brightness shift)
    assert abs(float(out[~fg].mean()) - 120) < 15


def test_deterministic_per_stream_and_zero_amplitude():
    img, fg = _scene()
    a = add_background_texture(img, fg, np.random.default_rng([3, 7]))
    b = add_background_texture(img, fg, np.random.default_rng([3, 7]))
    c = add_background_texture(img, fg, np.random.default_rng([3, 8]))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(add_background_texture(img, fg, np.random.default_rng(0), 0),
                                  img)


def test_bad_inputs():
    img, fg = _scene()
    with pytest.raises(ValueError, match="uint8"):
        add_background_texture(img.astype(np.float32), fg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="foreground mask"):
        add_background_texture(img, fg[:10], np.random.default_rng(0))
    with pytest.raises(ValueError, match="amplitude"):
        add_background_texture(img, fg, np.random.default_rng(0), -1)
