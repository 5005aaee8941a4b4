"""jaxcl/losses/prototypes.py: Sinkhorn-Knopp codes and SwAV against the float64 references of the
authors' loops, over a mesh, with a queue and with padding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcl import losses
from tests.helpers import assert_padded_equals_unpadded, assert_reductions_agree, assert_value_and_grads, randn
from tests.losses.reference import prototypes as ref


def _scores(seed, *shape):
  """Cosine-like scores in [-1, 1]."""
  return np.tanh(randn(seed, *shape))


@pytest.mark.parametrize("epsilon,iterations", [(0.05, 3), (0.5, 0), (0.1, 1), (0.02, 10)])
def test_sinkhorn_knopp_equals_the_authors_loop(epsilon, iterations):
  s = _scores(0, 12, 5)
  np.testing.assert_allclose(np.asarray(losses.sinkhorn_knopp(s, epsilon=epsilon, iterations=iterations)),
                             ref.sinkhorn_knopp(s, epsilon, iterations), rtol=2e-5, atol=1e-6)


def test_sinkhorn_knopp_small_epsilon_neither_overflows_nor_underflows():
  """exp(S / ε) overflows float32 for ε = 0.005 (exp(200)); the log domain gives the float64 codes."""
  s = _scores(1, 8, 4)
  codes = np.asarray(losses.sinkhorn_knopp(s, epsilon=0.005, iterations=3))
  assert np.all(np.isfinite(codes))
  np.testing.assert_allclose(codes.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(codes, ref.sinkhorn_knopp(s, 0.005, 3), atol=1e-5)


def test_sinkhorn_knopp_converges_to_an_equipartition():
  s = _scores(2, 16, 4)
  codes = np.asarray(losses.sinkhorn_knopp(s, epsilon=0.3, iterations=200))
  np.testing.assert_allclose(codes.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(codes.sum(0), 16 / 4, rtol=1e-4)


def test_sinkhorn_knopp_has_no_gradient():
  g = jax.grad(lambda s: jnp.sum(losses.sinkhorn_knopp(s) * jnp.arange(3.0)))(jnp.asarray(_scores(3, 5, 3)))
  assert not np.any(np.asarray(g))


def test_sinkhorn_knopp_padding_rows_take_no_part():
  s = _scores(4, 7, 3)
  padded = np.concatenate([s[:3], 50.0 * np.ones((2, 3), np.float32), s[3:]])
  mask = np.array([True] * 3 + [False] * 2 + [True] * 4)
  codes = np.asarray(losses.sinkhorn_knopp(padded, mask=mask))
  np.testing.assert_allclose(codes[mask], np.asarray(losses.sinkhorn_knopp(s)), rtol=1e-5, atol=1e-7)
  assert np.all(codes[~mask] == 0)


def test_sinkhorn_knopp_over_a_mesh_equipartitions_the_global_batch():
  """Inside shard_map with `axis_name` and on batch-sharded arrays under jit (XLA's all-reduces): the
  codes of the whole 16-row batch, not of each device's 2 rows."""
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  s = _scores(5, 16, 4)
  want = ref.sinkhorn_knopp(s, 0.1, 3)
  sharded = jax.device_put(s, NamedSharding(mesh, P("data")))
  inside = jax.jit(jax.shard_map(functools.partial(losses.sinkhorn_knopp, epsilon=0.1, axis_name="data"),
                                 mesh=mesh, in_specs=P("data"), out_specs=P("data")))(sharded)
  np.testing.assert_allclose(np.asarray(inside), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(functools.partial(losses.sinkhorn_knopp, epsilon=0.1))(sharded)),
                             want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("views,assign", [(2, (0, 1)), (4, (0, 1)), (3, (2,))])
def test_swav_value_and_gradient_equal_the_authors_loss(views, assign):
  s0 = _scores(6, 6, views, 5)
  assert_value_and_grads(
      lambda s: losses.swav(s, temperature=0.1, assign_views=assign),
      lambda s: ref.swav(s, 0.1, 0.05, 3, assign, codes_of=s0), [s0], rtol=1e-5)


def test_swav_is_the_cross_entropy_of_each_view_against_the_other_views_codes():
  """Two views: ½ (CE(softmax(s_1/τ), q_0) + CE(softmax(s_0/τ), q_1)), with optax's cross-entropy."""
  s = jnp.asarray(_scores(7, 8, 2, 6))
  q0, q1 = losses.sinkhorn_knopp(s[:, 0]), losses.sinkhorn_knopp(s[:, 1])
  want = 0.5 * (optax.softmax_cross_entropy(s[:, 1] / 0.2, q0).mean()
                + optax.softmax_cross_entropy(s[:, 0] / 0.2, q1).mean())
  np.testing.assert_allclose(float(losses.swav(s, temperature=0.2)), float(want), rtol=1e-6)


def test_swav_with_a_queue_takes_the_codes_of_queue_and_batch_together():
  s, queue = _scores(8, 6, 3, 4), _scores(9, 10, 2, 4)
  assert_value_and_grads(
      lambda s: losses.swav(s, queue_scores=queue),
      lambda x: ref.swav(x, 0.1, 0.05, 3, (0, 1), codes_of=s, queue_scores=queue), [s], rtol=1e-5)
  assert abs(float(losses.swav(s, queue_scores=queue)) - float(losses.swav(s))) > 1e-4  # the queue counts


def test_swav_padding_and_reductions():
  s = _scores(10, 6, 2, 4)
  assert_padded_equals_unpadded(lambda s, mask=None: losses.swav(s, mask=mask), [s], rtol=2e-6)
  assert_reductions_agree(losses.swav, [s], 6)


def test_swav_over_a_mesh_equals_one_device():
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  s = jnp.asarray(_scores(11, 16, 2, 4))
  want, want_g = jax.value_and_grad(losses.swav)(s)
  sharded = jax.device_put(s, NamedSharding(mesh, P("data")))
  inside = jax.shard_map(lambda s: losses.swav(s, axis_name="data"), mesh=mesh, in_specs=P("data"), out_specs=P())
  got, got_g = jax.jit(jax.value_and_grad(inside))(sharded)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(jax.jit(losses.swav)(sharded)), float(want), rtol=1e-5)


def test_swav_bf16_scores_stay_close_to_float32():
  s = _scores(12, 8, 2, 6)
  got = losses.swav(jnp.asarray(s, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(losses.swav(s)), rtol=3e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"assign_views": (0, 0)}, "`assign_views` must be distinct view indices in \\[0, 2\\)"),
    ({"assign_views": (2,)}, "`assign_views`"),
    ({"queue_scores": np.zeros((4, 1, 3), np.float32)}, r"`queue_scores` must have shape \(Q, 2, 3\)"),
    ({"epsilon": 0.0}, "`epsilon` must be positive"),
    ({"iterations": -1}, "`iterations` must be an int >= 0"),
    ({"temperature": -1.0}, "temperature"),
])
def test_swav_errors_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.swav(np.zeros((4, 2, 3), np.float32), **kwargs)


def test_swav_needs_two_views():
  with pytest.raises(ValueError, match="V >= 2 views"):
    losses.swav(np.zeros((4, 1, 3), np.float32))
