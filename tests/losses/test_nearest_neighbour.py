"""jaxcl/losses/nearest_neighbour.py: NNCLR against its float64 reference, InfoNCE and the engines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl import ops
from tests.helpers import assert_padded_equals_unpadded, assert_reductions_agree, assert_value_and_grads, randn
from tests.losses.reference import nearest_neighbour as ref
from tests.losses.reference import common


def _inputs(b=6, q=10, d=5, seed=0):
  return randn(seed, b, d), randn(seed + 1, b, d), randn(seed + 2, q, d)


@pytest.mark.parametrize("temperature,normalize", [(0.1, True), (0.5, True), (1.0, False)])
def test_value_and_gradient_in_p_equal_the_float64_reference(temperature, normalize):
  z, p, support = _inputs()
  if not normalize:
    z, p, support = 0.3 * z, 0.3 * p, 0.3 * support
  assert_value_and_grads(
      lambda p: losses.nnclr(z, p, support, temperature=temperature, normalize=normalize),
      lambda p: ref.nnclr(z, p, support, temperature, normalize), [p], rtol=1e-5)


def test_no_gradient_reaches_the_view_or_the_support_set():
  z, p, support = _inputs()
  gz, gs = jax.grad(lambda z, s: losses.nnclr(z, p, s), argnums=(0, 1))(jnp.asarray(z), jnp.asarray(support))
  assert not np.any(np.asarray(gz)) and not np.any(np.asarray(gs))


def test_is_infonce_with_the_nearest_support_rows_as_queries():
  z, p, support = _inputs(b=8, q=12, seed=3)
  index, _ = ref.nearest(common.normalize(z), common.normalize(support))
  np.testing.assert_allclose(float(losses.nnclr(z, p, support, temperature=0.2)),
                             float(losses.infonce(support[index], p, temperature=0.2)), rtol=1e-6)


def test_a_support_set_holding_the_views_is_infonce_of_the_views():
  """With the batch's own views as the support set every view is its own nearest neighbour."""
  z, p, _ = _inputs(b=7, seed=5)
  np.testing.assert_allclose(float(losses.nnclr(z, p, z)), float(losses.infonce(z, p)), rtol=1e-6)


def test_every_engine_agrees_and_a_support_set_beyond_the_dense_size_is_searched_by_tiles(monkeypatch):
  z, p, support = _inputs(b=16, q=300, d=8, seed=7)
  want = ref.nnclr(z, p, support, 0.1)
  for impl in ("auto", "dense", "blockwise", "pallas"):
    np.testing.assert_allclose(float(losses.nnclr(z, p, support, impl=impl)), want, rtol=1e-5, err_msg=impl)
  monkeypatch.setattr(ops.engines, "DENSE_MAX_ELEMENTS", 16)  # "auto" searches column tiles
  np.testing.assert_allclose(float(losses.nnclr(z, p, support)), want, rtol=1e-5)


def test_padding_rows_with_a_mask_change_nothing_and_reductions_agree():
  z, p, support = _inputs(b=6, q=9, seed=11)
  loss = lambda p, z, mask=None, **kw: losses.nnclr(z, p, support, mask=mask, **kw)
  assert_padded_equals_unpadded(loss, [p, z], n_diff=1)
  assert_reductions_agree(lambda p, z, **kw: losses.nnclr(z, p, support, **kw), [p, z], 6)


def test_bf16_inputs_stay_close_to_float32():
  z, p, support = _inputs(b=8, q=16, seed=13)
  want = float(losses.nnclr(z, p, support))
  got = losses.nnclr(*(jnp.asarray(x, jnp.bfloat16) for x in (z, p, support)))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=3e-2)


def test_over_a_mesh_equals_one_device():
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  z, p, support = _inputs(b=16, q=24, seed=17)
  want, want_g = jax.value_and_grad(lambda p: losses.nnclr(z, p, support, impl="dense"))(jnp.asarray(p))
  for impl in ("allgather", "ring"):
    got, got_g = jax.jit(jax.value_and_grad(lambda p: losses.nnclr(z, p, support, impl=impl, mesh=mesh)))(
        jnp.asarray(p))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-7, err_msg=impl)


@pytest.mark.parametrize("support,match", [
    (np.ones((4, 3), np.float32), r"`support` must have shape \(Q, 5\)"),
    (np.ones((0, 5), np.float32), r"`support` must have shape \(Q, 5\) with Q >= 1"),
    (np.ones((4,), np.float32), "support"),
])
def test_bad_support_sets_are_named(support, match):
  z, p, _ = _inputs()
  with pytest.raises(ValueError, match=match):
    losses.nnclr(z, p, support)


def test_bad_views_are_named():
  z, p, support = _inputs()
  with pytest.raises(ValueError, match="z"):
    losses.nnclr(z[:, :4], p, support)
  with pytest.raises(ValueError, match="`z` needs at least 2"):
    losses.nnclr(z[:1], p[:1], support)
