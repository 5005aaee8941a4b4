"""Tests of jaxcl/losses/temperature.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.infonce import dcl, nt_xent
from jaxcl.losses.temperature import (
    IsogclrClipOutput,
    IsogclrClipState,
    IsogclrOutput,
    IsogclrState,
    amcl,
    focal_clip,
    isogclr,
    isogclr_clip,
    isogclr_clip_state,
    isogclr_state,
    macl,
)
from jaxcl.models import AMCLTemperature
from tests import helpers
from tests.helpers import randn
from tests.losses.reference.common import logsumexp, normalize
from tests.losses.reference.temperature import (
    ref_amcl,
    ref_focal,
    ref_isogclr_clip_objective_term,
    ref_isogclr_clip_step,
    ref_isogclr_clip_surrogate,
    ref_isogclr_step,
    ref_isogclr_surrogate,
    ref_macl,
)


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


_engines = helpers.engines


@pytest.mark.parametrize(
    "t0,alpha,a0,reweight", [(0.1, 0.5, 0.0, True), (0.3, 0.2, 0.5, True), (0.2, 0.5, 0.0, False)]
)
def test_macl_matches_reference(t0, alpha, a0, reweight):
  x, y = randn(1, 5, 4), randn(2, 5, 4)
  _, frozen = ref_macl(x.astype(np.float64), y.astype(np.float64), t0, alpha, a0, reweight)
  assert_value_and_grads(
      lambda a, b: macl(a, b, temperature=t0, alpha=alpha, a0=a0, reweight=reweight),
      lambda a, b: ref_macl(a, b, t0, alpha, a0, reweight, frozen=frozen),
      [x, y],
  )


def test_macl_without_adaptation_is_nt_xent():
  x, y = randn(3, 6, 4), randn(4, 6, 4)
  got, want = jax.jit(lambda a, b: (macl(a, b, temperature=0.2, alpha=0.0, reweight=False), nt_xent(a, b, temperature=0.2)))(x, y)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_macl_temperature_grows_with_alignment():
  # Better-aligned views raise τ_A: with reweighting off and α > 0, the loss of a batch equals NT-Xent
  # at τ₀ (1 + α A).
  x = randn(5, 6, 4)
  y = x + 0.1 * randn(6, 6, 4)
  xn, yn = normalize(x), normalize(y)
  a_mag = float(np.mean(np.sum(xn * yn, axis=1)))
  got = macl(x, y, temperature=0.1, alpha=0.5, reweight=False)
  want = nt_xent(x, y, temperature=0.1 * (1 + 0.5 * a_mag))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("temperature", [2.0**-20, 2.0**-100])
def test_macl_is_finite_at_tiny_temperatures_with_aligned_views(temperature):
  # Aligned views make P_i round to 1: V = 1/(1 − P) overflowed (inf · 0 = NaN from 1/τ ≈ 2^15). The
  # value sg(V)·(−log P) tends to 1 per anchor, and since V σ(−d) = 1 its gradient is that of
  # N_i − pos_i/τ_A, i.e. dcl's at the temperature τ_A (A frozen).
  x = randn(11, 6, 4)
  y = x + 0.01 * randn(12, 6, 4)
  a_mag = float(np.mean(np.sum(normalize(x) * normalize(y), axis=1)))
  value, grads = jax.value_and_grad(lambda a, b: macl(a, b, temperature=temperature), argnums=(0, 1))(x, y)
  _, want = jax.value_and_grad(lambda a, b: dcl(a, b, temperature=temperature * (1 + 0.5 * a_mag)),
                               argnums=(0, 1))(x, y)
  np.testing.assert_allclose(float(value), 1.0, rtol=1e-6)
  for g, w in zip(grads, want):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(w))))


def test_macl_gradient_is_dcl_gradient_at_the_adapted_temperature():
  # The same identity at a moderate temperature, where V is far from overflow.
  x, y = randn(13, 5, 4), randn(14, 5, 4)
  a_mag = float(np.mean(np.sum(normalize(x) * normalize(y), axis=1)))
  grads = jax.grad(lambda a, b: macl(a, b, temperature=0.1), argnums=(0, 1))(x, y)
  want = jax.grad(lambda a, b: dcl(a, b, temperature=0.1 * (1 + 0.5 * a_mag)), argnums=(0, 1))(x, y)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_clip_matches_reference(gamma):
  assert_value_and_grads(
      lambda a, b: focal_clip(a, b, logit_scale=4.0, gamma=gamma),
      lambda a, b: ref_focal(a, b, 4.0, gamma),
      [randn(7, 5, 4), randn(8, 5, 4)],
  )


def test_focal_clip_gamma_zero_is_clip_and_focusing_lowers_the_loss():
  x, y = randn(9, 6, 4), randn(10, 6, 4)
  f = jax.jit(lambda a, b: (focal_clip(a, b, logit_scale=5.0, gamma=0.0), clip(a, b, logit_scale=5.0),
                            focal_clip(a, b, logit_scale=5.0, gamma=1.0)))
  zero, want, one = f(x, y)
  np.testing.assert_allclose(float(zero), float(want), rtol=1e-5)
  assert 0 < float(one) < float(want)  # (1 − p) < 1 scales every term down


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_clip_is_finite_when_a_pair_is_certain(gamma):
  x = 50.0 * np.eye(3, dtype=np.float32)
  value, grad = jax.value_and_grad(lambda a: focal_clip(a, a, logit_scale=100.0, gamma=gamma))(x)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [2.0**40, 2.0**100])
def test_focal_clip_gradient_is_finite_at_huge_logit_scales(scale, gamma):
  # log p of a pair can round to a small positive number when both S_ii and the log-sum-exp are ~1e12:
  # expm1's derivative overflowed there (inf · 0 = NaN). Where every p is 0 or 1 in float32 the focal
  # factor is 1 or 0, so the gradient is CLIP's over the pairs with p = 0.
  x, y = randn(15, 8, 16), randn(16, 8, 16)
  value, grads = jax.value_and_grad(lambda a, b: focal_clip(a, b, logit_scale=scale, gamma=gamma),
                                    argnums=(0, 1))(x, y)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in grads)


ISO = dict(gamma=0.9, rho=0.3, eta=0.01, beta=0.9, tau_min=0.05, tau_max=0.7)


def _state(seed, n=9):
  rng = np.random.default_rng(seed)
  log_u = np.log(rng.uniform(0.5, 3.0, n)).astype(np.float32)
  log_u[[1, 4]] = -np.inf  # never seen: the first-visit initialisation
  return IsogclrState(
      log_u=jnp.asarray(log_u),
      tau=jnp.asarray(rng.uniform(0.1, 0.6, n).astype(np.float32)),
      tau_grad=jnp.asarray(rng.normal(0, 0.5, n).astype(np.float32)),
  )


def _u_domain(state):
  """(u, τ, tau_grad) as LibAUC keeps them (u = 0: never seen), for the float64 reference."""
  return (np.exp(np.asarray(state.log_u, np.float64)), np.asarray(state.tau), np.asarray(state.tau_grad))


@pytest.mark.parametrize("seed", [0, 1])
def test_isogclr_matches_reference_loss_gradient_and_state(seed):
  x, y = randn(20 + seed, 4, 3), randn(30 + seed, 4, 3)
  ids = np.array([4, 0, 7, 1], np.int32)
  state = _state(seed)
  want_loss, weights, want_state = ref_isogclr_step(
      x.astype(np.float64), y.astype(np.float64), ids, _u_domain(state), **ISO
  )
  want_state = (np.log(want_state[0]), *want_state[1:])  # u = 0 (unseen) -> log u = -inf
  assert_value_and_grads(
      lambda a, b: isogclr(a, b, ids, state, **ISO)[0],
      lambda a, b: ref_isogclr_surrogate(a, b, weights),
      [x, y],
  )
  loss, new_state = jax.jit(lambda a, b, s: isogclr(a, b, ids, s, **ISO))(x, y, state)
  np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
  for got, want, name in zip(new_state, want_state, IsogclrState._fields):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_isogclr_first_step_gradient_is_dcl_gradient_times_tau():
  # With u = g (first visit) and one τ for every example, the estimator is the exact gradient of
  # τ·mean_anchors [log mean_j e^{c_aj/τ} − c_pos/τ], i.e. τ ∇ dcl(temperature=τ): both are means over
  # the 2B anchors.
  x, y = randn(40, 5, 4), randn(41, 5, 4)
  state = isogclr_state(8, tau_init=0.3)
  ids = jnp.array([0, 2, 4, 6, 7])
  g_iso = jax.jit(jax.grad(lambda a, b: isogclr(a, b, ids, state)[0], argnums=(0, 1)))(x, y)
  g_dcl = jax.jit(jax.grad(lambda a, b: dcl(a, b, temperature=0.3), argnums=(0, 1)))(x, y)
  for gi, gd in zip(g_iso, g_dcl):
    np.testing.assert_allclose(gi, 0.3 * np.asarray(gd), rtol=1e-4, atol=1e-6)


def test_isogclr_returns_a_named_output_whose_first_field_is_the_loss():
  x, y = randn(44, 4, 3), randn(45, 4, 3)
  out = isogclr(x, y, jnp.arange(4), isogclr_state(4))
  assert isinstance(out, IsogclrOutput) and IsogclrOutput._fields[0] == "loss"
  loss, state = out  # still unpacks like a pair
  assert out.loss is loss and out.state is state and isinstance(state, IsogclrState)
  assert out.loss.shape == () and out.loss.dtype == jnp.float32


def test_isogclr_accepts_a_float64_state_with_x64_enabled():
  # A state restored from a float64 checkpoint: it is read in float32 and keeps its dtype; loss and
  # state equal those of the float32 state (before the fix: a ValueError from jax.vjp).
  x, y = randn(46, 4, 3), randn(47, 4, 3)
  ids = np.array([4, 0, 7, 1], np.int32)
  state32 = _state(7)
  want_loss, want_state = jax.jit(lambda s: isogclr(x, y, ids, s, **ISO))(state32)
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    state64 = IsogclrState(*(jnp.asarray(np.asarray(a), jnp.float64) for a in state32))
    assert state64.tau.dtype == jnp.float64
    loss, state = jax.jit(lambda s: isogclr(x, y, ids, s, **ISO))(state64)
    grads = jax.grad(lambda a: isogclr(a, y, ids, state64, **ISO).loss)(jnp.asarray(x))
    assert loss.dtype == jnp.float32 and grads.dtype == jnp.float32
    assert all(a.dtype == jnp.float64 for a in state)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for got, want, name in zip(state, want_state, IsogclrState._fields):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=name)
  finally:
    jax.config.update("jax_enable_x64", previous)


def test_isogclr_state_updates_only_the_batch_and_stays_in_bounds():
  x, y = randn(42, 4, 3), randn(43, 4, 3)
  state = isogclr_state(10)
  ids = jnp.array([9, 3, 5, 0])
  step = jax.jit(lambda s: isogclr(x, y, ids, s, eta=5.0, tau_max=0.3))
  for _ in range(3):
    _, state = step(state)
  untouched = np.setdiff1d(np.arange(10), np.asarray(ids))
  np.testing.assert_array_equal(np.asarray(state.log_u)[untouched], -np.inf)
  np.testing.assert_allclose(np.asarray(state.tau)[untouched], 0.1)
  tau = np.asarray(state.tau)[np.asarray(ids)]
  assert np.all((tau >= 0.05) & (tau <= 0.3)) and not np.allclose(tau, 0.1)
  assert np.all(np.isfinite(np.asarray(state.log_u)[np.asarray(ids)]))


def test_isogclr_stays_finite_where_libaucs_u_overflows():
  """τ = 0.005 (1/τ = 200 > 88.7): u = mean e^(c/τ) overflows float32 for c near 1, log u does not; the
  loss, its gradients and the state are finite, and a second step (u a moving average) still is."""
  x = randn(48, 4, 3)
  y = x + 0.01 * randn(49, 4, 3)
  state = isogclr_state(6, tau_init=0.005)
  ids = jnp.array([0, 1, 2, 3])
  step = jax.jit(jax.value_and_grad(lambda a, s: isogclr(a, y, ids, s, tau_min=0.005).loss))
  for _ in range(2):
    value, grad = step(x, state)
    state = jax.jit(lambda s: isogclr(x, y, ids, s, tau_min=0.005).state)(state)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.isfinite(np.asarray(state.log_u)[:4])) and np.all(np.isfinite(np.asarray(state.tau)))
  z = np.concatenate([x, y]) / np.linalg.norm(np.concatenate([x, y]), axis=1, keepdims=True)
  same_example = np.tile(np.eye(4, dtype=bool), (2, 2))
  assert np.max(np.where(same_example, -1.0, z @ z.T)) / 0.005 > 88.7  # a negative's e^(c/τ) is past float32


def _taus(seed, h, n):
  return np.random.default_rng(seed).uniform(0.2, 1.5, (h, n, n)).astype(np.float32)


@pytest.mark.parametrize("beta,top_k", [(0.01, None), (0.05, 3), (0.01, 100)])
def test_amcl_matches_reference_including_temperature_gradients(beta, top_k):
  assert_value_and_grads(
      lambda a, b, t: amcl(a, b, t, beta=beta, top_k=top_k),
      lambda a, b, t: ref_amcl(a, b, t, beta, top_k),
      [randn(70, 4, 2, 3), randn(71, 4, 2, 3), _taus(72, 2, 8)],
  )


def test_amcl_with_constant_temperature_and_no_regulariser_is_dcl():
  x, y = randn(73, 5, 4), randn(74, 5, 4)
  got, want, two = jax.jit(lambda a, b: (
      amcl(a[:, None], b[:, None], jnp.full((1, 10, 10), 0.3), beta=0.0, top_k=None),
      dcl(a, b, temperature=0.3),
      amcl(jnp.stack([a, a], 1), jnp.stack([b, b], 1), jnp.full((2, 10, 10), 0.3), beta=0.0, top_k=None),
  ))(x, y)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(two), 2 * float(got), rtol=1e-5)  # heads add up


def test_amcl_temperature_network_trains_end_to_end():
  z1, z2 = jnp.asarray(randn(75, 4, 3, 5)), jnp.asarray(randn(76, 4, 3, 5))
  net = AMCLTemperature(hidden_dim=8, tau_min=0.05, tau_max=1.0)
  params = net.init(jax.random.key(0), z1, z2)
  tau = jax.jit(net.apply)(params, z1, z2)
  assert tau.shape == (3, 8, 8)
  assert np.all((np.asarray(tau) > 0.05) & (np.asarray(tau) < 1.0))
  np.testing.assert_allclose(tau, np.swapaxes(np.asarray(tau), 1, 2), rtol=1e-6)  # τ(a, b) = τ(b, a)
  loss = lambda p, a, b: amcl(a, b, net.apply(p, a, b), top_k=4)  # noqa: E731
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, z1, z2)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads[0]))


# ------------------------------------------------------------------------------------------ engines
def test_every_engine_agrees_with_dense():
  x, y = randn(50, 6, 4), randn(51, 6, 4)
  state, ids = _state(3, 8), jnp.array([0, 1, 2, 4, 5, 7])
  calls = {
      "macl": lambda impl: lambda a, b: macl(a, b, impl=impl),
      "focal_clip": lambda impl: lambda a, b: focal_clip(a, b, logit_scale=5.0, impl=impl),
      "isogclr": lambda impl: lambda a, b: isogclr(a, b, ids, state, impl=impl)[0],
  }
  impls = _engines()
  assert {"dense", "blockwise", "pallas"} <= set(impls)
  for name, make in calls.items():
    out = jax.jit(lambda a, b: [jax.value_and_grad(make(i), argnums=(0, 1))(a, b) for i in impls])(x, y)
    want_value, want_grads = out[impls.index("dense")]
    for impl, (value, grads) in zip(impls, out):
      np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=f"{name} {impl}")
      for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")
  states = jax.jit(lambda a, b: [isogclr(a, b, ids, state, impl=i)[1] for i in impls])(x, y)
  for impl, s in zip(impls, states):
    for got, want in zip(s, states[impls.index("dense")]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"isogclr state {impl}")


# ------------------------------------------------------------------------------------- bf16, errors
def test_bfloat16_inputs_give_float32_close_to_float32():
  x, y = randn(60, 6, 8), randn(61, 6, 8)
  state, ids = isogclr_state(6), jnp.arange(6)
  for fn in (
      lambda a, b: macl(a, b),
      lambda a, b: focal_clip(a, b, logit_scale=5.0),
      lambda a, b: isogclr(a, b, ids, state)[0],
      lambda a, b: amcl(a[:, None], b[:, None], jnp.full((1, 12, 12), 0.5), top_k=3),
  ):
    lo = jax.jit(fn)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert lo.dtype == jnp.float32 and np.isfinite(float(lo))
    np.testing.assert_allclose(float(lo), float(jax.jit(fn)(x, y)), rtol=3e-2, atol=2e-2)


ONES = lambda shape: np.ones(shape, np.float32)  # noqa: E731


BAD = [
    (lambda: macl(ONES((4, 3)), ONES((4, 3)), alpha=0.9, a0=0.5), r"`alpha` \* \(1 \+ \|a0\|\) must be <= 1"),
    (lambda: macl(ONES((4, 3)), ONES((4, 3)), temperature=-1.0), r"`temperature` must be positive"),
    (lambda: macl(ONES((4, 3)), ONES((3, 3))), r"`z1` and `z2` must have the same shape"),
    (lambda: focal_clip(ONES((4, 3)), ONES((4, 3)), logit_scale=1.0, gamma=-1.0), r"`gamma` must be >= 0"),
    (lambda: isogclr_state(0), r"`num_examples` must be a positive int"),
    (lambda: isogclr(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_state(3)), r"`ids` must lie in \[0, 3\)"),
    (lambda: isogclr(ONES((4, 3)), ONES((4, 3)), np.arange(3), isogclr_state(8)), r"`ids` must have shape \(4,\)"),
    (lambda: isogclr(ONES((4, 3)), ONES((4, 3)), np.arange(4), (1, 2, 3)), r"`state` must be an IsogclrState"),
    (lambda: isogclr(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_state(8), gamma=1.5), r"`gamma` must be in"),
    (lambda: isogclr(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_state(8), tau_max=0.01),
     r"`tau_max` must be >= `tau_min`"),
    (lambda: isogclr_clip_state(0), r"`num_examples` must be a positive int"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_clip_state(3)), r"`ids` must lie in \[0, 3\)"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_state(8)),
     r"`state` must be an IsogclrClipState"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_clip_state(8)._replace(text_tau=ONES(7))),
     r"`state.text_tau` must have shape \(8,\)"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((5, 3)), np.arange(4), isogclr_clip_state(8)),
     r"`image` and `text` must have the same shape"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_clip_state(8), beta=-0.1), r"`beta` must be >= 0"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_clip_state(8), tau_min=0.0),
     r"`tau_min` must be positive"),
    (lambda: isogclr_clip(ONES((4, 3)), ONES((4, 3)), np.arange(4), isogclr_clip_state(8), mask=np.ones(3, bool)),
     r"`mask` must have shape \(4,\)"),
    (lambda: amcl(ONES((4, 2, 3)), ONES((4, 2, 3)), ONES((2, 4, 4))), r"`temperatures` must have shape \(H, 2B, 2B\)"),
    (lambda: amcl(ONES((4, 2, 3)), ONES((4, 2, 3)), -ONES((2, 8, 8))), r"`temperatures` must be positive"),
    (lambda: amcl(ONES((4, 2, 3)), ONES((4, 2, 3)), ONES((2, 8, 8)), top_k=0), r"`top_k` must be a positive int"),
    (lambda: amcl(ONES((4, 3)), ONES((4, 3)), ONES((1, 8, 8))), r"`z1` must have rank 3"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


# ------------------------------------------------------------------------- reduction= and mask= (item 9)
def _macl(a, b, **kw):
  return macl(a, b, temperature=0.2, **kw)


def _focal(a, b, **kw):
  return focal_clip(a, b, logit_scale=4.0, gamma=1.5, **kw)


TWO_VIEW = {"macl": _macl, "macl_no_reweight": functools.partial(_macl, reweight=False), "focal_clip": _focal}


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("name", sorted(TWO_VIEW))
def test_padded_batch_with_mask_equals_unpadded_batch(name, impl, monkeypatch):
  # padding rows change macl's alignment A unless they are left out of it too
  from jaxcl.ops import blockwise
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 2)  # several tiles
  loss = TWO_VIEW[name]
  helpers.assert_padded_equals_unpadded(lambda a, b, **kw: loss(a, b, impl=impl, **kw),
                                        [randn(30, 5, 4), randn(31, 5, 4)], rtol=2e-6)


@pytest.mark.parametrize("name", sorted(TWO_VIEW))
def test_reductions_none_sum_mean_agree(name):
  x, y = randn(32, 6, 4), randn(33, 6, 4)
  helpers.assert_reductions_agree(TWO_VIEW[name], [x, y], 12)
  helpers.assert_reductions_agree(TWO_VIEW[name], [x, y], 12, mask=np.array([1, 0, 1, 1, 0, 1], bool))


def test_macl_reduction_none_is_the_per_anchor_reference():
  x, y = randn(34, 5, 4), randn(35, 5, 4)
  z = normalize(np.concatenate([x, y]).astype(np.float64))
  _, (a_mag, weights) = ref_macl(x.astype(np.float64), y.astype(np.float64), 0.2, 0.5, 0.0, True)
  tau = 0.2 * (1 + 0.5 * a_mag)
  want = []
  for i in range(10):
    logits = np.array([z[i] @ z[j] for j in range(10) if j != i]) / tau
    want.append(-weights[i] * (z[i] @ z[(i + 5) % 10] / tau - logsumexp(logits)))
  np.testing.assert_allclose(np.asarray(_macl(x, y, reduction="none")), want, rtol=2e-5)


@pytest.mark.parametrize("impl", ["allgather", "ring"])
def test_macl_mask_on_the_sharded_engines(impl, monkeypatch):
  """5 samples padded to 8 = 2 per device on 4 devices equal the unpadded dense batch (A is the mean
  over the global valid anchors); "none" gives each device's anchors in turn."""
  from jaxcl.ops import blockwise
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 1)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  x, y = randn(36, 5, 4), randn(37, 5, 4)
  helpers.assert_padded_equals_unpadded(lambda a, b, **kw: _macl(a, b, impl=impl, mesh=mesh, **kw), [x, y],
                                        unpadded_loss=lambda a, b: _macl(a, b, impl="dense"), rtol=2e-6)
  (px, py), mask = helpers.pad_batch(1, [x, y], 3)
  dense = np.asarray(_macl(px, py, impl="dense", reduction="none", mask=jnp.asarray(mask)))
  got = np.asarray(jax.jit(lambda a, b: _macl(a, b, impl=impl, mesh=mesh, reduction="none", mask=jnp.asarray(mask)))(
      px, py))  # jitted: eager, the shard_map body would run one primitive at a time
  order = np.concatenate([np.concatenate([np.arange(2 * d, 2 * d + 2) + v * 8 for v in range(2)])
                          for d in range(4)])
  np.testing.assert_allclose(got, dense[order], rtol=2e-6, atol=1e-6)


MASK_BAD = [
    (lambda: _macl(ONES((4, 3)), ONES((4, 3)), reduction="max"), r"`reduction`"),
    (lambda: _macl(ONES((4, 3)), ONES((4, 3)), mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
    (lambda: _macl(ONES((4, 3)), ONES((4, 3)), mask=np.ones(4)), r"`mask` must be a boolean array"),
    (lambda: _focal(ONES((4, 3)), ONES((4, 3)), reduction="max"), r"`reduction`"),
    (lambda: _focal(ONES((4, 3)), ONES((4, 3)), mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
    (lambda: _focal(ONES((4, 3)), ONES((4, 3)), mask=np.ones(4)), r"`mask` must be a boolean array"),
]


@pytest.mark.parametrize("call,message", MASK_BAD)
def test_bad_mask_or_reduction_raises_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


def _amcl_taus(z1, z2):
  """Pair temperatures that depend on the embeddings (so that padding rows would show in them)."""
  z = jnp.concatenate([z1, z2]) / jnp.linalg.norm(jnp.concatenate([z1, z2]), axis=-1, keepdims=True)
  return 0.3 + jax.nn.sigmoid(jnp.einsum("ahd,bhd->hab", z, z))


@pytest.mark.parametrize("top_k", [None, 3, 100])
def test_amcl_padded_batch_with_mask_equals_unpadded_batch(top_k):
  loss = lambda a, b, **kw: amcl(a, b, _amcl_taus(a, b), beta=0.05, top_k=top_k, **kw)  # noqa: E731
  helpers.assert_padded_equals_unpadded(loss, [randn(40, 5, 2, 4), randn(41, 5, 2, 4)], rtol=2e-6)


def test_amcl_reductions_agree_and_none_is_the_reference_per_anchor():
  x, y, taus = randn(42, 6, 2, 4), randn(43, 6, 2, 4), _taus(44, 2, 12)
  loss = lambda a, b, **kw: amcl(a, b, taus, beta=0.05, top_k=3, **kw)  # noqa: E731
  helpers.assert_reductions_agree(loss, [x, y], 12)
  helpers.assert_reductions_agree(loss, [x, y], 12, mask=np.array([1, 1, 0, 1, 0, 1], bool))
  per = np.asarray(loss(x, y, reduction="none"))
  np.testing.assert_allclose(per.mean(), ref_amcl(x, y, taus, 0.05, 3), rtol=1e-5)


def test_amcl_bad_mask_or_reduction_names_the_argument():
  z, taus = ONES((4, 2, 3)), ONES((2, 8, 8))
  with pytest.raises(ValueError, match=r"`reduction`"):
    amcl(z, z, taus, reduction="max")
  with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\)"):
    amcl(z, z, taus, mask=np.ones(8, bool))


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_isogclr_padded_batch_with_mask_equals_unpadded_batch_and_keeps_padding_state(impl, monkeypatch):
  """Loss and gradients of the unpadded batch, zero gradients on the padding; the state of the valid
  ids as after the unpadded step, every other entry (the padding rows' ids, one of them also a valid
  id's) unchanged."""
  from jaxcl.ops import blockwise
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 2)
  x, y = randn(50, 4, 3), randn(51, 4, 3)
  ids = np.array([4, 0, 7, 1], np.int32)
  state = _state(2)
  (px, py), mask = helpers.pad_batch(3, [x, y], 3)
  pids = np.zeros(7, np.int32)
  pids[mask], pids[~mask] = ids, [2, 3, 4]  # 4 is also a valid row's id: the padding must not write it

  def step(a, b, i, **kw):
    return isogclr(a, b, i, state, impl=impl, **ISO, **kw)

  (want, want_state), want_g = jax.value_and_grad(step, argnums=(0, 1), has_aux=True)(x, y, ids)
  (got, got_state), got_g = jax.jit(jax.value_and_grad(
      lambda a, b: step(a, b, pids, mask=jnp.asarray(mask)), argnums=(0, 1), has_aux=True))(px, py)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g)[mask], w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g)[~mask] == 0)
  for got_arr, want_arr, name in zip(got_state, want_state, IsogclrState._fields):
    # float32, summed in another order with the padding rows: a few ulp (1.1e-6 seen).
    np.testing.assert_allclose(np.asarray(got_arr), np.asarray(want_arr), rtol=5e-6, err_msg=name)
  unchanged = np.setdiff1d(np.arange(9), ids)  # includes 2 and 3, the padding's own ids
  for got_arr, old, name in zip(got_state, state, IsogclrState._fields):
    np.testing.assert_array_equal(np.asarray(got_arr)[unchanged], np.asarray(old)[unchanged], err_msg=name)


def test_isogclr_reductions_agree():
  x, y, ids, state = randn(52, 5, 3), randn(53, 5, 3), np.array([3, 0, 8, 1, 5], np.int32), _state(3)
  loss = lambda a, b, **kw: isogclr(a, b, ids, state, **ISO, **kw).loss  # noqa: E731
  helpers.assert_reductions_agree(loss, [x, y], 10)
  helpers.assert_reductions_agree(loss, [x, y], 10, mask=np.array([1, 0, 1, 1, 1], bool))


def test_isogclr_bad_mask_or_reduction_names_the_argument():
  z, ids = ONES((4, 3)), np.arange(4)
  with pytest.raises(ValueError, match=r"`reduction`"):
    isogclr(z, z, ids, isogclr_state(8), reduction="max")
  with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\)"):
    isogclr(z, z, ids, isogclr_state(8), mask=np.ones(5, bool))
  with pytest.raises(TypeError, match=r"`mask` must be a boolean array"):
    isogclr(z, z, ids, isogclr_state(8), mask=np.ones(4))


SHARDED = [("ring", 3), ("allgather", 8)]


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_focal_clip_sharded_equals_dense(impl, n_devices):
  """Over 3 (ring) and 8 (allgather) devices, plain and with padding pairs: the dense loss and gradients."""
  image, text = randn(0, 24, 8), randn(1, 24, 8)
  mask = jnp.arange(24) % 5 != 3
  loss = lambda i, t, *m, **kw: focal_clip(i, t, logit_scale=3.0, gamma=1.5, mask=m[0] if m else None, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(loss, [image, text], impl=impl, n_devices=n_devices)
  helpers.assert_sharded_equals_dense(loss, [image, text, mask], impl=impl, n_devices=n_devices)


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_isogclr_sharded_equals_dense(impl, n_devices):
  """z1, z2, ids and the mask split over 3 (ring) and 8 (allgather) devices, the state replicated: the
  dense loss and gradients (with padding on 3 devices, without on 8); on 8 devices also the full
  updated state of a padded batch, the same on every device."""
  x, y = randn(0, 24, 8), randn(1, 24, 8)
  ids = jnp.asarray(np.random.default_rng(2).permutation(30)[:24].astype(np.int32))
  state = _state(0, n=30)._replace(log_u=jnp.where(jnp.arange(30) % 3 == 0, -jnp.inf, jnp.log(0.5 + jnp.arange(30) / 30)))
  mask = jnp.arange(24) % 5 != 3
  loss = lambda a, b, i, *m, **kw: isogclr(a, b, i, state, mask=m[0] if m else None, **ISO, **kw).loss  # noqa: E731
  padding = [mask] if impl == "ring" else []
  helpers.assert_sharded_equals_dense(loss, [x, y, ids, *padding], impl=impl, n_devices=n_devices)
  if impl == "ring":
    return  # the state update reads the same reductions: checked once, on 8 devices
  mesh = helpers.device_mesh(n_devices)
  got = jax.jit(lambda a, b: isogclr(a, b, ids, state, mask=mask, impl=impl, mesh=mesh, **ISO))(x, y).state
  want = isogclr(x, y, ids, state, mask=mask, impl="dense", **ISO).state
  for g, w, name in zip(got, want, IsogclrState._fields):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------- iSogCLR, bimodal
def _clip_state(seed, n=9):
  """A seen/unseen mix: log u = −inf at ids 1 and 4 (first visit), moderate temperatures."""
  rng = np.random.default_rng(seed)
  log_u = np.log(rng.uniform(0.5, 3.0, (2, n))).astype(np.float32)
  log_u[:, [1, 4]] = -np.inf
  tau = rng.uniform(0.1, 0.6, (2, n)).astype(np.float32)
  tau_grad = rng.normal(0, 0.5, (2, n)).astype(np.float32)
  return IsogclrClipState(*(jnp.asarray(a[m]) for m in range(2) for a in (log_u, tau, tau_grad)))


def _linear_u(state):
  """The reference's state: u = exp(log u) (0 where unseen)."""
  return [np.exp(np.asarray(a, np.float64)) if "log_u" in name else np.asarray(a, np.float64)
          for a, name in zip(state, IsogclrClipState._fields)]


def test_isogclr_clip_matches_reference_loss_gradient_and_state():
  x, y = randn(70, 5, 3), randn(71, 5, 3)
  ids = np.array([4, 0, 7, 1, 2], np.int32)
  state = _clip_state(0)
  want_loss, weights, want_state = ref_isogclr_clip_step(
      x.astype(np.float64), y.astype(np.float64), ids, _linear_u(state), **ISO)
  assert_value_and_grads(
      lambda a, b: isogclr_clip(a, b, ids, state, **ISO).loss,
      lambda a, b: ref_isogclr_clip_surrogate(a, b, weights),
      [x, y],
  )
  loss, new_state = jax.jit(lambda a, b: isogclr_clip(a, b, ids, state, **ISO))(x, y)
  np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
  for got, want, name in zip(_linear_u(new_state), want_state, IsogclrClipState._fields):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_isogclr_clip_with_gamma_one_is_tau_times_decoupled_clip_and_its_exact_tau_derivative():
  """γ = 1 (u = g): the loss's gradient is τ ∇ of the decoupled CLIP loss (the positive out of the
  denominator), one τ for every pair; with β = 1 the stored tau_grad is ∇_τ, the τ-derivative of the
  anchor's term of F (finite differences of the float64 reference)."""
  x, y = randn(72, 5, 4), randn(73, 5, 4)
  ids, tau, rho = jnp.array([0, 2, 4, 6, 7]), 0.3, 6.0
  state = isogclr_clip_state(8, tau_init=tau)._replace(image_log_u=jnp.zeros(8))  # seen: γ = 1 overrides

  def decoupled_clip(a, b):
    a, b = (v / jnp.linalg.norm(v, axis=1, keepdims=True) for v in (a, b))
    c = a @ b.T / tau
    off = jnp.where(jnp.eye(5, dtype=bool), -jnp.inf, c)
    pos = jnp.diag(c)
    return 0.5 * jnp.mean(jax.nn.logsumexp(off, axis=1) - pos + jax.nn.logsumexp(off, axis=0) - pos)

  (_, new_state), g_iso = jax.jit(jax.value_and_grad(
      lambda a, b: isogclr_clip(a, b, ids, state, gamma=1.0, rho=rho, beta=1.0), argnums=(0, 1), has_aux=True))(x, y)
  g_dcl = jax.jit(jax.grad(decoupled_clip, argnums=(0, 1)))(x, y)
  for gi, gd in zip(g_iso, g_dcl):
    np.testing.assert_allclose(gi, tau * np.asarray(gd), rtol=1e-4, atol=1e-6)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  for i in (0, 3):
    want = (ref_isogclr_clip_objective_term(x64, y64, i, tau + 1e-5, rho)
            - ref_isogclr_clip_objective_term(x64, y64, i, tau - 1e-5, rho)) / 2e-5
    np.testing.assert_allclose(float(new_state.image_tau_grad[ids[i]]), want, rtol=1e-4)


def test_isogclr_clip_stays_finite_where_the_linear_u_overflows_float32():
  """τ = 0.005 and a negative 0.9 above the positive: e^{h/τ} = e^{180}; log u, the loss and its
  gradient stay finite and log u is the float64 value."""
  image = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  text = jnp.array([[0.1, 1.0], [1.0, 0.05], [1.0, 1.0]])
  state = isogclr_clip_state(3, tau_init=0.005)
  (loss, new_state), grads = jax.jit(jax.value_and_grad(
      lambda a: isogclr_clip(a, text, jnp.arange(3), state), has_aux=True))(image)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grads)))
  c = normalize(np.asarray(image, np.float64)) @ normalize(np.asarray(text, np.float64)).T
  h = c[0, 1:] - c[0, 0]
  want = logsumexp(h / 0.005) - np.log(2)
  np.testing.assert_allclose(float(new_state.image_log_u[0]), want, rtol=1e-5)
  assert want > 100  # e^want overflows float32


def test_isogclr_clip_returns_a_named_output_and_writes_only_the_valid_batch_ids():
  x, y = randn(74, 4, 3), randn(75, 4, 3)
  out = jax.jit(lambda a, b: isogclr_clip(a, b, jnp.array([5, 0, 2, 3]), isogclr_clip_state(6),
                                          mask=jnp.array([True, True, True, False])))(x, y)
  assert isinstance(out, IsogclrClipOutput) and out.loss.shape == () and out.loss.dtype == jnp.float32
  seen = np.array([1, 0, 1, 0, 0, 1], bool)  # id 3 is the padding's
  for arr, name in zip(out.state, IsogclrClipState._fields):
    arr = np.asarray(arr)
    if "log_u" in name:
      assert np.all(np.isfinite(arr[seen])) and np.all(np.isneginf(arr[~seen])), name
    if "tau" in name and "grad" not in name:
      assert np.all((arr >= 0.005) & (arr <= 0.05)) and np.all(arr[~seen] == np.float32(0.01)), name


def test_isogclr_clip_reductions_agree_and_padding_equals_the_unpadded_batch():
  x, y, ids, state = randn(76, 5, 3), randn(77, 5, 3), np.array([3, 0, 8, 1, 5], np.int32), _clip_state(4)
  loss = jax.jit(lambda a, b, reduction="mean", mask=None: isogclr_clip(
      a, b, ids, state, reduction=reduction, mask=mask, **ISO).loss, static_argnames="reduction")
  helpers.assert_reductions_agree(loss, [x, y], 10, mask=np.array([1, 0, 1, 1, 1], bool))
  (px, py), mask = helpers.pad_batch(3, [x, y], 2)
  pids = np.zeros(7, np.int32)
  pids[mask] = ids
  (want, want_g), (got, got_g) = jax.jit(lambda a, b, pa, pb: (
      jax.value_and_grad(lambda a, b: isogclr_clip(a, b, ids, state, **ISO).loss, argnums=(0, 1))(a, b),
      jax.value_and_grad(lambda a, b: isogclr_clip(a, b, pids, state, mask=jnp.asarray(mask), **ISO).loss,
                         argnums=(0, 1))(pa, pb)))(x, y, px, py)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g)[mask], w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g)[~mask] == 0)


def test_isogclr_clip_every_engine_agrees_with_dense():
  """Loss, gradients and state in one compiled program per engine."""
  x, y = randn(78, 6, 4), randn(79, 6, 4)
  state, ids = _clip_state(3, 8), jnp.array([0, 1, 2, 4, 5, 7])
  impls = [i for i in _engines() if i != "auto"]  # auto is one of the others
  step = lambda impl: jax.value_and_grad(  # noqa: E731
      lambda a, b: isogclr_clip(a, b, ids, state, impl=impl, **ISO), argnums=(0, 1), has_aux=True)
  out = jax.jit(lambda a, b: [step(i)(a, b) for i in impls])(x, y)
  (want_value, want_state), want_grads = out[impls.index("dense")]
  for impl, ((value, new_state), grads) in zip(impls, out):
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=impl)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{impl} gradient")
    for got, want, name in zip(new_state, want_state, IsogclrClipState._fields):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_isogclr_clip_sharded_equals_dense(impl, n_devices):
  """image, text, ids (and the mask on 3 devices) split, the state replicated: the dense loss and
  gradients; on 8 devices also the full updated state."""
  x, y = randn(2, 24, 8), randn(3, 24, 8)
  ids = jnp.asarray(np.random.default_rng(4).permutation(30)[:24].astype(np.int32))
  state = _clip_state(1, n=30)
  mask = jnp.arange(24) % 5 != 3
  loss = lambda a, b, i, *m, **kw: isogclr_clip(a, b, i, state, mask=m[0] if m else None, **ISO, **kw).loss  # noqa: E731
  padding = [mask] if impl == "ring" else []
  helpers.assert_sharded_equals_dense(loss, [x, y, ids, *padding], impl=impl, n_devices=n_devices)
  if impl == "ring":
    return
  mesh = helpers.device_mesh(n_devices)
  got = jax.jit(lambda a, b: isogclr_clip(a, b, ids, state, mask=mask, impl=impl, mesh=mesh, **ISO))(x, y).state
  want = isogclr_clip(x, y, ids, state, mask=mask, impl="dense", **ISO).state
  for g, w, name in zip(got, want, IsogclrClipState._fields):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=name)
