"""The flat image store (data/store.py): images back to back in one 1-D .npy array, in order."""

from __future__ import annotations

import numpy as np
import pytest

from sharpkd.data import store
from sharpkd.errors import UserError

SIZES = [(3, 5), (4, 2), (1, 1)]


def _images(sizes, channels, factor=1, dtype=np.uint8):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h * factor, w * factor, channels)).astype(dtype) for h, w in sizes]


def test_offsets_are_the_sums_of_the_sizes_before():
    assert store.image_offsets(SIZES, 3).tolist() == [0, 45, 69, 72]
    assert store.image_offsets(SIZES, 1, factor=2).tolist() == [0, 60, 92, 96]
    assert store.image_offsets([], 3).tolist() == [0]


@pytest.mark.parametrize(
    ("channels", "factor", "dtype"), [(3, 1, np.uint8), (3, 2, np.uint8), (4, 1, np.float16)]
)
def test_written_file_is_the_images_raveled_one_after_another(channels, factor, dtype, tmp_path):
    images = _images(SIZES, channels, factor, dtype)
    written = store.create(tmp_path / "a.npy", SIZES, channels, factor, dtype)
    for i in (2, 0, 1):  # any order: each image has its own place
        written.write(i, images[i])
    written.close()
    flat = np.load(tmp_path / "a.npy")
    assert flat.dtype == dtype and flat.ndim == 1
    np.testing.assert_array_equal(flat, np.concatenate([a.ravel() for a in images]))

    read = store.open_images(tmp_path / "a.npy", SIZES, factor)  # channels from the length
    assert read.channels == channels and len(read) == len(SIZES) and read.dtype == dtype
    for i, img in enumerate(images):
        view = read.view(i)
        np.testing.assert_array_equal(view, img)
        assert type(view) is np.ndarray and not view.flags.writeable  # a view of the read-only map


def test_write_refuses_an_image_of_another_size(tmp_path):
    written = store.create(tmp_path / "a.npy", SIZES)
    with pytest.raises(ValueError, match="image 1"):
        written.write(1, np.zeros((2, 4, 3), np.uint8))


def test_a_length_that_does_not_fit_the_sizes_is_refused():
    with pytest.raises(UserError, match="train images: lr holds 44 values"):
        store.open_images(np.zeros(44, np.uint8), SIZES, what="train images: lr")
    with pytest.raises(UserError, match="not a whole number of channels"):
        store.open_images(np.zeros(0, np.uint8), [])
