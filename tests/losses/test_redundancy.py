"""Tests of jaxcl/losses/redundancy.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.redundancy import barlow_twins, vicreg
from jaxcl.losses.triplet import batch_hard_triplet
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference


def check(jax_loss, np_loss, args, **tolerances):
  """Value and finite-difference gradients of the jitted loss (one compile instead of eager ops)."""
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


# ------------------------------------------------------------------------------ Barlow Twins / VICReg
@pytest.mark.parametrize("n,d", [(3, 3), (6, 5), (8, 8)])
@pytest.mark.parametrize("lambda_", [5e-3, 0.5])
def test_barlow_twins_matches_reference(n, d, lambda_):
  z1 = randn(22, n, d)
  z2 = 0.7 * z1 + randn(23, n, d)  # correlated views: C has a non-trivial diagonal
  check(
      functools.partial(barlow_twins, lambda_=lambda_),
      functools.partial(reference.redundancy.barlow_twins, lambda_=lambda_),
      [z1, z2],
      rtol=5e-5,
  )


def test_barlow_twins_two_examples():
  # With N = 2 each standardised feature is ±1/√(1 + eps/var) whatever the input: the gradient is
  # O(eps) and too small for finite differences, so only the value is compared.
  z1, z2 = randn(45, 2, 4), randn(46, 2, 4)
  np.testing.assert_allclose(float(barlow_twins(z1, z2)), reference.redundancy.barlow_twins(z1, z2), rtol=1e-5)


def test_barlow_twins_is_invariant_to_per_feature_affine_maps():
  z1, z2 = randn(24, 16, 6), randn(25, 16, 6)
  scale, shift = np.abs(randn(26, 6)) + 0.5, randn(27, 6)
  np.testing.assert_allclose(
      float(barlow_twins(z1 * scale + shift, z2)), float(barlow_twins(z1, z2)), rtol=1e-4
  )


def test_barlow_twins_identical_views_leave_only_the_redundancy_term():
  z = randn(28, 32, 4)
  c = np.corrcoef(z.astype(np.float64).T)  # Pearson correlations = C for z1 = z2 (up to eps)
  want = 5e-3 * np.sum(c[~np.eye(4, dtype=bool)] ** 2)
  np.testing.assert_allclose(float(barlow_twins(z, z)), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("n,d", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("spread", [0.3, 1.5])  # 0.3: the variance hinge is active
def test_vicreg_matches_reference(n, d, spread):
  z1 = spread * randn(29, n, d)
  z2 = z1 + 0.5 * spread * randn(30, n, d)
  check(vicreg, reference.redundancy.vicreg, [z1, z2], rtol=5e-5)


def test_vicreg_coefficients_and_terms():
  z1, z2 = 0.3 * randn(31, 10, 6), 0.3 * randn(32, 10, 6)
  sim = float(vicreg(z1, z2, sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0))
  np.testing.assert_allclose(sim, np.mean((z1.astype(np.float64) - z2) ** 2), rtol=1e-5)
  std = float(vicreg(z1, z2, sim_coeff=0.0, std_coeff=1.0, cov_coeff=0.0))
  assert std > 0.5  # every feature has std ≈ 0.3 < 1
  cov = float(vicreg(z1, z2, sim_coeff=0.0, std_coeff=0.0, cov_coeff=1.0))
  total = float(vicreg(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0))
  np.testing.assert_allclose(total, 2 * sim + 3 * std + 4 * cov, rtol=1e-5)
  # Decorrelated, unit-variance, identical views: only the sqrt(var + eps) > 1 slack remains, 0.
  # QR of centred columns: orthonormal columns with zero mean; × 3 gives unbiased variance 9 / 9 = 1.
  centred = randn(33, 10, 4).astype(np.float64)
  q = (np.linalg.qr(centred - centred.mean(0))[0] * 3.0).astype(np.float32)
  assert float(vicreg(q, q)) < 1e-3


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])


ALL_LOSSES = {
    "barlow_twins": (barlow_twins, 2),
    "vicreg": (vicreg, 2),
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
        (lambda: barlow_twins(ONES, np.ones((5, 3))), r"`z1` and `z2` must have the same shape"),
        (lambda: barlow_twins(np.ones((1, 3)), np.ones((1, 3))), r"`z1` needs at least 2 examples"),
        (lambda: barlow_twins(ONES, ONES, lambda_=-1.0), r"`lambda_` must be >= 0"),
        (lambda: barlow_twins(ONES, ONES, eps=0.0), r"`eps` must be positive"),
        (lambda: vicreg(np.ones((1, 3)), np.ones((1, 3))), r"`z1` needs at least 2 examples"),
        (lambda: vicreg(ONES, np.ones(3)), r"`z2` must have rank 2"),
        (lambda: vicreg(ONES, ONES, std_coeff=-1.0), r"`std_coeff` must be >= 0"),
        (lambda: vicreg(ONES, ONES, eps=-1e-4), r"`eps` must be positive"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="same shape"):
    jax.jit(vicreg)(jnp.ones((4, 3)), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="`labels` must have shape"):
    jax.jit(batch_hard_triplet)(jnp.ones((4, 3)), jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="`dims` asks for 8"):
    jax.jit(matryoshka(nt_xent, (8,)))(jnp.ones((4, 3)), jnp.ones((4, 3)))


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)


MASKED = {
    "barlow_twins": (barlow_twins, [randn(109, 6, 4), randn(110, 6, 4)], 2, False),
    "vicreg": (vicreg, [randn(111, 6, 4), randn(112, 6, 4)], 2, False),
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
