"""Tests of jaxcl/losses/_tiled.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses import _tiled
from tests.helpers import randn
from tests.losses import reference


# ------------------------------------------------------------------------------ tiled row reductions
@pytest.mark.parametrize("tile", [1, 3, 4, 50])
def test_tiled_row_logsumexp_matches_dense_with_an_empty_row(tile):
  q, k = randn(20, 4, 3), randn(21, 7, 3)
  banned = jnp.array([[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1, 1], [2, 5, 5, 5, 5, 5, 5], [6, 0, 0, 0, 0, 0, 0]])

  def valid(col_ids):
    return jnp.all(banned[:, :, None] != col_ids[None, None, :], axis=1)

  def run(dense):
    def f(a, b):
      lse = _tiled.row_logsumexp(a, b, 3.0, valid, dense=dense, tile=tile)
      return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), lse
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(q, k)

  (v_d, lse_d), g_d = run(True)
  (v_t, lse_t), g_t = run(False)
  assert np.isneginf(lse_t[0]) and np.isneginf(lse_d[0])  # row 0 bans every column
  s = 3.0 * q.astype(np.float64) @ k.T.astype(np.float64)
  np.testing.assert_allclose(lse_t[1], reference.common.logsumexp(np.delete(s[1], 1)), rtol=1e-5)
  np.testing.assert_allclose(float(v_t), float(v_d), rtol=1e-5)
  for a, b in zip(g_t, g_d):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
