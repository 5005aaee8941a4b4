"""jaxcl.data.images: resizing to a square (its float conversion is a doctest)."""

import numpy as np

from jaxcl.data import images


def test_resize_square():
  x = np.random.default_rng(0).random((6, 4, 2)).astype(np.float32)
  y = images.resize_square(x, 4)
  assert y.shape == (4, 4, 2)
  np.testing.assert_allclose(y, x[1:5], atol=1e-6)  # shorter side already 4: the central square
  assert images.resize_square(x, 0) is x
  constant = np.full((5, 7, 1), 0.3, np.float32)
  np.testing.assert_allclose(images.resize_square(constant, 3), 0.3, atol=1e-6)
