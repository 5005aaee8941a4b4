"""Tests of jaxcl/losses/crossmodal.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.crossmodal import cwcl, symile
from tests import helpers
from tests.helpers import randn
from tests.losses import reference


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# -------------------------------------------------------------------------------------------------- CWCL
@pytest.mark.parametrize("b,d,temperature", [(2, 3, 0.1), (5, 4, 0.7), (4, 9, 0.1), (6, 2, 0.3)])
def test_cwcl_matches_reference(b, d, temperature):
  frozen, trained = randn(20, b, d), randn(21, b, d)
  got, (g_f, g_t) = jax.jit(
      jax.value_and_grad(lambda f, t: cwcl(f, t, temperature=temperature), argnums=(0, 1))
  )(frozen, trained)
  np.testing.assert_allclose(float(got), reference.crossmodal.cwcl(frozen, trained, temperature), rtol=2e-5)
  # The weights are targets (no gradient): differentiate the reference with the weights held fixed.
  w = reference.crossmodal.cwcl_weights(frozen)
  for g, x, f in [
      (g_f, frozen, lambda x: reference.crossmodal.cwcl(x, trained, temperature, weights=w)),
      (g_t, trained, lambda x: reference.crossmodal.cwcl(frozen, x, temperature)),
  ]:
    want = reference.common.numerical_grad(f, x)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(g) / scale, want / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b,d", [(3, 4), (6, 2)])
def test_cwcl_explicit_weights_match_reference(b, d):
  w = np.random.default_rng(22).uniform(0.0, 1.0, (b, b)).astype(np.float32)
  assert_value_and_grads(
      lambda f, t, weights: cwcl(f, t, temperature=0.3, weights=weights),
      lambda f, t, weights: reference.crossmodal.cwcl(f, t, 0.3, weights=weights),
      [randn(23, b, d), randn(24, b, d), w],
  )


def test_cwcl_unnormalized_matches_reference():
  frozen, trained = 0.5 * randn(25, 5, 3), 0.5 * randn(26, 5, 3)
  got = jax.jit(lambda f, t: cwcl(f, t, temperature=1.0, normalize=False))(frozen, trained)
  np.testing.assert_allclose(float(got), reference.crossmodal.cwcl(frozen, trained, 1.0, normalize_=False), rtol=2e-5)


@pytest.mark.parametrize("b,d", [(2, 3), (16, 8)])
def test_cwcl_with_identity_weights_is_clip(b, d):
  frozen, trained = randn(27, b, d), randn(28, b, d)
  got, want = jax.jit(
      lambda f, t: (cwcl(f, t, temperature=0.1, weights=jnp.eye(b)), clip(f, t, logit_scale=10.0))
  )(frozen, trained)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_cwcl_implicit_weights_equal_explicit_ones():
  # The D×D factorisation of Σ_j w_ij S_ij against the same weights given as a (B, B) array.
  for b, d in [(6, 3), (3, 10)]:
    frozen, trained = randn(29, b, d), randn(30, b, d)
    w = reference.crossmodal.cwcl_weights(frozen).astype(np.float32)
    explicit, implicit = jax.jit(lambda f, t, w: (cwcl(f, t, weights=w), cwcl(f, t)))(frozen, trained, w)
    np.testing.assert_allclose(float(explicit), float(implicit), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Symile
@pytest.mark.parametrize("m,n,d", [(2, 5, 4), (3, 2, 3), (3, 5, 4), (4, 4, 3)])
def test_symile_matches_reference(m, n, d):
  mods = [randn(40 + k, n, d) for k in range(m)]
  assert_value_and_grads(
      lambda *xs: symile(*xs, logit_scale=8.0),
      lambda *xs: reference.crossmodal.symile(*xs, logit_scale=8.0),
      mods,
  )


def test_symile_unnormalized_and_learnable_scale():
  mods = [0.7 * randn(50 + k, 4, 3) for k in range(3)]
  got = jax.jit(lambda *xs: symile(*xs, logit_scale=2.0, normalize=False))(*mods)
  np.testing.assert_allclose(float(got), reference.crossmodal.symile(*mods, logit_scale=2.0, normalize_=False), rtol=2e-5)
  g = jax.jit(jax.grad(lambda s: symile(*mods, logit_scale=s)))(5.0)
  want = reference.common.numerical_grad(lambda s: reference.crossmodal.symile(*mods, logit_scale=s[()]), np.array(5.0))
  np.testing.assert_allclose(g, want, rtol=1e-4)


@pytest.mark.parametrize("n,d", [(2, 3), (16, 8)])
def test_symile_with_two_modalities_is_clip(n, d):
  a, b = randn(55, n, d), randn(56, n, d)
  got, want = jax.jit(lambda x, y: (symile(x, y, logit_scale=14.0), clip(x, y, logit_scale=14.0)))(a, b)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_symile_is_symmetric_in_modality_order():
  a, b, c = randn(57, 6, 4), randn(58, 6, 4), randn(59, 6, 4)
  loss = jax.jit(lambda *xs: symile(*xs, logit_scale=10.0))
  np.testing.assert_allclose(float(loss(c, a, b)), float(loss(a, b, c)), rtol=1e-5)


# --------------------------------------------------------------------------- transforms, dtypes, extremes
# Each entry: (loss of float arrays, its float64 reference, input shapes).
LABELS = jnp.array([0, 1, 0, 1, 2, 2])


LOSSES = {
    "cwcl": (lambda f, t: cwcl(f, t, temperature=0.1), lambda f, t: reference.crossmodal.cwcl(f, t, 0.1), [(6, 8)] * 2),
    "symile": (
        lambda a, b, c: symile(a, b, c, logit_scale=20.0),
        lambda a, b, c: reference.crossmodal.symile(a, b, c, logit_scale=20.0),
        [(6, 8)] * 3,
    ),
}


def _inputs(name, seed, batch=()):
  return [randn(seed + k, *batch, *shape) for k, shape in enumerate(LOSSES[name][2])]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_jit_grad_vmap(name):
  fn, np_fn, _ = LOSSES[name]
  xs = _inputs(name, 70, batch=(3,))
  want = np.array([np_fn(*[x[i] for x in xs]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(*xs)), want, rtol=2e-5)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(len(xs)))))(*[x[0] for x in xs])
  for g, x in zip(grads, xs):
    assert g.shape == x[0].shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_inputs_close_to_fp32(name):
  fn, np_fn, _ = LOSSES[name]
  xs = [x.astype(jnp.bfloat16) for x in _inputs(name, 80)]
  value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))
  lo, grads = value_and_grad(*map(jnp.asarray, xs))
  assert lo.dtype == jnp.float32
  # Against the float64 loss of the same (bf16-rounded) inputs: only the bf16 matmul operands differ.
  want = np_fn(*[np.asarray(x, np.float64) for x in xs])
  np.testing.assert_allclose(float(lo), want, rtol=3e-2, atol=3e-2)
  for g in grads:
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_extremes_are_finite(name):
  fn = LOSSES[name][0]
  xs = _inputs(name, 90)
  cases = [
      xs,
      [x * 1e-12 for x in xs],
      [np.zeros_like(xs[0])] + xs[1:],
      [x * 1e6 for x in xs],
      [xs[0] for _ in xs],  # every modality / view identical
  ]
  value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))
  for case in cases:
    value, grads = value_and_grad(*map(jnp.asarray, case))
    assert np.isfinite(float(value)), name
    assert all(np.all(np.isfinite(g)) for g in grads), name


COLD = {
    "cwcl": (lambda f, t: cwcl(f, t, temperature=0.01), lambda f, t: reference.crossmodal.cwcl(f, t, 0.01), [(6, 8)] * 2),
    "symile": (
        lambda *xs: symile(*xs, logit_scale=1000.0),
        lambda *xs: reference.crossmodal.symile(*xs, logit_scale=1000.0),
        [(6, 8)] * 3,
    ),
}


@pytest.mark.parametrize("name", sorted(COLD))
def test_low_temperature_and_high_scale_are_finite_and_accurate(name):
  # τ = 0.01 (logit scale 1000 for Symile): logits up to ±100, the self-similarity 1/τ = 100 sits in the
  # excluded entries of SupCon / MV-DHEL and must not leak an overflow into the gradients.
  fn, np_fn, shapes = COLD[name]
  xs = [randn(100 + k, *shape) for k, shape in enumerate(shapes)]
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))(*xs)
  np.testing.assert_allclose(float(value), np_fn(*[np.asarray(x, np.float64) for x in xs]), rtol=1e-4)
  for g in grads:
    assert np.all(np.isfinite(g)), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cwcl(ONES((4, 3)), ONES((5, 3))), r"`frozen` and `trained` must have the same shape"),
        (lambda: cwcl(ONES((4,)), ONES((4,))), r"`frozen` must have rank 2"),
        (lambda: cwcl(ONES((1, 3)), ONES((1, 3))), r"`frozen` needs at least 2 examples"),
        (lambda: cwcl(ONES((4, 3)), ONES((4, 3)), temperature=0.0), r"`temperature` must be positive"),
        (lambda: cwcl(ONES((4, 3)), ONES((4, 3)), weights=ONES((4, 3))), r"`weights` must have shape \(4, 4\)"),
        (lambda: cwcl(ONES((4, 3)), ONES((4, 3)), weights=-ONES((4, 4))), r"`weights` must be finite and non-negative"),
        (lambda: cwcl(ONES((2, 3)), ONES((2, 3)), weights=np.array([[1.0, 0.0], [0.0, 0.0]])), r"positive sum"),
        (lambda: symile(ONES((4, 3)), logit_scale=1.0), r"`modalities` needs at least 2 arrays"),
        (lambda: symile(ONES((4, 3)), ONES((4, 2)), ONES((4, 3)), logit_scale=1.0), r"`modalities\[0\]` and `modalities\[1\]` must have the same shape"),
        (lambda: symile(ONES((4, 3)), ONES((4, 3)), ONES((4,)), logit_scale=1.0), r"`modalities\[2\]` must have rank 2"),
        (lambda: symile(ONES((1, 3)), ONES((1, 3)), logit_scale=1.0), r"`modalities\[0\]` needs at least 2 examples"),
        (lambda: symile(ONES((4, 3)), ONES((4, 3)), logit_scale=0.0), r"`logit_scale` must be positive"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("name", ["cwcl", "cwcl_weights", "symile3"])
def test_crossmodal_padded_batch_with_mask_equals_unpadded_batch(name):
  a, b, c = randn(130, 5, 4), randn(131, 5, 4), randn(132, 5, 4)
  w = np.abs(randn(133, 5, 5)) + 0.1
  if name == "cwcl":
    arrays, loss, anchors = [a, b], lambda a, b, **kw: cwcl(a, b, temperature=0.2, **kw), 10
  elif name == "cwcl_weights":  # explicit (B, B) weights: padded with garbage, masked by the loss
    wp = np.full((8, 8), 7.0, np.float32)
    _, mask = helpers.pad_batch(0, [a], 3)
    wp[np.ix_(mask, mask)] = w
    arrays, anchors = [a, b], 10

    def loss(a, b, **kw):
      return cwcl(a, b, temperature=0.2, weights=wp if "mask" in kw else w, **kw)
  else:
    arrays, loss, anchors = [a, b, c], lambda *xs, **kw: symile(*xs, logit_scale=3.0, **kw), 15
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)
  if name != "cwcl_weights":
    helpers.assert_reductions_agree(loss, arrays, anchors)
    helpers.assert_reductions_agree(loss, arrays, anchors, mask=np.array([1, 1, 0, 1, 1], bool))


# ------------------------------------------------------------------------------------ sharded batches
PADDED = np.arange(24) % 5 != 2  # 24 rows split over 3 and 8 devices, every fifth one padding


@pytest.mark.parametrize("impl,n_devices", [("ring", 3), ("allgather", 8)])
@pytest.mark.parametrize("name", ["cwcl", "symile"])
def test_sharded_batch_equals_dense(name, impl, n_devices):
  """Over a mesh the value and the gradients (a traced temperature or logit scale included) are those
  of the dense loss on one device, with padding rows (ring) and without (allgather); CWCL's explicit
  weights are split by rows with the batch."""
  x = [randn(seed, 24, 4) for seed in range(3)]
  if name == "cwcl" and impl == "ring":
    cases = [(lambda f, t, **kw: cwcl(f, t, temperature=0.3, mask=PADDED, **kw), x[:2])]
  elif name == "cwcl":
    weights = np.abs(randn(7, 24, 24))
    cases = [(lambda f, t, tau, **kw: cwcl(f, t, temperature=tau, **kw), [x[0], x[1], 0.3]),
             (lambda f, t, w, **kw: cwcl(f, t, weights=w, temperature=0.3, mask=PADDED, **kw), x[:2] + [weights])]
  elif impl == "ring":
    cases = [(lambda *a, **kw: symile(*a, logit_scale=3.0, mask=PADDED, **kw), x)]
  else:
    cases = [(lambda *a, **kw: symile(*a[:-1], logit_scale=a[-1], **kw), x + [3.0])]
  for loss, args in cases:
    helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)
