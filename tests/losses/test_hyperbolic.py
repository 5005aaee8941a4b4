"""Tests of jaxcl/losses/hyperbolic.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.hyperbolic import (
    entailment_cone, exterior_angle, half_aperture, lorentz_distance, lorentz_expmap0, meru,
)
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference
from tests.losses.reference.hyperbolic import ref_lift, ref_lorentz_inner, ref_meru


logsumexp = reference.common.logsumexp


def check(jax_loss, np_loss, args, **tolerances):
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


@pytest.mark.parametrize(
    "b,d,kw",
    [(2, 3, {}), (5, 4, {"curvature": 0.5, "logit_scale": 2.0}),
     (8, 6, {"curvature": 2.0, "logit_scale": 5.0, "entailment_weight": 1.0})],
)
def test_meru_matches_reference(b, d, kw):
  args = [randn(40 + b, b, d), randn(41 + b, b, d)]
  # Spread the specific points so that some pairs are inside their cone and some outside.
  args[0] *= np.linspace(0.5, 2.0, b, dtype=np.float32)[:, None]
  c, s, w = kw.get("curvature", 1.0), kw.get("logit_scale", 1 / 0.07), kw.get("entailment_weight", 0.2)
  check(lambda x, y: meru(x, y, **kw), lambda x, y: ref_meru(x, y, c, s, w), args)


def test_meru_learnable_curvature_and_scale_gradients():
  x, y = randn(44, 5, 4), randn(45, 5, 4)
  g = jax.jit(jax.grad(lambda c, s: meru(x, y, curvature=c, logit_scale=s), argnums=(0, 1)))(0.7, 3.0)
  want_c = reference.common.numerical_grad(lambda c: ref_meru(x, y, c[()], 3.0), np.array(0.7))
  want_s = reference.common.numerical_grad(lambda s: ref_meru(x, y, 0.7, s[()]), np.array(3.0))
  np.testing.assert_allclose(g[0], want_c, rtol=1e-3)
  np.testing.assert_allclose(g[1], want_s, rtol=1e-3)


@pytest.mark.parametrize("c", [0.1, 1.0, 3.0])
def test_expmap_preserves_distance_to_the_origin_and_matches_reference(c):
  v = randn(46, 6, 5)
  x = lorentz_expmap0(v, curvature=c)
  np.testing.assert_allclose(x, ref_lift(v, c)[:, 1:], rtol=1e-5)
  # The exponential map at the origin is radial: d(o, exp_o(v)) = ‖v‖.
  origin = jnp.zeros((1, 5))
  np.testing.assert_allclose(lorentz_distance(origin, x, curvature=c)[0], np.linalg.norm(v, axis=1),
                             rtol=1e-4)


def test_meru_small_curvature_limit_is_euclidean():
  # As c → 0 the hyperboloid flattens: d(exp_o(v), exp_o(w)) → ‖v − w‖, so without the entailment term
  # MERU is CLIP's symmetric cross-entropy on negative Euclidean distances of the tangent vectors.
  x, y = 0.5 * randn(47, 6, 4), 0.5 * randn(48, 6, 4)
  d = np.linalg.norm(x[:, None].astype(np.float64) - y[None], axis=-1)
  s = -2.0 * d
  want = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  got = meru(x, y, curvature=1e-4, logit_scale=2.0, entailment_weight=0.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-3)


def test_entailment_cone_inside_outside_and_finite_at_coincident_points():
  g = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  s = np.array([[3.0, 0.1], [0.0, 3.0]], np.float32)  # nearly along g's geodesic; then at 90 degrees
  angle = exterior_angle(g, s)
  aperture = half_aperture(g)
  assert angle[0] < aperture[0] < angle[1]
  np.testing.assert_allclose(
      float(entailment_cone(g, s)), 0.5 * float(angle[1] - aperture[1]), rtol=1e-6
  )
  value, grads = jax.jit(jax.value_and_grad(
      lambda a, b: meru(a, b, expmap=False), argnums=(0, 1)))(jnp.asarray(s), jnp.asarray(s))
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(x)) for x in grads)
  zeros = jnp.zeros((3, 4))
  value, grads = jax.jit(jax.value_and_grad(meru, argnums=(0, 1)))(zeros, zeros)
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(x)) for x in grads)


def test_meru_bf16_inputs():
  x, y = randn(49, 6, 8).astype(jnp.bfloat16), randn(50, 6, 8).astype(jnp.bfloat16)
  value, grads = jax.jit(jax.value_and_grad(meru, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(y))
  assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
  want = ref_meru(np.asarray(x, np.float64), np.asarray(y, np.float64))
  np.testing.assert_allclose(float(value), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: meru(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), curvature=0.0),
         r"`curvature` must be positive"),
        (lambda: meru(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), impl="blockwise"),
         r"`impl` must be one of \('auto', 'dense'\)"),
        (lambda: meru(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)),
         r"`image` and `text` must have the same shape"),
        (lambda: meru(np.ones((1, 3), np.float32), np.ones((1, 3), np.float32)),
         r"`image` needs at least 2 examples"),
        (lambda: meru(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), entailment_weight=-1.0),
         r"`entailment_weight` must be >= 0"),
        (lambda: lorentz_distance(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)),
         r"same feature size"),
    ],
)
def test_meru_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


_MASK5 = np.array([1, 0, 1, 1, 1], bool)


# ------------------------------------------------------------------- reduction and mask (hyperbolic.py)
@pytest.mark.parametrize("expmap", [True, False])
def test_meru_padded_batch_with_mask_equals_unpadded_batch(expmap):
  arrays = [0.5 * randn(160, 5, 3), 0.5 * randn(161, 5, 3)]
  loss = lambda x, y, **kw: meru(x, y, curvature=0.7, logit_scale=3.0, entailment_weight=0.5, expmap=expmap, **kw)
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)
  helpers.assert_reductions_agree(loss, arrays, 10)
  helpers.assert_reductions_agree(loss, arrays, 10, mask=_MASK5)


def test_meru_per_anchor_terms_match_reference():
  x, y = 0.5 * randn(162, 4, 3), 0.5 * randn(163, 4, 3)
  per = np.asarray(meru(x, y, logit_scale=3.0, reduction="none"), np.float64)
  lx, ly = ref_lift(x, 1.0), ref_lift(y, 1.0)
  s = -3.0 * np.array([[np.arccosh(max(-ref_lorentz_inner(lx[i], ly[j]), 1 + 1e-6)) for j in range(4)]
                       for i in range(4)])
  e = np.zeros(4)
  for i in range(4):  # text i is the general concept, image i the specific one
    g, sp = ly[i], lx[i]
    aperture = np.arcsin(min(0.2 / np.linalg.norm(g[1:]), 1 - 1e-6))
    cxy = ref_lorentz_inner(g, sp)
    angle = np.arccos((sp[0] + cxy * g[0]) / (np.linalg.norm(g[1:]) * np.sqrt(cxy**2 - 1)))
    e[i] = 0.2 * max(angle - aperture, 0.0)
  want = np.concatenate([logsumexp(s, 1) - np.diag(s) + e, logsumexp(s, 0) - np.diag(s) + e])
  np.testing.assert_allclose(per, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(per.mean(), ref_meru(x, y, scale=3.0), rtol=1e-5)


def test_entailment_cone_padded_batch_with_mask_equals_unpadded_batch():
  arrays = [randn(164, 5, 3), randn(165, 5, 3)]
  loss = lambda g, s, **kw: entailment_cone(g, s, curvature=0.5, min_radius=0.05, **kw)
  assert float(loss(*arrays)) > 0  # some pairs outside their cone
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)
  helpers.assert_reductions_agree(loss, arrays, 5)
  helpers.assert_reductions_agree(loss, arrays, 5, mask=_MASK5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: meru(x, x, mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: meru(x, x, reduction="avg"), r"`reduction` must be one of"),
        (lambda x: entailment_cone(x, x, mask=np.ones(4, np.float32)), r"`mask` must be a boolean array"),
        (lambda x: entailment_cone(x, x, reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_hyperbolic_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call(randn(166, 4, 3))


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
def test_meru_sharded_equals_dense(impl, n_devices, masked):
  """The pairs split over 3 or 8 devices (a padded batch on 8; the keys gathered): the value and the
  gradients, also of the replicated curvature and logit scale, of the one-device loss."""
  mask = np.arange(24) % 5 != 2
  loss = lambda x, y, c, s, m, **kw: meru(x, y, curvature=c, logit_scale=s, mask=m if masked else None, **kw)  # noqa: E731
  args = [0.5 * randn(80, 24, 4), 0.5 * randn(81, 24, 4), np.float32(0.8), np.float32(5.0), mask]
  # rtol 5e-5: the curvature's gradient sums ~2·24² float32 terms in a different order on 8 devices.
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices, rtol=5e-5)
