"""Tests of jaxcl/losses/predictive.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.predictive import negative_cosine
from tests.helpers import randn
from tests.losses import reference


SHAPES = [(2, 3), (5, 4), (8, 16)]


# ----------------------------------------------------------------------------------- negative cosine
@pytest.mark.parametrize("b,d", [(1, 3)] + SHAPES)
def test_negative_cosine_matches_reference_and_stops_the_target_gradient(b, d):
  p, z = randn(18, b, d), randn(19, b, d)
  value, (g_p, g_z) = jax.jit(jax.value_and_grad(negative_cosine, argnums=(0, 1)))(p, z)
  np.testing.assert_allclose(float(value), reference.predictive.negative_cosine(p, z), rtol=2e-5)
  want = reference.common.numerical_grad(lambda x: reference.predictive.negative_cosine(x, z), p)
  np.testing.assert_allclose(np.asarray(g_p), want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(g_z) == 0)
  # Without the stop-gradient the reference has a gradient in z: the test above can fail.
  assert np.max(np.abs(reference.common.numerical_grad(lambda x: reference.predictive.negative_cosine(p, x), z))) > 1e-3


def test_negative_cosine_is_scale_invariant_and_bounded():
  p, z = randn(20, 6, 5), randn(21, 6, 5)
  scaled = negative_cosine(7.0 * p, 0.1 * z)
  np.testing.assert_allclose(float(scaled), float(negative_cosine(p, z)), rtol=1e-5)
  np.testing.assert_allclose(float(negative_cosine(p, 3.0 * p)), -1.0, rtol=1e-6)
  np.testing.assert_allclose(float(negative_cosine(p, -p)), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])


ALL_LOSSES = {
    "negative_cosine": (negative_cosine, 2),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_jit_grad_vmap(name):
  fn, n = ALL_LOSSES[name]
  xs = [randn(50 + i, 3, 6, 16) for i in range(n)]
  one = jax.jit(fn)
  eager = np.array([float(one(*[x[i] for x in xs])) for i in range(3)])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(*xs)), eager, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(n))))(*[x[0] for x in xs])
  assert all(g.shape == (6, 16) and np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_inputs_close_to_fp32(name):
  fn, n = ALL_LOSSES[name]
  base = randn(60, 16, 32)
  xs = [base + 0.8 * randn(61 + i, 16, 32) for i in range(n)]  # related views: mid-range values
  lo = jax.jit(fn)(*[jnp.asarray(x, jnp.bfloat16) for x in xs])
  hi = jax.jit(fn)(*[jnp.asarray(x) for x in xs])
  assert lo.dtype == jnp.float32 and lo.shape == ()
  np.testing.assert_allclose(float(lo), float(hi), rtol=3e-2, atol=1e-2)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(n))))(*[jnp.asarray(x, jnp.bfloat16) for x in xs])
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_extremes_are_finite(name):
  fn, n = ALL_LOSSES[name]
  a = randn(70, 8, 16)
  cases = [(a, a, a), (a * 1e-12, a, -a), (np.zeros_like(a), a, a), (a * 1e6, -a, a), (np.zeros_like(a),) * 3]
  value_and_grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n))))
  for case in cases:
    value, grads = value_and_grads(*[jnp.asarray(x) for x in case[:n]])
    assert np.isfinite(float(value)), name
    assert all(np.all(np.isfinite(g)) for g in grads), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = np.ones((4, 3), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: negative_cosine(ONES, np.ones((4, 2))), r"`p` and `z` must have the same shape"),
        (lambda: negative_cosine(ONES, np.ones((4, 3, 1))), r"`z` must have rank 2"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)


MASKED = {
    "negative_cosine": (negative_cosine, [randn(106, 6, 4), randn(107, 6, 4)], 1, True),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_padded_batch_with_mask_equals_unpadded_batch(name):
  from tests.helpers import assert_padded_equals_unpadded  # noqa: PLC0415

  loss, arrays, n_diff, _ = MASKED[name]
  assert_padded_equals_unpadded(loss, arrays, n_diff=n_diff, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(MASKED))
def test_reduction_none_and_sum_or_mean_only(name):
  from tests.helpers import assert_reductions_agree  # noqa: PLC0415

  loss, arrays, _, per_sample = MASKED[name]
  if not per_sample:
    with pytest.raises(ValueError, match=r"`reduction` must be 'mean' for this loss"):
      loss(*arrays, reduction="none")
    return
  mask = np.array([1, 1, 0, 1, 1, 1], bool)
  if name == "batch_hard_triplet":  # every anchor (of the kept ones) has a positive and a negative
    arrays = [arrays[0], np.array([0, 1, 0, 1, 0, 1], np.int32)]
  assert_reductions_agree(loss, arrays, 2 * 6 if name.startswith("matryoshka") else 6)
  assert_reductions_agree(loss, arrays, 2 * 6 if name.startswith("matryoshka") else 6, mask=mask)
