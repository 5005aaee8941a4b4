"""Tests of jaxcl/losses/alignment_uniformity.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.losses.alignment_uniformity import alignment, uniformity
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference


SHAPES = [(2, 3), (5, 4), (8, 16)]


def check(jax_loss, np_loss, args, **tolerances):
  """Value and finite-difference gradients of the jitted loss (one compile instead of eager ops)."""
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


# ---------------------------------------------------------------------------- alignment / uniformity
@pytest.mark.parametrize(
    "b,d,alpha,normalize",
    [(1, 3, 2, True), (5, 4, 1.0, True), (8, 16, 3.0, True), (2, 3, 1.0, False), (8, 16, 2, False),
     (5, 4, 0.5, False)],
)
def test_alignment_matches_reference(b, d, alpha, normalize):
  check(
      functools.partial(alignment, alpha=alpha, normalize=normalize),
      functools.partial(reference.alignment_uniformity.alignment, alpha=alpha, normalize_=normalize),
      [randn(13, b, d), randn(14, b, d)],
  )


@pytest.mark.parametrize("b,d,t", [(2, 3, 1.0), (5, 4, 2), (8, 16, 0.5)])
@pytest.mark.parametrize("impl", ops.available_impls())
def test_uniformity_matches_reference(b, d, t, impl):
  check(
      functools.partial(uniformity, t=t, impl=impl),
      functools.partial(reference.alignment_uniformity.uniformity, t=t),
      [randn(15, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_uniformity_unnormalized_matches_reference(b, d):
  x = 0.3 * randn(16, b, d)
  check(
      functools.partial(uniformity, t=1.5, normalize=False),
      functools.partial(reference.alignment_uniformity.uniformity, t=1.5, normalize_=False),
      [x],
  )


def test_uniformity_logsumexp_form_equals_explicit_distances():
  # The engine path (2 − 2<x_i, x_j>) and the explicit-distance path agree on unit vectors.
  x = np.asarray(reference.common.normalize(randn(17, 12, 6)), np.float32)
  via_engine = jax.jit(jax.value_and_grad(lambda x, t: uniformity(x, t=t)))
  explicit = jax.jit(jax.value_and_grad(lambda x, t: uniformity(x, t=t, normalize=False)))
  for t in (0.5, 2.0, 8.0):
    a, b = via_engine(x, t), explicit(x, t)
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5)
    # The gradients differ by a radial component only (the normalisation removes it): compare tangents.
    tangent = lambda g: np.asarray(g) - np.sum(np.asarray(g) * x, 1, keepdims=True) * x
    np.testing.assert_allclose(tangent(a[1]), tangent(b[1]), rtol=1e-4, atol=1e-6)


def test_uniformity_bounds():
  # All embeddings equal: every distance is 0, the potential is 1 and the loss 0 (the maximum).
  np.testing.assert_allclose(float(jax.jit(uniformity)(np.ones((5, 3), np.float32))), 0.0, atol=1e-6)
  # Antipodal pair: squared distance 4, the minimum −4t.
  antipodal = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
  np.testing.assert_allclose(float(jax.jit(uniformity)(antipodal, t=3.0)), -12.0, rtol=1e-6)


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])


ALL_LOSSES = {
    "alignment": (alignment, 2),
    "alignment_alpha1": (functools.partial(alignment, alpha=1), 2),
    "uniformity": (uniformity, 1),
    "uniformity_raw": (functools.partial(uniformity, normalize=False), 1),
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
        (lambda: alignment(ONES, np.ones((3, 3))), r"`x` and `y` must have the same shape"),
        (lambda: alignment(ONES, ONES, alpha=0), r"`alpha` must be positive and finite, got 0"),
        (lambda: alignment(ONES, ONES, alpha=-2.0), r"`alpha` must be positive"),
        (lambda: uniformity(ONES, t=0.0), r"`t` must be positive and finite, got 0.0"),
        (lambda: uniformity(np.ones((1, 3))), r"`x` needs at least 2 examples .*pairs"),
        (lambda: uniformity(np.ones(3)), r"`x` must have rank 2"),
        (lambda: uniformity(ONES, impl="nope"), r"`impl` must be one of"),
        (lambda: uniformity(ONES, normalize=False, impl="nope"), r"`impl` must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)


MASKED = {
    "alignment": (alignment, [randn(104, 6, 4), randn(105, 6, 4)], 2, True),
    "alignment_alpha1": (functools.partial(alignment, alpha=1), [randn(104, 6, 4), randn(105, 6, 4)], 2, True),
    "uniformity": (uniformity, [randn(108, 6, 4)], 1, False),
    "uniformity_raw": (functools.partial(uniformity, normalize=False), [randn(108, 6, 4)], 1, False),
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


@pytest.mark.parametrize("impl, n_devices, normalize, masked",
                         [("ring", 3, True, False), ("allgather", 8, True, True), ("ring", 3, False, True)])
def test_uniformity_sharded_equals_dense(impl, n_devices, normalize, masked):
  """The batch split over 3 or 8 devices (a padded batch; the explicit distances of normalize=False
  against the gathered rows): the value and gradients of the one-device loss."""
  mask = np.arange(24) % 5 != 2
  loss = lambda x, m, **kw: uniformity(x, t=1.5, normalize=normalize, mask=m if masked else None, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(loss, [randn(70, 24, 4), mask], impl=impl, n_devices=n_devices)
