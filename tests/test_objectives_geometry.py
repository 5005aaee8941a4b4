"""Geometric objectives (CACR, contrastive gap, MERU, GRAM, 2D Matryoshka / Starbucks, CSR) against
independent float64 NumPy references written here from the papers' formulas with explicit loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.losses.clip import clip
from jaxcl.losses.geometric import cacr, contrastive_gap
from jaxcl.losses.alignment_uniformity import alignment
from jaxcl.ops import pallas
from tests import reference
from tests.helpers import assert_value_and_grads, randn

normalize = reference.normalize
logsumexp = reference.logsumexp


def check(jax_loss, np_loss, args, **tolerances):
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# ----------------------------------------------------------------------------------------------- CACR
def ref_cacr(views, alpha=1.0, beta=1.0, t_pos=1.0, t_neg=1.0, normalize_=True):
  z = normalize(views) if normalize_ else np.asarray(views, np.float64)
  v, b = z.shape[:2]
  attraction = 0.0
  for x in range(v):
    for i in range(b):
      others = [u for u in range(v) if u != x]
      cost = np.array([np.sum((z[x, i] - z[u, i]) ** 2) for u in others])
      attraction += np.sum(softmax(t_pos * cost) * alpha * cost) / b
  attraction /= v
  repulsion, pairs = 0.0, 0
  for x in range(v):
    for y in range(x + 1, v):
      for i in range(b):
        cost = np.array([np.sum((z[x, i] - z[y, j]) ** 2) for j in range(b) if j != i])
        repulsion += np.sum(softmax(-t_neg * cost) * -beta * cost) / b
      pairs += 1
  return attraction + repulsion / pairs


@pytest.mark.parametrize(
    "v,b,d,kw",
    [
        (2, 4, 3, {}),
        (3, 5, 4, {"t_pos": 2.0, "t_neg": 3.0}),
        (4, 3, 6, {"alpha": 0.5, "beta": 2.0, "t_neg": 0.5}),
    ],
)
def test_cacr_matches_reference(v, b, d, kw):
  check(lambda x: cacr(x, **kw), lambda x: ref_cacr(x, **kw), [randn(v * 10 + b, v, b, d)])


def test_cacr_unnormalized_matches_reference():
  x = 0.5 * randn(3, 3, 4, 5)
  kw = {"t_pos": 0.5, "t_neg": 0.25}
  check(lambda x: cacr(x, normalize=False, **kw), lambda x: ref_cacr(x, normalize_=False, **kw), [x])


def test_cacr_two_views_attraction_is_alignment_and_flat_repulsion_is_mean_distance():
  # With two views the attraction weights are 1: L_CA = α · alignment. As t⁻ → 0 the repulsion weights
  # are uniform over the B − 1 negatives: L_CR = −β mean_{i≠j} ‖z1_i − z2_j‖².
  x = randn(4, 2, 6, 5)
  z = normalize(x)
  sq = np.sum((z[0][:, None] - z[1][None]) ** 2, -1)
  flat = -np.sum(sq[~np.eye(6, dtype=bool)]) / 30
  got = float(jax.jit(lambda x: cacr(x, alpha=2.0, t_neg=1e-7))(x))
  np.testing.assert_allclose(got, 2.0 * float(alignment(x[0], x[1])) + flat, rtol=1e-5)


def test_cacr_repulsion_weights_favour_near_negatives():
  # A negative that is nearer to the anchor gets more transport mass, so a larger t⁻ makes the
  # (negated) repulsion cost less negative.
  x = randn(5, 2, 8, 4)
  f = jax.jit(lambda t: cacr(x, t_neg=t))
  values = [float(f(t)) for t in (0.1, 1.0, 10.0)]
  assert values[0] < values[1] < values[2]


def test_cacr_engines_agree_and_pallas_is_refused():
  x = randn(6, 3, 6, 4)
  f = lambda impl: jax.jit(jax.value_and_grad(lambda v: cacr(v, t_neg=2.0, impl=impl)))
  want_v, want_g = f("dense")(x)
  for impl in ("blockwise", "auto"):
    got_v, got_g = f(impl)(x)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6, err_msg=impl)
  if "pallas" in ops.available_impls():
    with pytest.raises(ValueError, match="impl='pallas'"):
      cacr(x, impl="pallas")
    with pytest.raises(ValueError, match=r"impl=Settings\(.*\(the pallas engine\) cannot compute"):
      cacr(x, impl=pallas.Settings())


def test_cacr_bf16_and_traced_temperature():
  x = randn(7, 3, 6, 8)
  xb = x.astype(jnp.bfloat16)
  value, g = jax.jit(jax.value_and_grad(cacr))(jnp.asarray(xb))
  assert value.dtype == jnp.float32 and g.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(value), ref_cacr(np.asarray(xb, np.float64)), rtol=3e-2, atol=3e-2)
  g_t = jax.jit(jax.grad(lambda t: cacr(x, t_neg=t)))(1.5)
  want = reference.numerical_grad(lambda t: ref_cacr(x, t_neg=t[()]), np.array(1.5))
  np.testing.assert_allclose(g_t, want, rtol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cacr(np.ones((1, 4, 3), np.float32)), r"at least 2 views"),
        (lambda: cacr(np.ones((4, 3), np.float32)), r"`views` must have rank 3"),
        (lambda: cacr(np.ones((2, 1, 3), np.float32)), r"`views` needs at least 2 examples along axis 1"),
        (lambda: cacr(np.ones((2, 4, 3), np.float32), t_neg=0.0), r"`t_neg` must be positive"),
        (lambda: cacr(np.ones((2, 4, 3), np.float32), beta=-1.0), r"`beta` must be positive"),
        (lambda: cacr(np.ones((2, 4, 3), np.float32), impl="nope"), r"`impl` must be one of"),
    ],
)
def test_cacr_bad_inputs(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ------------------------------------------------------------------------------------ contrastive gap
def ref_uniformity(x, y, t):
  b = x.shape[0]
  vals = [np.exp(-t * np.sum((x[i] - y[j]) ** 2)) for i in range(b) for j in range(b) if i != j]
  return np.log(np.mean(vals))


def ref_contrastive_gap(image, text, scale, cross, wa=1.0, wu=1.0, t=2.0):
  x, y = normalize(image), normalize(text)
  s = scale * x @ y.T
  clip_loss = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  align = np.mean(np.sum((x - y) ** 2, 1))
  unif = 0.5 * (ref_uniformity(x, x, t) + ref_uniformity(y, y, t))
  if cross:
    unif += ref_uniformity(x, y, t)
  return clip_loss + wa * align + wu * unif


@pytest.mark.parametrize("b,d,cross", [(2, 3, False), (6, 4, True), (8, 16, False), (5, 8, True)])
def test_contrastive_gap_matches_reference(b, d, cross):
  args = [randn(b + 20, b, d), randn(b + 21, b, d)]
  check(
      lambda x, y: contrastive_gap(x, y, logit_scale=5.0, cross_uniformity=cross, t=1.5,
                                   alignment_weight=0.5, uniformity_weight=2.0),
      lambda x, y: ref_contrastive_gap(x, y, 5.0, cross, wa=0.5, wu=2.0, t=1.5),
      args,
  )


def test_contrastive_gap_without_extra_terms_is_clip():
  x, y = randn(30, 6, 5), randn(31, 6, 5)
  got = contrastive_gap(x, y, logit_scale=3.0, alignment_weight=0.0, uniformity_weight=0.0)
  np.testing.assert_allclose(float(got), float(clip(x, y, logit_scale=3.0)), rtol=1e-6)


def test_contrastive_gap_engines_agree():
  x, y = randn(32, 6, 4), randn(33, 6, 4)
  f = lambda impl: jax.jit(jax.value_and_grad(
      lambda a, b: contrastive_gap(a, b, cross_uniformity=True, impl=impl), argnums=(0, 1)))
  want_v, want_g = f("dense")(x, y)
  for impl in ("auto",) + ops.available_impls():
    got_v, got_g = f(impl)(x, y)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5, err_msg=impl)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=impl)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: contrastive_gap(np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)),
         r"`image` and `text` must have the same shape"),
        (lambda: contrastive_gap(np.ones((1, 3), np.float32), np.ones((1, 3), np.float32)),
         r"`image` needs at least 2 examples"),
        (lambda: contrastive_gap(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), t=0.0),
         r"`t` must be positive"),
        (lambda: contrastive_gap(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32),
                                 alignment_weight=-1.0), r"`alignment_weight` must be >= 0"),
    ],
)
def test_contrastive_gap_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ----------------------------------------------------------------------------------------------- MERU
from jaxcl.losses.hyperbolic import (  # noqa: E402
    entailment_cone, exterior_angle, half_aperture, lorentz_distance, lorentz_expmap0, meru,
)


def ref_lift(v, c):
  """Tangent vector at the origin -> full hyperboloid point (time, space...) in float64."""
  v = np.asarray(v, np.float64)
  r = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  space = np.sinh(r) / r * v
  time = np.sqrt(1.0 / c + np.sum(space**2, -1, keepdims=True))
  return np.concatenate([time, space], -1)


def ref_lorentz_inner(x, y):
  return -x[0] * y[0] + x[1:] @ y[1:]


def ref_meru(image, text, c=1.0, scale=1 / 0.07, weight=0.2, k=0.1):
  x, y = ref_lift(image, c), ref_lift(text, c)
  b = x.shape[0]
  d = np.array([[np.arccosh(max(-c * ref_lorentz_inner(x[i], y[j]), 1 + 1e-6)) / np.sqrt(c)
                 for j in range(b)] for i in range(b)])
  s = -scale * d
  cont = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  entail = 0.0
  for i in range(b):
    g, sp = y[i], x[i]  # text is the general concept, the image the specific one
    aperture = np.arcsin(min(2 * k / (np.sqrt(c) * np.linalg.norm(g[1:])), 1 - 1e-6))
    cxy = c * ref_lorentz_inner(g, sp)
    angle = np.arccos((sp[0] + cxy * g[0]) / (np.linalg.norm(g[1:]) * np.sqrt(cxy**2 - 1)))
    entail += max(angle - aperture, 0.0) / b
  return cont + weight * entail


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
  want_c = reference.numerical_grad(lambda c: ref_meru(x, y, c[()], 3.0), np.array(0.7))
  want_s = reference.numerical_grad(lambda s: ref_meru(x, y, 0.7, s[()]), np.array(3.0))
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


# ----------------------------------------------------------------------------------------------- GRAM
from jaxcl.losses.geometric import gram, gram_volume  # noqa: E402


def ref_gram(temperature, anchor, *others, eps=0.1):
  """Float64 GRAM: the symmetric cross-entropy of −Vol/τ with targets (1 − eps) I + eps / B (the
  authors' label_smoothing=0.1)."""
  a = normalize(anchor)
  xs = [normalize(x) for x in others]
  b = a.shape[0]
  vol = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      mat = np.stack([a[i]] + [x[j] for x in xs], axis=1)  # D × k
      vol[i, j] = np.sqrt(max(abs(np.linalg.det(mat.T @ mat)), 1e-12))
  s = -vol / temperature
  targets = (1 - eps) * np.eye(b) + eps / b
  rows = np.mean([logsumexp(s[i]) - targets[i] @ s[i] for i in range(b)])
  cols = np.mean([logsumexp(s[:, j]) - targets[:, j] @ s[:, j] for j in range(b)])
  return 0.5 * (rows + cols)


@pytest.mark.parametrize("m,b,d,t,eps", [(2, 4, 3, 0.5, 0.1), (3, 5, 4, 0.07, 0.0), (4, 3, 5, 1.0, 0.3)])
def test_gram_matches_reference(m, b, d, t, eps):
  args = [randn(60 + k, b, d) for k in range(m)]
  check(lambda *xs: gram(*xs, temperature=t, label_smoothing=eps), lambda *xs: ref_gram(t, *xs, eps=eps), args)


def test_gram_two_modalities_is_a_sine_score():
  # For k = 2 unit vectors det G = 1 − cos², so the score is −|sin θ_ij| / τ.
  x, y = randn(66, 6, 5), randn(67, 6, 5)
  c = normalize(x) @ normalize(y).T
  s = -np.sqrt(1 - c**2) / 0.1
  want = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  np.testing.assert_allclose(float(gram(x, y, temperature=0.1, label_smoothing=0.0)), want, rtol=1e-5)
  np.testing.assert_allclose(gram_volume(x, y), np.sqrt(1 - c**2), rtol=1e-4, atol=1e-5)


def test_gram_is_symmetric_in_the_non_anchor_modalities_and_invariant_to_scale():
  a, x, y = randn(68, 5, 4), randn(69, 5, 4), randn(70, 5, 4)
  f = jax.jit(lambda *xs: gram(*xs, temperature=0.2))
  np.testing.assert_allclose(float(f(a, x, y)), float(f(a, y, x)), rtol=1e-6)
  np.testing.assert_allclose(float(f(3 * a, x, 0.5 * y)), float(f(a, x, y)), rtol=1e-5)


def test_gram_aligned_modalities_have_finite_gradients():
  # Identical modalities: every diagonal Gram matrix is singular (volume 0), where the LU gradient of a
  # determinant breaks down; the cofactor expansion keeps the gradient finite.
  a = randn(71, 4, 5)
  value, grads = jax.jit(jax.value_and_grad(lambda *xs: gram(*xs), argnums=(0, 1, 2)))(a, a, a)
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
  assert float(value) < float(gram(a, randn(72, 4, 5), randn(73, 4, 5)))


def test_gram_bf16_and_traced_temperature():
  xs = [randn(74 + k, 6, 8).astype(jnp.bfloat16) for k in range(3)]
  value, grads = jax.jit(jax.value_and_grad(lambda *v: gram(*v, temperature=0.1), argnums=(0, 1, 2)))(
      *map(jnp.asarray, xs))
  assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
  want = ref_gram(0.1, *[np.asarray(x, np.float64) for x in xs])
  np.testing.assert_allclose(float(value), want, rtol=3e-2, atol=3e-2)
  ys = [randn(77 + k, 4, 3) for k in range(3)]
  g = jax.jit(jax.grad(lambda t: gram(*ys, temperature=t)))(0.3)
  want = reference.numerical_grad(lambda t: ref_gram(t[()], *ys), np.array(0.3))
  np.testing.assert_allclose(g, want, rtol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gram(np.ones((4, 3), np.float32)), r"`others` needs at least 1 array"),
        (lambda: gram(*[np.ones((4, 3), np.float32)] * 7), r"at most 6 modalities"),
        (lambda: gram(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)), r"same feature size"),
        (lambda: gram(np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)),
         r"`others\[0\]` must have as many rows as `anchor`"),
        (lambda: gram(np.ones((1, 3), np.float32), np.ones((1, 3), np.float32)),
         r"`anchor` needs at least 2 examples"),
        (lambda: gram(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), temperature=0.0),
         r"`temperature` must be positive"),
        (lambda: gram(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), impl="pallas"),
         r"`impl` must be one of"),
        (lambda: gram(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), label_smoothing=1.0),
         r"`label_smoothing` must be in \[0, 1\), got 1.0"),
    ],
)
def test_gram_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------- reduction and mask (geometric.py)
from jaxcl.ops import blockwise  # noqa: E402
from tests import helpers  # noqa: E402

_MASK5 = np.array([1, 0, 1, 1, 1], bool)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_cacr_padded_batch_with_mask_equals_unpadded_batch(impl, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 4)
  by_instance = randn(140, 5, 3, 4)  # (B, V, D): the helper pads along the instances
  for kw in ({}, {"normalize": False}):
    loss = lambda x, **k: cacr(jnp.swapaxes(x, 0, 1), t_pos=2.0, t_neg=1.5, impl=impl, **kw, **k)
    helpers.assert_padded_equals_unpadded(loss, [by_instance], rtol=2e-6)
    helpers.assert_reductions_agree(loss, [by_instance], 5)
    helpers.assert_reductions_agree(loss, [by_instance], 5, mask=_MASK5)


def test_cacr_per_instance_terms_match_reference():
  views = randn(141, 3, 4, 5)
  per = np.asarray(cacr(views, reduction="none"), np.float64)
  # ℓ_i is the loss of the batch whose mean runs over instance i only (its negatives still all others)
  z = normalize(views)
  for i in range(4):
    att = np.mean([np.sum(softmax(np.array([np.sum((z[v, i] - z[u, i]) ** 2) for u in range(3) if u != v]))
                          * np.array([np.sum((z[v, i] - z[u, i]) ** 2) for u in range(3) if u != v]))
                   for v in range(3)])
    rep = np.mean([np.sum(softmax(-c) * -c) for c in
                   [np.array([np.sum((z[v, i] - z[u, j]) ** 2) for j in range(4) if j != i])
                    for v in range(3) for u in range(v + 1, 3)]])
    np.testing.assert_allclose(per[i], att + rep, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas"])
def test_contrastive_gap_padded_batch_with_mask_equals_unpadded_batch(impl, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 4)
  loss = lambda x, y, **kw: contrastive_gap(x, y, logit_scale=3.0, cross_uniformity=True, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [randn(142, 5, 4), randn(143, 5, 4)], rtol=2e-6)


def test_contrastive_gap_mask_with_one_valid_pair_has_no_uniformity():
  x, y = randn(144, 4, 3), randn(145, 4, 3)
  mask = jnp.array([0, 0, 1, 0], bool)
  got = contrastive_gap(x, y, logit_scale=3.0, cross_uniformity=True, mask=mask)
  want = alignment(x[2:3], y[2:3])  # one pair: CLIP log 1 − s_ii + s_ii = 0, no pair for uniformity
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [2, 3])
def test_gram_padded_batch_with_mask_equals_unpadded_batch(m):
  arrays = [randn(146 + k, 5, 4) for k in range(m)]
  loss = lambda a, *others, **kw: gram(a, *others, temperature=0.5, **kw)
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)
  helpers.assert_reductions_agree(loss, arrays, 10)
  helpers.assert_reductions_agree(loss, arrays, 10, mask=_MASK5)


def test_gram_per_anchor_terms_match_reference():
  a, b = randn(150, 4, 3), randn(151, 4, 3)
  per = np.asarray(gram(a, b, temperature=0.5, reduction="none"), np.float64)
  x, y = normalize(a), normalize(b)
  vol = np.array([[np.sqrt(max(abs(np.linalg.det(np.stack([x[i], y[j]]) @ np.stack([x[i], y[j]]).T)), 1e-12))
                   for j in range(4)] for i in range(4)])
  z = -vol / 0.5
  rows = logsumexp(z, 1) - 0.9 * np.diag(z) - 0.1 * np.mean(z, 1)
  cols = logsumexp(z, 0) - 0.9 * np.diag(z) - 0.1 * np.mean(z, 0)
  np.testing.assert_allclose(per, np.concatenate([rows, cols]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: cacr(jnp.stack([x, x]), mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: cacr(jnp.stack([x, x]), reduction="avg"), r"`reduction` must be one of"),
        (lambda x: contrastive_gap(x, x, mask=np.ones((4, 1), bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: contrastive_gap(x, x, reduction="none"), r"`reduction` must be 'mean' for this loss"),
        (lambda x: contrastive_gap(x, x, reduction="avg"), r"`reduction` must be 'mean' for this loss"),
        (lambda x: gram(x, x, mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: gram(x, x, mask=np.ones(4, np.int32)), r"`mask` must be a boolean array"),
        (lambda x: gram(x, x, reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_geometric_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call(randn(152, 4, 3))


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


# ------------------------------------------------------------------------ 2D Matryoshka and Starbucks
from jaxcl.losses.matryoshka import matryoshka  # noqa: E402
from jaxcl.losses.matryoshka_2d import STARBUCKS_PAIRS, layer_kl, matryoshka_2d, starbucks  # noqa: E402


def ref_clip(x, y, scale):
  return reference.clip(x, y, scale)


def test_matryoshka_2d_matches_reference_grid():
  x, y = randn(80, 3, 5, 8), randn(81, 3, 5, 8)  # 3 layers
  layers, dims, weights = (1, 2), (2, 8), (1.0, 0.5, 2.0, 0.25)
  f = matryoshka_2d(functools.partial(clip, logit_scale=4.0), layers, dims, weights, kl_weight=0.0)

  def want(x, y):
    grid = [(l, d) for l in layers for d in dims]
    return sum(w * ref_clip(x[l, :, :d], y[l, :, :d], 4.0) for (l, d), w in zip(grid, weights))

  check(f, want, [x, y])


def test_starbucks_matches_reference_and_default_schedule():
  assert STARBUCKS_PAIRS == ((2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768))
  x, y = randn(82, 4, 6, 6), randn(83, 4, 6, 6)
  pairs = ((1, 2), (2, 4), (3, 6))
  f = starbucks(lambda a, b: clip(a, b, logit_scale=3.0), pairs, kl_weight=0.0)
  check(f, lambda x, y: sum(ref_clip(x[l, :, :d], y[l, :, :d], 3.0) for l, d in pairs), [x, y])


def ref_layer_kl(shallow, final, t):
  """Float64 (1/N) Σ_i KL(softmax(final_i / t) ‖ softmax(shallow_i / t)) over the rows."""
  d = shallow.shape[-1]
  log_softmax = lambda v: v - logsumexp(v, axis=1)[:, None]
  log_q = log_softmax(shallow.reshape(-1, d) / t)
  log_p = log_softmax(final.reshape(-1, d) / t)
  return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def test_layer_kl_matches_reference_and_stops_the_teacher_gradient():
  s, f = randn(90, 2, 5, 6), randn(91, 2, 5, 6)
  check(lambda a: layer_kl(a, jnp.asarray(f), temperature=0.5), lambda a: ref_layer_kl(a, f, 0.5), [s])
  # The final layer is a fixed target (2DMSE's self-distillation): no gradient flows into it.
  g = jax.grad(lambda b: layer_kl(jnp.asarray(s), b, temperature=0.5))(jnp.asarray(f))
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  assert float(layer_kl(jnp.asarray(f), jnp.asarray(f) + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
  assert float(layer_kl(jnp.asarray(s), jnp.asarray(f))) > 0.0


def test_matryoshka_2d_kl_term_matches_reference():
  x, y = randn(92, 3, 5, 8), randn(93, 3, 5, 8)
  x0, y0 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  layers, dims, w, t = (1, 2), (2, 8), 0.7, 0.3
  f = matryoshka_2d(functools.partial(clip, logit_scale=4.0), layers, dims, kl_weight=w, kl_temperature=t)

  def want(x, y):  # the final layer of the unperturbed inputs is the (fixed) target
    grid = sum(ref_clip(x[l, :, :d], y[l, :, :d], 4.0) for l in layers for d in dims)
    kl = ref_layer_kl(np.concatenate([x[1], y[1]]), np.concatenate([x0[2], y0[2]]), t)  # layer 1 once, full width
    return grid + t * w * kl

  check(f, want, [x, y])


def test_starbucks_kl_term_cuts_to_the_pair_width():
  x, y = randn(94, 4, 6, 6), randn(95, 4, 6, 6)
  x0, y0 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  pairs, t = ((1, 2), (2, 4), (3, 6)), 0.3
  f = starbucks(lambda a, b: clip(a, b, logit_scale=3.0), pairs)  # default kl_weight 1, τ 0.3

  def want(x, y):
    grid = sum(ref_clip(x[l, :, :d], y[l, :, :d], 3.0) for l, d in pairs)
    kl = sum(ref_layer_kl(np.concatenate([x[l, :, :d], y[l, :, :d]]), np.concatenate([x0[3, :, :d], y0[3, :, :d]]), t)
             for l, d in pairs[:2])  # layer 3 is the final layer: no term for it
    return grid + t * kl

  check(f, want, [x, y])


def test_matryoshka_2d_with_one_layer_is_matryoshka():
  x, y = randn(84, 3, 5, 8), randn(85, 3, 5, 8)
  loss = functools.partial(clip, logit_scale=2.0)
  got = matryoshka_2d(loss, layers=(2,), dims=(2, 4, 8))(x, y)
  want = matryoshka(loss, dims=(2, 4, 8))(x[2], y[2])
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_matryoshka_2d_passes_non_layered_arguments_through():
  x = randn(86, 2, 6, 4)
  labels = np.array([0, 1, 0, 1, 2, 2])
  seen = []

  def loss(a, labels, *, temperature):
    seen.append((a.shape, labels.shape, temperature))
    return jnp.sum(a) * temperature

  value = jax.jit(lambda x: matryoshka_2d(loss, (0, 1), (2,), kl_weight=0.0)(x, labels, temperature=0.5))(x)
  assert all(s == ((6, 2), (6,), 0.5) for s in seen)
  np.testing.assert_allclose(float(value), 0.5 * np.sum(x[:, :, :2]), rtol=1e-5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: matryoshka_2d(jnp.sum, layers=(), dims=(2,)), r"`layers` must be a non-empty"),
        (lambda: matryoshka_2d(jnp.sum, layers=(0, 0), dims=(2,)), r"must not repeat"),
        (lambda: matryoshka_2d(jnp.sum, layers=(-1,), dims=(2,)), r"layer >= 0"),
        (lambda: matryoshka_2d(jnp.sum, layers=(0,), dims=(4, 2)), r"`dims` must be positive and strictly"),
        (lambda: matryoshka_2d(jnp.sum, layers=(0,), dims=(2,), weights=(1.0, 2.0)), r"one entry per dim"),
        (lambda: starbucks(jnp.sum, pairs=((1, 2, 3),)), r"\(layer, dim\) pairs of ints"),
        (lambda: starbucks("clip"), r"`loss_fn` must be callable"),
        (lambda: starbucks(jnp.sum, kl_weight=-1.0), r"`kl_weight` must be"),
        (lambda: matryoshka_2d(jnp.sum, (0,), (2,), kl_temperature=0.0), r"`kl_temperature` must be"),
    ],
)
def test_matryoshka_2d_bad_configuration(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_matryoshka_2d_bad_call():
  f = starbucks(jnp.sum, pairs=((3, 2),))
  with pytest.raises(ValueError, match=r"asks for layer 3 but `a` has only 2 layers"):
    f(jnp.ones((2, 4, 4)))
  with pytest.raises(ValueError, match=r"asks for 8 features"):
    starbucks(jnp.sum, pairs=((0, 8),))(jnp.ones((2, 4, 4)))
  with pytest.raises(ValueError, match=r"no floating array argument of rank >= 3"):
    f(jnp.ones((4, 4)))


# ----------------------------------------------------------------- reduction and mask (matryoshka_2d.py)
from jaxcl.losses.multiview import multiview_infonce  # noqa: E402


def _layers_second(loss):  # the helper pads axis 0: tests pass (B, L, ...) and the loss gets (L, B, ...)
  return lambda *xs, **kw: loss(*[jnp.moveaxis(x, 0, 1) for x in xs], **kw)


@pytest.mark.parametrize("kl_weight", [0.0, 0.7])
@pytest.mark.parametrize("wrapper", ["matryoshka_2d", "starbucks"])
def test_matryoshka_2d_padded_batch_with_mask_equals_unpadded_batch(wrapper, kl_weight):
  arrays = [randn(170, 5, 3, 6), randn(171, 5, 3, 6)]  # (B, L, D)
  clip4 = functools.partial(clip, logit_scale=4.0)
  if wrapper == "matryoshka_2d":
    f = matryoshka_2d(clip4, (1, 2), (2, 6), (1.0, 0.5, 2.0, 0.25), kl_weight=kl_weight, kl_temperature=0.5)
  else:
    f = starbucks(clip4, ((0, 2), (1, 4), (2, 6)), kl_weight=kl_weight)
  loss = _layers_second(f)
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)
  helpers.assert_reductions_agree(loss, arrays, 10)
  helpers.assert_reductions_agree(loss, arrays, 10, mask=_MASK5)


def test_starbucks_mask_over_views_first_layers():
  by_instance = randn(172, 5, 3, 2, 4)  # (B, L, V, D): the loss gets (L, V, B, D)
  f = starbucks(functools.partial(multiview_infonce, temperature=0.3), ((0, 2), (1, 4)))
  loss = lambda x, **kw: f(jnp.transpose(x, (1, 2, 0, 3)), **kw)
  helpers.assert_padded_equals_unpadded(loss, [by_instance], rtol=2e-6)
  helpers.assert_reductions_agree(loss, [by_instance], 5, mask=_MASK5)


def test_matryoshka_2d_per_anchor_terms():
  x, y = randn(173, 3, 4, 6), randn(174, 3, 4, 6)
  clip4 = functools.partial(clip, logit_scale=4.0)
  f = matryoshka_2d(clip4, (1, 2), (2, 6), kl_weight=0.7, kl_temperature=0.5)
  per = np.asarray(f(x, y, reduction="none"), np.float64)
  grid = sum(np.asarray(clip4(x[l, :, :d], y[l, :, :d], reduction="none"), np.float64)
             for l in (1, 2) for d in (2, 6))
  kl = ref_layer_kl(np.concatenate([x[1], y[1]]), np.concatenate([x[2], y[2]]), 0.5)
  np.testing.assert_allclose(per, grid + 0.5 * 0.7 * kl, rtol=1e-5)


def test_layer_kl_reduction_and_mask():
  s, f = randn(175, 5, 6), randn(176, 5, 6)
  loss = lambda a, b, **kw: layer_kl(a, b, temperature=0.5, **kw)
  helpers.assert_padded_equals_unpadded(loss, [s, f], n_diff=1, rtol=2e-6)
  helpers.assert_reductions_agree(loss, [s, f], 5)
  helpers.assert_reductions_agree(loss, [s, f], 5, mask=_MASK5)
  per = np.asarray(loss(s, f, reduction="none"), np.float64)
  np.testing.assert_allclose(per, [ref_layer_kl(s[i:i + 1], f[i:i + 1], 0.5) for i in range(5)], rtol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: layer_kl(x[0], x[1], mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: layer_kl(x[0], x[1], mask=np.ones(4, np.int32)), r"`mask` must be a boolean array"),
        (lambda x: layer_kl(x[0], x[1], reduction="avg"), r"`reduction` must be one of"),
        (lambda x: starbucks(clip, ((0, 2),))(x, x, logit_scale=2.0, mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda x: starbucks(clip, ((0, 2),))(x, x, logit_scale=2.0, reduction="avg"), r"`reduction` must be one of"),
        (lambda x: matryoshka_2d(clip, (0,), (2,), kl_weight=0.0)(x, x, logit_scale=2.0, reduction="avg"),
         r"`reduction` must be one of"),
    ],
)
def test_matryoshka_2d_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call(randn(177, 2, 4, 3))
