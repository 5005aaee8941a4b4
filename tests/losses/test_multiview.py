"""Tests of jaxcl/losses/multiview.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.multiview import multiview_infonce, mv_dhel
from jaxcl.losses.supcon import supcon
from jaxcl.ops import blockwise
from tests import helpers
from tests.helpers import randn
from tests.losses import reference


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


def _householder(d: int, seed: int) -> np.ndarray:
  """A symmetric orthogonal matrix I − 2vvᵀ (a reflection)."""
  v = randn(seed, d).astype(np.float64)
  v /= np.linalg.norm(v)
  return np.eye(d) - 2.0 * np.outer(v, v)


def _orthogonal(d: int, seed: int) -> np.ndarray:
  q, _ = np.linalg.qr(randn(seed, d, d).astype(np.float64))
  return q


# ------------------------------------------------------------------------------------- multi-view losses
VIEW_CASES = [((2, 3, 4), 0.1), ((3, 4, 5), 0.5), ((4, 2, 3), 0.1), ((3, 5, 2), 0.7)]


@pytest.mark.parametrize("shape,temperature", VIEW_CASES)
def test_multiview_infonce_matches_reference(shape, temperature):
  assert_value_and_grads(
      lambda v: multiview_infonce(v, temperature=temperature),
      lambda v: reference.multiview.multiview_infonce(v, temperature),
      [randn(10, *shape)],
  )


@pytest.mark.parametrize("shape,temperature", VIEW_CASES)
def test_mv_dhel_matches_reference(shape, temperature):
  assert_value_and_grads(
      lambda v: mv_dhel(v, temperature=temperature),
      lambda v: reference.multiview.mv_dhel(v, temperature),
      [randn(11, *shape)],
  )


def test_multiview_unnormalized_matches_reference():
  v = 0.4 * randn(12, 3, 4, 3)
  assert_value_and_grads(
      lambda x: multiview_infonce(x, temperature=1.0, normalize=False),
      lambda x: reference.multiview.multiview_infonce(x, 1.0, normalize_=False),
      [v],
  )
  assert_value_and_grads(
      lambda x: mv_dhel(x, temperature=1.0, normalize=False),
      lambda x: reference.multiview.mv_dhel(x, 1.0, normalize_=False),
      [v],
  )


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16)])
def test_multiview_infonce_two_views_closed_form(b, d):
  # V = 2: loss = mean_i [−p_i + log ½(e^{a_i} + e^{b_i})] with a_i, b_i the NT-Xent log-denominators.
  z1, z2 = randn(13, b, d), randn(14, b, d)
  p, a, c = reference.multiview.nt_xent_pieces(z1, z2, 0.2)
  want = np.mean(-p + np.logaddexp(a, c) - np.log(2.0))
  both = lambda a, c: (multiview_infonce(jnp.stack([a, c]), temperature=0.2), nt_xent(a, c, temperature=0.2))
  got, nt = jax.jit(both)(z1, z2)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Jensen: never below NT-Xent, and strictly above when a_i ≠ b_i.
  assert float(got) > float(nt)


@pytest.mark.parametrize("b,d", [(2, 3), (6, 5)])
def test_multiview_infonce_equals_nt_xent_when_view_denominators_coincide(b, d):
  # z2 = z1 H with H a reflection (symmetric orthogonal): the two views' NT-Xent denominators are equal
  # per instance, so the log of the mean is the mean of the logs and V = 2 MV-InfoNCE is NT-Xent.
  z1 = reference.common.normalize(randn(15, b, d))
  z2 = z1 @ _householder(d, 16)
  _, a, c = reference.multiview.nt_xent_pieces(z1, z2, 0.3)
  np.testing.assert_allclose(a, c, rtol=1e-12)
  both = lambda a, c: (multiview_infonce(jnp.stack([a, c]), temperature=0.3), nt_xent(a, c, temperature=0.3))
  got, want = jax.jit(both)(z1.astype(np.float32), z2.astype(np.float32))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_mv_dhel_uniformity_is_decoupled_per_view():
  # Rotating a whole view leaves its within-view similarities unchanged: only the alignment term moves.
  views = reference.common.normalize(randn(17, 3, 5, 4))
  turned = views.copy()
  turned[1] = views[1] @ _orthogonal(4, 18)

  def alignment(u):
    pairs = [(l, m) for l in range(3) for m in range(3) if m != l]
    per_instance = [np.array([u[l, i] @ u[m, i] / 0.2 for l, m in pairs]) for i in range(5)]
    return np.mean([reference.common.logsumexp(logits) for logits in per_instance])

  both = jax.jit(lambda u: (mv_dhel(u, temperature=0.2), multiview_infonce(u, temperature=0.2)))
  (dhel_0, mv_0), (dhel_1, mv_1) = both(views.astype(np.float32)), both(turned.astype(np.float32))
  delta = float(dhel_1) - float(dhel_0)
  np.testing.assert_allclose(delta, alignment(views) - alignment(turned), rtol=1e-4, atol=1e-5)
  # MV-InfoNCE couples views in its energy: the same rotation changes more than the alignment term.
  delta_mv = float(mv_1) - float(mv_0)
  assert abs(delta_mv - (alignment(views) - alignment(turned))) > 1e-3


@pytest.mark.parametrize("fn", [multiview_infonce, mv_dhel])
def test_multiview_losses_are_symmetric_in_views_and_instances(fn):
  v = randn(19, 4, 5, 3)
  fn = jax.jit(fn)
  base = float(fn(v))
  np.testing.assert_allclose(float(fn(v[::-1])), base, rtol=1e-5)
  np.testing.assert_allclose(float(fn(v[:, ::-1])), base, rtol=1e-5)


def test_identical_views_values():
  # All V views equal, instances orthonormal: every term is known in closed form.
  v, b, t = 3, 4, 0.5
  views = np.stack([np.eye(b, 6)] * v).astype(np.float32)
  e = np.exp(1 / t)
  # MV-InfoNCE: numerator V(V−1)e, denominator V((V−1)e + (B−1)V)
  want_mv = np.log(v * ((v - 1) * e + (b - 1) * v)) - np.log(v * (v - 1) * e)
  np.testing.assert_allclose(float(jax.jit(multiview_infonce)(views, temperature=t)), want_mv, rtol=1e-5)
  # MV-DHEL: V · log(B − 1) − log(V(V−1)e)
  want_dhel = v * np.log(b - 1) - np.log(v * (v - 1) * e)
  np.testing.assert_allclose(float(jax.jit(mv_dhel)(views, temperature=t)), want_dhel, rtol=1e-5)


# --------------------------------------------------------------------------- transforms, dtypes, extremes
# Each entry: (loss of float arrays, its float64 reference, input shapes).
LABELS = jnp.array([0, 1, 0, 1, 2, 2])


LOSSES = {
    "multiview_infonce": (
        lambda v: multiview_infonce(v, temperature=0.1),
        lambda v: reference.multiview.multiview_infonce(v, 0.1),
        [(3, 6, 8)],
    ),
    "mv_dhel": (lambda v: mv_dhel(v, temperature=0.1), lambda v: reference.multiview.mv_dhel(v, 0.1), [(3, 6, 8)]),
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
    "multiview_infonce": (
        lambda v: multiview_infonce(v, temperature=0.01),
        lambda v: reference.multiview.multiview_infonce(v, 0.01),
        [(3, 6, 8)],
    ),
    "mv_dhel": (lambda v: mv_dhel(v, temperature=0.01), lambda v: reference.multiview.mv_dhel(v, 0.01), [(3, 6, 8)]),
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


def test_traced_temperature_is_accepted():
  views = randn(105, 3, 4, 5)
  f = jax.jit(lambda t: mv_dhel(views, temperature=t))
  np.testing.assert_allclose(float(f(0.5)), reference.multiview.mv_dhel(views, 0.5), rtol=1e-5)
  g = jax.jit(jax.grad(lambda t: cwcl(views[0], views[1], temperature=t)))(0.3)
  want = reference.common.numerical_grad(lambda t: reference.crossmodal.cwcl(views[0], views[1], t[()]), np.array(0.3))
  np.testing.assert_allclose(g, want, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: multiview_infonce(ONES((4, 3))), r"`views` must have rank 3, got shape \(4, 3\)"),
        (lambda: multiview_infonce(ONES((1, 4, 3))), r"`views` must hold at least 2 views along axis 0"),
        (lambda: multiview_infonce(ONES((3, 1, 3))), r"`views` needs at least 2 examples along axis 1"),
        (lambda: multiview_infonce(ONES((2, 4, 3)), temperature=-0.1), r"`temperature` must be positive"),
        (lambda: mv_dhel(ONES((1, 4, 3))), r"`views` must hold at least 2 views"),
        (lambda: mv_dhel(ONES((2, 1, 3))), r"`views` needs at least 2 examples along axis 1"),
        (lambda: mv_dhel(ONES((2, 4, 3)), temperature=0.0), r"`temperature` must be positive"),
        (lambda: mv_dhel(np.ones((2, 4, 3), np.int32)), r"`views` must be a floating-point array"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="at least 2 views"):
    jax.jit(mv_dhel)(jnp.ones((1, 4, 3)))
  with pytest.raises(ValueError, match="same shape"):
    jax.jit(lambda a, b: symile(a, b, logit_scale=2.0))(jnp.ones((4, 3)), jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"`labels` must have shape"):
    jax.jit(supcon)(jnp.ones((4, 3)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"`weights` must have shape"):
    jax.jit(lambda f, t, w: cwcl(f, t, weights=w))(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((3, 3)))


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("fn", [multiview_infonce, mv_dhel], ids=["multiview_infonce", "mv_dhel"])
def test_multiview_padded_batch_with_mask_equals_unpadded_batch(fn, impl, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 4)
  by_instance = randn(120, 5, 3, 4)  # (B, V, D): the helper pads along the instances
  loss = lambda x, **kw: fn(jnp.swapaxes(x, 0, 1), temperature=0.2, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [by_instance], rtol=2e-6)
  helpers.assert_reductions_agree(loss, [by_instance], 5)
  helpers.assert_reductions_agree(loss, [by_instance], 5, mask=np.array([1, 0, 1, 1, 1], bool))


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
@pytest.mark.parametrize("fn", [multiview_infonce, mv_dhel], ids=["multiview_infonce", "mv_dhel"])
def test_sharded_equals_dense(fn, impl, n_devices, masked):
  """The instances (axis 1 of the views) split over 3 or 8 devices (a padded batch on 8): the value and
  gradients of the one-device loss."""
  views = randn(121, 3, 24, 4)
  mask = np.arange(24) % 5 != 2
  loss = lambda v, m, **kw: fn(v, temperature=0.3, mask=m if masked else None, **kw)
  helpers.assert_sharded_equals_dense(loss, [views, mask], impl=impl, n_devices=n_devices)
