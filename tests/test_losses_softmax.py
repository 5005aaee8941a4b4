"""SupCon, MV-InfoNCE, MV-DHEL, CWCL and Symile against float64 NumPy references and identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.multiview import multiview_infonce, mv_dhel
from jaxcl.losses.supcon import supcon
from jaxcl.ops import blockwise
from tests import reference
from tests import reference_more as ref
from tests import helpers
from tests.helpers import randn

assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


def _householder(d: int, seed: int) -> np.ndarray:
  """A symmetric orthogonal matrix I − 2vvᵀ (a reflection)."""
  v = randn(seed, d).astype(np.float64)
  v /= np.linalg.norm(v)
  return np.eye(d) - 2.0 * np.outer(v, v)


def _orthogonal(d: int, seed: int) -> np.ndarray:
  q, _ = np.linalg.qr(randn(seed, d, d).astype(np.float64))
  return q


# ------------------------------------------------------------------------------------------------ SupCon
SUPCON_CASES = [
    # (features shape, labels, temperature)
    ((6, 4), [0, 1, 0, 2, 1, 0], 0.1),
    ((5, 3), [3, 3, 7, 7, 7], 0.5),
    ((4, 2, 5), [0, 1, 2, 3], 0.1),  # two views, distinct labels: positives are the other views
    ((5, 3, 4), [1, 0, 1, 2, 2], 0.5),
    ((6, 4), [9, -4, 9, 100, -4, 5], 0.2),  # sparse/negative values; 100 and 5 have no positive
]


@pytest.mark.parametrize("shape,labels,temperature", SUPCON_CASES)
def test_supcon_matches_reference(shape, labels, temperature):
  labels = np.array(labels, np.int32)
  assert_value_and_grads(
      lambda f: supcon(f, labels, temperature=temperature),
      lambda f: ref.supcon(f, labels, temperature),
      [randn(1, *shape)],
  )


def test_supcon_base_temperature_and_unnormalized_match_reference():
  f, labels = randn(2, 6, 2, 3), np.array([0, 1, 1, 0, 2, 2])
  assert_value_and_grads(
      lambda x: supcon(x, labels, temperature=0.2, base_temperature=0.07),
      lambda x: ref.supcon(x, labels, 0.2, base_temperature=0.07),
      [f],
  )
  assert_value_and_grads(
      lambda x: supcon(x, labels, temperature=2.0, normalize=False),
      lambda x: ref.supcon(x, labels, 2.0, normalize_=False),
      [0.3 * f],
  )


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16)])
def test_supcon_two_views_distinct_labels_is_nt_xent(b, d):
  # Distinct labels: each anchor's only positive is its other view and the denominator is every other
  # view, which is exactly NT-Xent over [z1; z2].
  z1, z2 = randn(3, b, d), randn(4, b, d)
  got = jax.jit(lambda a, c: supcon(jnp.stack([a, c], axis=1), np.arange(b), temperature=0.3))(z1, z2)
  want = jax.jit(lambda a, c: nt_xent(a, c, temperature=0.3))(z1, z2)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_supcon_is_invariant_to_label_values_and_sample_order():
  f, labels = randn(5, 7, 2, 4), np.array([0, 1, 1, 2, 0, 2, 1])
  loss = jax.jit(supcon)
  base = float(loss(f, labels))
  relabelled = np.array([50, -3, -3, 7, 50, 7, -3])
  np.testing.assert_allclose(float(loss(f, relabelled)), base, rtol=1e-6)
  perm = np.random.default_rng(0).permutation(7)
  np.testing.assert_allclose(float(loss(f[perm], labels[perm])), base, rtol=1e-5)


def test_supcon_anchors_without_positive_are_left_out():
  # Label 2 is a singleton: its anchor is dropped, so the loss is the mean over the other five anchors.
  f, labels = randn(6, 6, 3), np.array([0, 0, 1, 1, 0, 2])
  z = reference.normalize(f)
  s = z @ z.T / 0.1
  per_anchor = []
  for a in range(5):
    pos = [p for p in range(6) if p != a and labels[p] == labels[a]]
    per_anchor.append(reference.logsumexp(np.delete(s[a], a)) - np.mean(s[a, pos]))
  got = jax.jit(lambda x: supcon(x, labels))(f)
  np.testing.assert_allclose(float(got), np.mean(per_anchor), rtol=1e-5)


def test_supcon_without_any_positive():
  f = randn(7, 4, 3)
  with pytest.raises(ValueError, match="no anchor has a positive"):
    supcon(f, np.arange(4))
  # Labels only known at run time: no error is possible, the empty mean is 0.
  value, g = jax.jit(jax.value_and_grad(supcon))(jnp.asarray(f), jnp.arange(4))
  assert float(value) == 0.0
  assert np.all(np.asarray(g) == 0.0)


def test_supcon_traced_labels_match_concrete():
  f, labels = randn(8, 6, 2, 3), jnp.array([2, 0, 2, 1, 1, 0])
  want = ref.supcon(f, np.asarray(labels))
  np.testing.assert_allclose(float(jax.jit(supcon)(f, labels)), want, rtol=1e-5)


# ------------------------------------------------------------------------------------- multi-view losses
VIEW_CASES = [((2, 3, 4), 0.1), ((3, 4, 5), 0.5), ((4, 2, 3), 0.1), ((3, 5, 2), 0.7)]


@pytest.mark.parametrize("shape,temperature", VIEW_CASES)
def test_multiview_infonce_matches_reference(shape, temperature):
  assert_value_and_grads(
      lambda v: multiview_infonce(v, temperature=temperature),
      lambda v: ref.multiview_infonce(v, temperature),
      [randn(10, *shape)],
  )


@pytest.mark.parametrize("shape,temperature", VIEW_CASES)
def test_mv_dhel_matches_reference(shape, temperature):
  assert_value_and_grads(
      lambda v: mv_dhel(v, temperature=temperature),
      lambda v: ref.mv_dhel(v, temperature),
      [randn(11, *shape)],
  )


def test_multiview_unnormalized_matches_reference():
  v = 0.4 * randn(12, 3, 4, 3)
  assert_value_and_grads(
      lambda x: multiview_infonce(x, temperature=1.0, normalize=False),
      lambda x: ref.multiview_infonce(x, 1.0, normalize_=False),
      [v],
  )
  assert_value_and_grads(
      lambda x: mv_dhel(x, temperature=1.0, normalize=False),
      lambda x: ref.mv_dhel(x, 1.0, normalize_=False),
      [v],
  )


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16)])
def test_multiview_infonce_two_views_closed_form(b, d):
  # V = 2: loss = mean_i [−p_i + log ½(e^{a_i} + e^{b_i})] with a_i, b_i the NT-Xent log-denominators.
  z1, z2 = randn(13, b, d), randn(14, b, d)
  p, a, c = ref.nt_xent_pieces(z1, z2, 0.2)
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
  z1 = reference.normalize(randn(15, b, d))
  z2 = z1 @ _householder(d, 16)
  _, a, c = ref.nt_xent_pieces(z1, z2, 0.3)
  np.testing.assert_allclose(a, c, rtol=1e-12)
  both = lambda a, c: (multiview_infonce(jnp.stack([a, c]), temperature=0.3), nt_xent(a, c, temperature=0.3))
  got, want = jax.jit(both)(z1.astype(np.float32), z2.astype(np.float32))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_mv_dhel_uniformity_is_decoupled_per_view():
  # Rotating a whole view leaves its within-view similarities unchanged: only the alignment term moves.
  views = reference.normalize(randn(17, 3, 5, 4))
  turned = views.copy()
  turned[1] = views[1] @ _orthogonal(4, 18)

  def alignment(u):
    pairs = [(l, m) for l in range(3) for m in range(3) if m != l]
    per_instance = [np.array([u[l, i] @ u[m, i] / 0.2 for l, m in pairs]) for i in range(5)]
    return np.mean([reference.logsumexp(logits) for logits in per_instance])

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


# -------------------------------------------------------------------------------------------------- CWCL
@pytest.mark.parametrize("b,d,temperature", [(2, 3, 0.1), (5, 4, 0.7), (4, 9, 0.1), (6, 2, 0.3)])
def test_cwcl_matches_reference(b, d, temperature):
  frozen, trained = randn(20, b, d), randn(21, b, d)
  got, (g_f, g_t) = jax.jit(
      jax.value_and_grad(lambda f, t: cwcl(f, t, temperature=temperature), argnums=(0, 1))
  )(frozen, trained)
  np.testing.assert_allclose(float(got), ref.cwcl(frozen, trained, temperature), rtol=2e-5)
  # The weights are targets (no gradient): differentiate the reference with the weights held fixed.
  w = ref.cwcl_weights(frozen)
  for g, x, f in [
      (g_f, frozen, lambda x: ref.cwcl(x, trained, temperature, weights=w)),
      (g_t, trained, lambda x: ref.cwcl(frozen, x, temperature)),
  ]:
    want = reference.numerical_grad(f, x)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(g) / scale, want / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b,d", [(3, 4), (6, 2)])
def test_cwcl_explicit_weights_match_reference(b, d):
  w = np.random.default_rng(22).uniform(0.0, 1.0, (b, b)).astype(np.float32)
  assert_value_and_grads(
      lambda f, t, weights: cwcl(f, t, temperature=0.3, weights=weights),
      lambda f, t, weights: ref.cwcl(f, t, 0.3, weights=weights),
      [randn(23, b, d), randn(24, b, d), w],
  )


def test_cwcl_unnormalized_matches_reference():
  frozen, trained = 0.5 * randn(25, 5, 3), 0.5 * randn(26, 5, 3)
  got = jax.jit(lambda f, t: cwcl(f, t, temperature=1.0, normalize=False))(frozen, trained)
  np.testing.assert_allclose(float(got), ref.cwcl(frozen, trained, 1.0, normalize_=False), rtol=2e-5)


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
    w = ref.cwcl_weights(frozen).astype(np.float32)
    explicit, implicit = jax.jit(lambda f, t, w: (cwcl(f, t, weights=w), cwcl(f, t)))(frozen, trained, w)
    np.testing.assert_allclose(float(explicit), float(implicit), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Symile
@pytest.mark.parametrize("m,n,d", [(2, 5, 4), (3, 2, 3), (3, 5, 4), (4, 4, 3)])
def test_symile_matches_reference(m, n, d):
  mods = [randn(40 + k, n, d) for k in range(m)]
  assert_value_and_grads(
      lambda *xs: symile(*xs, logit_scale=8.0),
      lambda *xs: ref.symile(*xs, logit_scale=8.0),
      mods,
  )


def test_symile_unnormalized_and_learnable_scale():
  mods = [0.7 * randn(50 + k, 4, 3) for k in range(3)]
  got = jax.jit(lambda *xs: symile(*xs, logit_scale=2.0, normalize=False))(*mods)
  np.testing.assert_allclose(float(got), ref.symile(*mods, logit_scale=2.0, normalize_=False), rtol=2e-5)
  g = jax.jit(jax.grad(lambda s: symile(*mods, logit_scale=s)))(5.0)
  want = reference.numerical_grad(lambda s: ref.symile(*mods, logit_scale=s[()]), np.array(5.0))
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


# ------------------------------------------------------------------------------------- engines (impl=)
def test_every_available_engine_agrees_with_dense():
  # Values and gradients of every loss under every registered engine against the dense engine; the
  # masks (exclude=diagonal, include=view ids) and per-modality contexts go through each engine.
  f, labels = randn(60, 6, 2, 4), np.array([0, 1, 0, 2, 1, 2])
  views = randn(61, 3, 4, 4)
  x, y, z = randn(62, 5, 4), randn(63, 5, 4), randn(64, 5, 4)
  calls = {
      "supcon": (lambda impl: lambda a: supcon(a, labels, temperature=0.2, impl=impl), (f,)),
      "multiview_infonce": (lambda impl: lambda a: multiview_infonce(a, impl=impl), (views,)),
      "mv_dhel": (lambda impl: lambda a: mv_dhel(a, temperature=0.2, impl=impl), (views,)),
      "cwcl": (lambda impl: lambda a, b: cwcl(a, b, impl=impl), (x, y)),
      "symile": (lambda impl: lambda a, b, c: symile(a, b, c, logit_scale=10.0, impl=impl), (x, y, z)),
  }
  impls = helpers.engines()
  for name, (make, args) in calls.items():
    argnums = tuple(range(len(args)))
    # One compiled program per loss evaluating every engine side by side.
    out = jax.jit(lambda *xs: [jax.value_and_grad(make(i), argnums=argnums)(*xs) for i in impls])(*args)
    want_value, want_grads = out[impls.index("dense")]
    for impl, (value, grads) in zip(impls, out):
      np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=f"{name} {impl}")
      for g, want in zip(grads, want_grads):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")


# --------------------------------------------------------------------------- transforms, dtypes, extremes
# Each entry: (loss of float arrays, its float64 reference, input shapes).
LABELS = jnp.array([0, 1, 0, 1, 2, 2])
LOSSES = {
    "supcon": (
        lambda x: supcon(x, LABELS, temperature=0.1),
        lambda x: ref.supcon(x, np.asarray(LABELS), 0.1),
        [(6, 2, 8)],
    ),
    "supcon_single_view": (
        lambda x: supcon(x, LABELS, temperature=0.1),
        lambda x: ref.supcon(x, np.asarray(LABELS), 0.1),
        [(6, 8)],
    ),
    "multiview_infonce": (
        lambda v: multiview_infonce(v, temperature=0.1),
        lambda v: ref.multiview_infonce(v, 0.1),
        [(3, 6, 8)],
    ),
    "mv_dhel": (lambda v: mv_dhel(v, temperature=0.1), lambda v: ref.mv_dhel(v, 0.1), [(3, 6, 8)]),
    "cwcl": (lambda f, t: cwcl(f, t, temperature=0.1), lambda f, t: ref.cwcl(f, t, 0.1), [(6, 8)] * 2),
    "symile": (
        lambda a, b, c: symile(a, b, c, logit_scale=20.0),
        lambda a, b, c: ref.symile(a, b, c, logit_scale=20.0),
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
    "supcon": (
        lambda x: supcon(x, LABELS, temperature=0.01),
        lambda x: ref.supcon(x, np.asarray(LABELS), 0.01),
        [(6, 2, 8)],
    ),
    "multiview_infonce": (
        lambda v: multiview_infonce(v, temperature=0.01),
        lambda v: ref.multiview_infonce(v, 0.01),
        [(3, 6, 8)],
    ),
    "mv_dhel": (lambda v: mv_dhel(v, temperature=0.01), lambda v: ref.mv_dhel(v, 0.01), [(3, 6, 8)]),
    "cwcl": (lambda f, t: cwcl(f, t, temperature=0.01), lambda f, t: ref.cwcl(f, t, 0.01), [(6, 8)] * 2),
    "symile": (
        lambda *xs: symile(*xs, logit_scale=1000.0),
        lambda *xs: ref.symile(*xs, logit_scale=1000.0),
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


def test_traced_temperature_is_accepted():
  views = randn(105, 3, 4, 5)
  f = jax.jit(lambda t: mv_dhel(views, temperature=t))
  np.testing.assert_allclose(float(f(0.5)), ref.mv_dhel(views, 0.5), rtol=1e-5)
  g = jax.jit(jax.grad(lambda t: cwcl(views[0], views[1], temperature=t)))(0.3)
  want = reference.numerical_grad(lambda t: ref.cwcl(views[0], views[1], t[()]), np.array(0.3))
  np.testing.assert_allclose(g, want, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: supcon(ONES((4,)), np.arange(4)), r"`features` must have rank 2 or rank 3, got shape \(4,\)"),
        (lambda: supcon(ONES((4, 2, 2, 3)), np.arange(4)), r"`features` must have rank 2 or rank 3"),
        (lambda: supcon(ONES((4, 3)), np.arange(5)), r"`labels` must have shape \(4,\), got \(5,\)"),
        (lambda: supcon(ONES((4, 3)), np.zeros((4, 1), np.int32)), r"`labels` must have shape \(4,\)"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.float32)), r"`labels` must have an integer dtype"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), temperature=0.0), r"`temperature` must be positive"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), base_temperature=-1.0), r"`base_temperature` must be positive"),
        (lambda: supcon(ONES((1, 2, 3)), np.zeros(1, np.int32)), r"`features` needs at least 2 examples"),
        (lambda: supcon(np.ones((4, 3), np.int32), np.zeros(4, np.int32)), r"`features` must be a floating-point array"),
        (lambda: supcon(ONES((4, 3)), np.arange(4)), r"no anchor has a positive"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), impl="nope"), r"`impl` must be one of"),
        (lambda: multiview_infonce(ONES((4, 3))), r"`views` must have rank 3, got shape \(4, 3\)"),
        (lambda: multiview_infonce(ONES((1, 4, 3))), r"`views` must hold at least 2 views along axis 0"),
        (lambda: multiview_infonce(ONES((3, 1, 3))), r"`views` needs at least 2 examples along axis 1"),
        (lambda: multiview_infonce(ONES((2, 4, 3)), temperature=-0.1), r"`temperature` must be positive"),
        (lambda: mv_dhel(ONES((1, 4, 3))), r"`views` must hold at least 2 views"),
        (lambda: mv_dhel(ONES((2, 1, 3))), r"`views` needs at least 2 examples along axis 1"),
        (lambda: mv_dhel(ONES((2, 4, 3)), temperature=0.0), r"`temperature` must be positive"),
        (lambda: mv_dhel(np.ones((2, 4, 3), np.int32)), r"`views` must be a floating-point array"),
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


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="at least 2 views"):
    jax.jit(mv_dhel)(jnp.ones((1, 4, 3)))
  with pytest.raises(ValueError, match="same shape"):
    jax.jit(lambda a, b: symile(a, b, logit_scale=2.0))(jnp.ones((4, 3)), jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"`labels` must have shape"):
    jax.jit(supcon)(jnp.ones((4, 3)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"`weights` must have shape"):
    jax.jit(lambda f, t, w: cwcl(f, t, weights=w))(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((3, 3)))



@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas"])
@pytest.mark.parametrize("views", [1, 2])
def test_supcon_padded_batch_with_mask_equals_unpadded_batch(impl, views, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  features = randn(90, 6, 4) if views == 1 else randn(90, 6, views, 4)
  labels = np.array([0, 1, 0, 1, 2, 3], np.int32)  # label 3 has no positive with one view
  loss = lambda f, y, **kw: supcon(f, y, temperature=0.1, base_temperature=0.07, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [features, labels], n_diff=1)


def test_supcon_reduction_none_and_sum():
  features, labels = jnp.asarray(randn(91, 5, 2, 4)), jnp.array([0, 1, 0, 2, 2])
  mask = jnp.array([True, True, False, True, True])
  for kw in ({}, {"mask": mask}):
    per = np.asarray(supcon(features, labels, reduction="none", **kw), np.float64)
    assert per.shape == (10,)
    valid = np.ones(10, bool) if not kw else np.tile(np.asarray(mask), 2)
    assert np.all(per[~valid] == 0)
    # two views: every valid anchor has a positive, so the mean runs over all valid anchors
    np.testing.assert_allclose(per.sum() / valid.sum(), float(supcon(features, labels, **kw)), rtol=1e-6)
    np.testing.assert_allclose(float(supcon(features, labels, reduction="sum", **kw)), per.sum(), rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("fn", [multiview_infonce, mv_dhel], ids=["multiview_infonce", "mv_dhel"])
def test_multiview_padded_batch_with_mask_equals_unpadded_batch(fn, impl, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 4)
  by_instance = randn(120, 5, 3, 4)  # (B, V, D): the helper pads along the instances
  loss = lambda x, **kw: fn(jnp.swapaxes(x, 0, 1), temperature=0.2, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [by_instance], rtol=2e-6)
  helpers.assert_reductions_agree(loss, [by_instance], 5)
  helpers.assert_reductions_agree(loss, [by_instance], 5, mask=np.array([1, 0, 1, 1, 1], bool))


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
