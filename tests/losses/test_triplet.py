"""Tests of jaxcl/losses/triplet.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.alignment_uniformity import uniformity
from jaxcl.losses.redundancy import barlow_twins
from jaxcl.losses.triplet import batch_hard_triplet, triplet
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference


def check(jax_loss, np_loss, args, **tolerances):
  """Value and finite-difference gradients of the jitted loss (one compile instead of eager ops)."""
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


# -------------------------------------------------------------------------------------------- triplet
@pytest.mark.parametrize("b,d", [(1, 3), (8, 16)])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_triplet_matches_reference(b, d, squared, normalize):
  # Large enough that most hinges are active (squared raw distances spread widest).
  margins = {(True, False): 1.0, (True, True): 2.0, (False, False): 3.0, (False, True): 20.0}
  margin = margins[normalize, squared]
  args = [randn(1, b, d), randn(2, b, d), randn(3, b, d)]
  fn = functools.partial(triplet, margin=margin, squared=squared, normalize=normalize)
  assert float(fn(*args)) > 0
  check(
      fn,
      functools.partial(reference.triplet.triplet, margin=margin, squared=squared, normalize_=normalize),
      args,
  )


def test_triplet_inactive_hinges_give_zero_loss_and_gradient():
  a = randn(4, 6, 5)
  # d(a, p) ≈ 0 and d(a, n) = 2: every hinge is inactive.
  value, grads = jax.jit(jax.value_and_grad(triplet, argnums=(0, 1, 2)))(a, a + 1e-3, -a)
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_triplet_squared_is_two_minus_two_cosines_on_the_sphere():
  a, p, n = randn(5, 7, 4), randn(6, 7, 4), randn(7, 7, 4)
  an, pn, nn = (reference.common.normalize(x) for x in (a, p, n))
  gap = (2 - 2 * np.sum(an * pn, 1)) - (2 - 2 * np.sum(an * nn, 1))
  want = np.mean(np.maximum(gap + 0.5, 0))
  np.testing.assert_allclose(float(triplet(a, p, n, margin=0.5, squared=True)), want, rtol=1e-5)


def test_triplet_identical_anchor_and_positive_has_finite_gradient():
  a = randn(8, 4, 3)
  grads = jax.jit(jax.grad(triplet, argnums=(0, 1, 2)))(a, a.copy(), randn(9, 4, 3))
  assert all(np.all(np.isfinite(g)) for g in grads)
  raw = functools.partial(triplet, normalize=False)
  grads = jax.jit(jax.grad(raw, argnums=(0, 1, 2)))(a, a.copy(), a.copy())
  assert all(np.all(np.isfinite(g)) for g in grads)


# --------------------------------------------------------------------------------- batch-hard triplet
BATCH_HARD_CASES = [
    (np.array([0, 0, 1, 1]), 3),
    (np.array([0, 0, 1, 1, 2, 3]), 4),  # labels 2 and 3 have no positive: left out of the mean
    (np.array([2, 0, 1, 2, 0, 1, 1, 0]), 16),
    (np.array([5, 5, 5, 7, 9, 9, 7, 5, 9, 7]), 5),
]


@pytest.mark.parametrize(
    "case,squared,normalize",
    [(0, False, True), (1, True, True), (2, False, True), (2, True, False), (3, False, False),
     (3, True, True)],
)
def test_batch_hard_triplet_matches_reference(case, squared, normalize):
  labels, d = BATCH_HARD_CASES[case]
  x = randn(10 + len(labels), len(labels), d)
  margin = 0.5 if normalize else 2.0
  check(
      lambda e: batch_hard_triplet(e, labels, margin=margin, squared=squared, normalize=normalize),
      lambda e: reference.triplet.batch_hard_triplet(e, labels, margin, squared, normalize),
      [x],
  )


def test_batch_hard_triplet_picks_the_hardest_pairs():
  # Anchor 0 has positives at distances 1 and 3 and negatives at 2 and 5 (along a line, no normalising).
  x = np.array([[0.0], [1.0], [3.0], [2.0], [5.0]], np.float32)
  labels = np.array([0, 0, 0, 1, 1])
  got = jax.jit(functools.partial(batch_hard_triplet, margin=0.0, normalize=False))(x, labels)
  # anchor 0: 3 − 2; anchor 1 (x=1): max(1, 2) − min(1, 4) = 1; anchor 2 (x=3): max(3, 2) − min(1, 2) = 2
  # anchor 3 (x=2): 3 − min(2, 1, 1) = 2; anchor 4 (x=5): 3 − min(5, 4, 2) = 1
  np.testing.assert_allclose(float(got), (1 + 1 + 2 + 2 + 1) / 5, rtol=1e-6)


@pytest.mark.parametrize("labels", [np.zeros(5, np.int32), np.arange(5)])
def test_batch_hard_triplet_without_valid_anchor_is_zero(labels):
  x = randn(11, 5, 3)
  value, g = jax.jit(jax.value_and_grad(batch_hard_triplet))(x, labels)
  assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_batch_hard_triplet_duplicate_embeddings_are_finite():
  x = np.repeat(randn(12, 3, 4), 2, axis=0)
  labels = np.array([0, 0, 1, 1, 2, 2])
  for squared in (True, False):
    fn = functools.partial(batch_hard_triplet, margin=1.5, squared=squared)
    value, g = jax.jit(jax.value_and_grad(fn))(x, labels)
    assert np.isfinite(float(value)) and np.all(np.isfinite(g))
  # Every positive sits at distance 0, so each anchor's loss is margin − (closest negative distance).
  xn = reference.common.normalize(x)
  closest = [min(np.linalg.norm(xn[i] - xn[k]) for k in range(6) if labels[k] != labels[i]) for i in range(6)]
  want = np.mean(np.maximum(1.5 - np.array(closest), 0))
  assert want > 0
  np.testing.assert_allclose(float(value), want, rtol=1e-5)


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])


ALL_LOSSES = {
    "triplet": (functools.partial(triplet, margin=0.5), 3),
    "batch_hard_triplet": (lambda x: batch_hard_triplet(x, LABELS[: x.shape[0]]), 1),
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


def test_batch_hard_triplet_vmaps_over_labels_too():
  x = randn(55, 3, 6, 4)
  labels = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], [3, 3, 3, 4, 4, 5]])
  got = jax.jit(jax.vmap(batch_hard_triplet))(x, labels)
  want = [reference.triplet.batch_hard_triplet(x[i], labels[i]) for i in range(3)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


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
        (lambda: triplet(ONES, ONES, np.ones((5, 3))), r"`anchor` and `negative` must have the same shape"),
        (lambda: triplet(ONES, np.ones((4, 2)), ONES), r"`anchor` and `positive` must have the same shape"),
        (lambda: triplet(np.ones(4), np.ones(4), np.ones(4)), r"`anchor` must have rank 2, got shape \(4,\)"),
        (lambda: triplet(ONES, ONES, ONES, margin=-0.1), r"`margin` must be >= 0, got -0.1"),
        (lambda: triplet(ONES, ONES, ONES, margin=np.nan), r"`margin` must be finite"),
        (lambda: triplet(ONES.astype(np.int32), ONES, ONES), r"`anchor` must be a floating-point array"),
        (lambda: batch_hard_triplet(ONES, np.zeros(3, np.int32)), r"`labels` must have shape \(4,\), got \(3,\)"),
        (lambda: batch_hard_triplet(ONES, np.zeros(4, np.float32)), r"`labels` must have an integer dtype"),
        (lambda: batch_hard_triplet(ONES, None), r"`labels` must be an integer array of shape \(4,\)"),
        (lambda: batch_hard_triplet(np.ones((1, 3)), np.zeros(1, np.int32)), r"`embeddings` needs at least 2"),
        (lambda: batch_hard_triplet(np.ones((2, 4, 3)), np.zeros(2, np.int32)), r"`embeddings` must have rank 2"),
        (lambda: batch_hard_triplet(ONES, np.zeros(4, np.int32), margin=-1), r"`margin` must be >= 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_traced_hyperparameters_are_accepted():
  a, p, n = randn(80, 5, 3), randn(81, 5, 3), randn(82, 5, 3)
  f = jax.jit(lambda m: triplet(a, p, n, margin=m))
  np.testing.assert_allclose(float(f(0.7)), reference.triplet.triplet(a, p, n, 0.7), rtol=1e-5)
  g = jax.jit(lambda t: uniformity(a, t=t))
  np.testing.assert_allclose(float(g(1.5)), reference.alignment_uniformity.uniformity(a, 1.5), rtol=1e-5)
  h = jax.jit(lambda lam: barlow_twins(a, p, lambda_=lam))
  np.testing.assert_allclose(float(h(0.1)), reference.redundancy.barlow_twins(a, p, 0.1), rtol=1e-5)


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)


MASKED = {
    "triplet": (triplet, [randn(100, 6, 4), randn(101, 6, 4), randn(102, 6, 4)], 3, True),
    "batch_hard_triplet": (batch_hard_triplet, [randn(103, 6, 4), _LABELS], 1, True),
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
