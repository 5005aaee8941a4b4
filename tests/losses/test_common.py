"""Tests of jaxcl/losses/_common.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.losses import _common
from tests.helpers import device_mesh


# ------------------------------------------------------------------------------------ l2_normalize
def _l2_normalize_reference(x, t, eps=1e-6):
  """float64: y = x / max(‖x‖, eps) and the gradient of Σ y·t, (t − y (y·t)) / ‖x‖ or t / eps."""
  x = np.asarray(x, np.float64)
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  y = x / np.maximum(n, eps)
  g = np.where(n >= eps, (t - y * np.sum(y * t, -1, keepdims=True)) / np.maximum(n, eps), t / eps)
  return y, g


# float32's largest and smallest normal magnitudes, and across: rows of norm below eps are x / eps
L2_MAGNITUDES = [3.4e38, 1e38, 3e37, 1e30, 1e10, 1.0, 1e-5, 1e-6, 3e-7, 1e-20, 2e-38, 1.2e-38]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_l2_normalize_matches_float64_across_magnitudes(dtype):
  """Rows with max |x| of 3e37 gave zeros and 1e38 NaN (1/m underflows); now every magnitude up to
  float32's maximum has norm 1 and the right direction, and tiny rows are x / eps, gradients too."""
  rng = np.random.default_rng(80)
  d = rng.standard_normal((len(L2_MAGNITUDES), 7))
  d /= np.abs(d).max(axis=1, keepdims=True)
  t = rng.standard_normal(d.shape)
  magnitudes = np.minimum(np.array(L2_MAGNITUDES), float(jnp.finfo(dtype).max))
  x = jnp.asarray(d * magnitudes[:, None], dtype)
  y = losses.l2_normalize(x)
  g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x).astype(jnp.float32) * t))(x)
  assert y.dtype == dtype and g.dtype == dtype
  want_y, want_g = _l2_normalize_reference(np.asarray(x, np.float32), t)
  tol = 3e-7 if dtype == jnp.float32 else 8e-3
  y, g = np.asarray(y, np.float64), np.asarray(g, np.float64)
  # atol: entries below float32's smallest normal number (in the rows near 1e-38) are flushed to 0 by
  # XLA; their true value x / eps is below tiny / eps = 1.2e-32
  np.testing.assert_allclose(y, want_y, rtol=tol, atol=float(np.finfo(np.float32).tiny) / 1e-6)
  unit = magnitudes >= 1e-6
  np.testing.assert_allclose(np.linalg.norm(y[unit], axis=1), 1.0, rtol=4 * tol)
  # per row, relative to the row's largest gradient; gradients below float32's smallest normal number
  # (rows beyond 1e37, whose true gradient is ~1/‖x‖) are flushed to 0
  row_scale = np.abs(want_g).max(axis=1, keepdims=True)
  assert np.all(np.abs(g - want_g) <= 4 * tol * row_scale + 1e-37), np.abs(g - want_g).max(axis=1)


def test_l2_normalize_zero_subnormal_and_empty_rows():
  """A zero row stays zero with gradient t / eps (the function is x / eps near 0); rows of subnormal
  numbers are zeros on XLA (it flushes subnormals) with the same finite gradient; empty rows stay empty."""
  t = np.array([[1.0, -2.0, 3.0]] * 3)
  x = jnp.asarray(np.array([[0.0, 0.0, 0.0], [1e-40, -3e-41, 0.0], [1e-45, 0.0, 1e-45]], np.float32))
  y = losses.l2_normalize(x)
  g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x) * t))(x)
  assert np.all(np.abs(np.asarray(y)) <= 1e-33)  # x / eps, or 0 where subnormals are flushed
  np.testing.assert_allclose(np.asarray(g), t / 1e-6, rtol=1e-6)
  assert losses.l2_normalize(jnp.zeros((3, 0))).shape == (3, 0)


def _l2_normalize_gradient(x, t, **kwargs):
  return jax.grad(lambda x: jnp.sum(losses.l2_normalize(x, **kwargs).astype(jnp.float32) * t))(x)


def test_l2_normalize_under_jit_vmap_and_another_axis():
  """Values and gradients under jit, under vmap (a leading batch of matrices) and along axis 0."""
  rng = np.random.default_rng(81)
  x = rng.standard_normal((2, 5, 7)).astype(np.float32) * np.array([1e-8, 3.0])[:, None, None]
  t = rng.standard_normal((2, 5, 7))
  want_y, want_g = _l2_normalize_reference(x, t)
  y = jax.jit(jax.vmap(losses.l2_normalize))(jnp.asarray(x))
  g = jax.jit(jax.vmap(_l2_normalize_gradient))(jnp.asarray(x), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-5 * np.abs(want_g).max())
  xt, tt = jnp.asarray(x[1].T), jnp.asarray(t[1].T, jnp.float32)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(xt, axis=0)), want_y[1].T, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(_l2_normalize_gradient(xt, tt, axis=0)), want_g[1].T, rtol=1e-5,
                             atol=1e-6)


def test_l2_normalize_second_derivative_matches_float64_differences():
  """grad of grad: the Hessian-vector product of Σ y·t against central differences of the float64
  gradient (0 for a zero row, where the function is x / eps)."""
  rng = np.random.default_rng(82)
  x = rng.standard_normal((4, 6)) * np.array([[0.5], [1.0], [40.0], [0.0]])
  t, v = rng.standard_normal((2, 4, 6))
  h = 1e-7
  want = (_l2_normalize_reference(x + h * v, t)[1] - _l2_normalize_reference(x - h * v, t)[1]) / (2 * h)
  x32, t32, v32 = (jnp.asarray(a, jnp.float32) for a in (x, t, v))
  got = jax.grad(lambda x: jnp.sum(_l2_normalize_gradient(x, t32) * v32))(x32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert np.all(np.asarray(got)[3] == 0)


def test_l2_normalize_inside_shard_map():
  """Rows split over 2 devices inside `jax.shard_map` (check_vma on): values and gradients as on one."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  rng = np.random.default_rng(83)
  x = rng.standard_normal((6, 5)) * np.array([[1.0], [1e-9], [0.0], [1e30], [2.0], [1e-3]])
  t = rng.standard_normal((6, 5))
  want_y, want_g = _l2_normalize_reference(np.asarray(x, np.float32), t)
  spec = jax.sharding.PartitionSpec("data")

  def loss(x, t):
    local = lambda x, t: jax.lax.psum(jnp.sum(losses.l2_normalize(x) * t), "data")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec(),
                         check_vma=True)(x, t)

  x32, t32 = jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)
  value, g = jax.jit(jax.value_and_grad(loss))(x32, t32)
  np.testing.assert_allclose(float(value), np.sum(want_y * t), rtol=1e-5)
  scale = np.abs(want_g).max(axis=1, keepdims=True)
  assert np.all(np.abs(np.asarray(g) - want_g) <= 1e-5 * scale), np.abs(np.asarray(g) - want_g).max(axis=1)


# ------------------------------------------------------------------------------------------ shardable
@_common.shardable("xs", "views", "weight", batch_axis={"views": 1})
def _toy_loss(*xs, views, weight, impl="auto", axis_name=None):
  """Σ_k Σ_i id_i Σ_d xs[k][i, d] + Σ_i id_i Σ_{v,d} views[v, i, d], each row by its global id, times
  the per-row `weight` (a scalar or (B,))."""
  ids = _common.batch_ids(views.shape[1], axis_name).astype(jnp.float32)
  w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), ids.shape)
  per_row = sum(jnp.sum(x, axis=1) for x in xs) + jnp.sum(views, axis=(0, 2))
  return _common.batch_sum(w * ids * per_row, axis_name)


def test_shardable_splits_star_args_and_a_non_leading_batch_axis():
  """`*args` arrays are each split along the batch, `batch_axis` splits views along axis 1, a scalar
  batch argument is replicated and a (B,) one split: the same value as on one device, through
  shard_map; a views batch that does not split names its axis."""
  mesh = device_mesh(2)
  rng = np.random.default_rng(5)
  xs = [jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) for _ in range(2)]
  views = jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)
  for weight in (jnp.float32(2.0), jnp.arange(6, dtype=jnp.float32)):
    want = _toy_loss(*xs, views=views, weight=weight)
    sharded = lambda *xs: _toy_loss(*xs, views=views, weight=weight, impl="ring", mesh=mesh)  # noqa: E731
    assert "shard_map" in str(jax.make_jaxpr(sharded)(*xs))
    np.testing.assert_allclose(float(sharded(*xs)), float(want), rtol=1e-6)
  with pytest.raises(ValueError, match=r"`views` of shape \(2, 5, 3\).*batch \(axis 1\) size must be a multiple of 2"):
    _toy_loss(*xs, views=views[:, :5], weight=1.0, impl="ring", mesh=mesh)


def test_auto_batch_axes_reads_the_batch_axis_it_is_given():
  """A (V, B, D) stack of views split along B over an Explicit mesh: `batch_axes=(1,)` finds the split
  axis; read as a leading batch axis (V = 3, not split), it is not sharded."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  mesh = device_mesh(4, jax.sharding.AxisType.Explicit)
  views = jax.device_put(np.zeros((3, 8, 2), np.float32), NamedSharding(mesh, P(None, "data")))
  mask = np.ones((8,), bool)
  with jax.set_mesh(mesh):
    assert _common.auto_batch_axes(views, mask, batch_axes=(1,)) == ("data",)
    assert _common.auto_batch_axes(views, mask) is None
    assert _common.auto_batch_axes(views, np.ones((6,), bool), batch_axes=(1,)) is None  # 6 % 4 != 0
