"""Triplet, batch-hard triplet, alignment, uniformity, negative cosine, Barlow Twins, VICReg and
Matryoshka against the float64 NumPy references of tests/reference_other.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.losses.clip import clip
from jaxcl.losses.alignment_uniformity import alignment, uniformity
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.triplet import batch_hard_triplet, triplet
from jaxcl.losses.predictive import negative_cosine
from jaxcl.losses.redundancy import barlow_twins, vicreg
from tests import reference, reference_other
from tests.helpers import assert_value_and_grads, randn

SHAPES = [(2, 3), (5, 4), (8, 16)]


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
      functools.partial(reference_other.triplet, margin=margin, squared=squared, normalize_=normalize),
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
  an, pn, nn = (reference.normalize(x) for x in (a, p, n))
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
      lambda e: reference_other.batch_hard_triplet(e, labels, margin, squared, normalize),
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
  xn = reference.normalize(x)
  closest = [min(np.linalg.norm(xn[i] - xn[k]) for k in range(6) if labels[k] != labels[i]) for i in range(6)]
  want = np.mean(np.maximum(1.5 - np.array(closest), 0))
  assert want > 0
  np.testing.assert_allclose(float(value), want, rtol=1e-5)


# ---------------------------------------------------------------------------- alignment / uniformity
@pytest.mark.parametrize(
    "b,d,alpha,normalize",
    [(1, 3, 2, True), (5, 4, 1.0, True), (8, 16, 3.0, True), (2, 3, 1.0, False), (8, 16, 2, False),
     (5, 4, 0.5, False)],
)
def test_alignment_matches_reference(b, d, alpha, normalize):
  check(
      functools.partial(alignment, alpha=alpha, normalize=normalize),
      functools.partial(reference_other.alignment, alpha=alpha, normalize_=normalize),
      [randn(13, b, d), randn(14, b, d)],
  )


@pytest.mark.parametrize("b,d,t", [(2, 3, 1.0), (5, 4, 2), (8, 16, 0.5)])
@pytest.mark.parametrize("impl", ops.available_impls())
def test_uniformity_matches_reference(b, d, t, impl):
  check(
      functools.partial(uniformity, t=t, impl=impl),
      functools.partial(reference_other.uniformity, t=t),
      [randn(15, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_uniformity_unnormalized_matches_reference(b, d):
  x = 0.3 * randn(16, b, d)
  check(
      functools.partial(uniformity, t=1.5, normalize=False),
      functools.partial(reference_other.uniformity, t=1.5, normalize_=False),
      [x],
  )


def test_uniformity_logsumexp_form_equals_explicit_distances():
  # The engine path (2 − 2<x_i, x_j>) and the explicit-distance path agree on unit vectors.
  x = np.asarray(reference.normalize(randn(17, 12, 6)), np.float32)
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


# ----------------------------------------------------------------------------------- negative cosine
@pytest.mark.parametrize("b,d", [(1, 3)] + SHAPES)
def test_negative_cosine_matches_reference_and_stops_the_target_gradient(b, d):
  p, z = randn(18, b, d), randn(19, b, d)
  value, (g_p, g_z) = jax.jit(jax.value_and_grad(negative_cosine, argnums=(0, 1)))(p, z)
  np.testing.assert_allclose(float(value), reference_other.negative_cosine(p, z), rtol=2e-5)
  want = reference.numerical_grad(lambda x: reference_other.negative_cosine(x, z), p)
  np.testing.assert_allclose(np.asarray(g_p), want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(g_z) == 0)
  # Without the stop-gradient the reference has a gradient in z: the test above can fail.
  assert np.max(np.abs(reference.numerical_grad(lambda x: reference_other.negative_cosine(p, x), z))) > 1e-3


def test_negative_cosine_is_scale_invariant_and_bounded():
  p, z = randn(20, 6, 5), randn(21, 6, 5)
  scaled = negative_cosine(7.0 * p, 0.1 * z)
  np.testing.assert_allclose(float(scaled), float(negative_cosine(p, z)), rtol=1e-5)
  np.testing.assert_allclose(float(negative_cosine(p, 3.0 * p)), -1.0, rtol=1e-6)
  np.testing.assert_allclose(float(negative_cosine(p, -p)), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------ Barlow Twins / VICReg
@pytest.mark.parametrize("n,d", [(3, 3), (6, 5), (8, 8)])
@pytest.mark.parametrize("lambda_", [5e-3, 0.5])
def test_barlow_twins_matches_reference(n, d, lambda_):
  z1 = randn(22, n, d)
  z2 = 0.7 * z1 + randn(23, n, d)  # correlated views: C has a non-trivial diagonal
  check(
      functools.partial(barlow_twins, lambda_=lambda_),
      functools.partial(reference_other.barlow_twins, lambda_=lambda_),
      [z1, z2],
      rtol=5e-5,
  )


def test_barlow_twins_two_examples():
  # With N = 2 each standardised feature is ±1/√(1 + eps/var) whatever the input: the gradient is
  # O(eps) and too small for finite differences, so only the value is compared.
  z1, z2 = randn(45, 2, 4), randn(46, 2, 4)
  np.testing.assert_allclose(float(barlow_twins(z1, z2)), reference_other.barlow_twins(z1, z2), rtol=1e-5)


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
  check(vicreg, reference_other.vicreg, [z1, z2], rtol=5e-5)


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


# -------------------------------------------------------------------------------------------- matryoshka
@pytest.mark.parametrize("dims,weights", [((2, 4, 8), None), ((1, 3, 8), (0.5, 1.0, 2.0)), ((3,), None)])
def test_matryoshka_clip_matches_reference(dims, weights):
  fn = matryoshka(functools.partial(clip, logit_scale=5.0), dims, weights)
  ref = reference_other.matryoshka(functools.partial(reference.clip, logit_scale=5.0), dims, weights)
  check(fn, ref, [randn(34, 6, 8), randn(35, 6, 8)])


def test_matryoshka_nt_xent_matches_reference():
  fn = matryoshka(functools.partial(nt_xent, temperature=0.3), (4, 8, 16))
  ref = reference_other.matryoshka(functools.partial(reference.nt_xent, temperature=0.3), (4, 8, 16))
  check(fn, ref, [randn(36, 5, 16), randn(37, 5, 16)])


def test_matryoshka_with_the_full_size_is_the_loss_itself():
  a, b = randn(38, 6, 8), randn(39, 6, 8)
  for loss in (functools.partial(clip, logit_scale=10.0), functools.partial(nt_xent, temperature=0.5)):
    got = jax.jit(jax.value_and_grad(matryoshka(loss, [8])))(a, b)
    want = jax.jit(jax.value_and_grad(loss))(a, b)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6, atol=1e-7)


def test_matryoshka_slices_keywords_and_passes_labels_scales_through():
  x, labels = randn(40, 8, 6), np.array([0, 0, 1, 1, 2, 2, 0, 1])
  nested = matryoshka(batch_hard_triplet, (2, 6), weights=(1.0, 0.25))
  ref = reference_other.batch_hard_triplet
  want = ref(x[:, :2], labels) + 0.25 * ref(x, labels)
  np.testing.assert_allclose(float(jax.jit(nested)(x, labels)), want, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(nested)(embeddings=x, labels=labels)), want, rtol=1e-5)
  # A learnable (traced) logit scale passes through unsliced and gets its gradient.
  a, b = randn(41, 5, 6), randn(42, 5, 6)
  f = lambda s: matryoshka(clip, (3, 6))(a, b, logit_scale=s)
  want_g = reference.numerical_grad(
      lambda s: reference_other.matryoshka(functools.partial(reference.clip, logit_scale=s[()]), (3, 6))(
          a, b
      ),
      np.array(4.0),
  )
  np.testing.assert_allclose(float(jax.jit(jax.grad(f))(4.0)), want_g, rtol=1e-4)
  assert matryoshka(clip, (3,)).__name__ == "clip"


def test_matryoshka_under_jit_and_vmap():
  fn = matryoshka(functools.partial(clip, logit_scale=5.0), (2, 4))
  a, b = randn(43, 3, 5, 4), randn(44, 3, 5, 4)
  eager = [float(fn(a[i], b[i])) for i in range(3)]
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(a, b)), eager, rtol=1e-5)
  w = jnp.array([1.0, 3.0])
  g = jax.jit(lambda w: matryoshka(functools.partial(clip, logit_scale=5.0), (2, 4), w)(a[0], b[0]))
  want = [float(clip(a[0][:, :2], b[0][:, :2], logit_scale=5.0)), float(clip(a[0], b[0], logit_scale=5.0))]
  np.testing.assert_allclose(np.asarray(jax.grad(g)(w)), want, rtol=1e-5)


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])
ALL_LOSSES = {
    # name: (function of (a, b, c), number of (B, D) arrays it takes)
    "triplet": (functools.partial(triplet, margin=0.5), 3),
    "batch_hard_triplet": (lambda x: batch_hard_triplet(x, LABELS[: x.shape[0]]), 1),
    "alignment": (alignment, 2),
    "alignment_alpha1": (functools.partial(alignment, alpha=1), 2),
    "uniformity": (uniformity, 1),
    "uniformity_raw": (functools.partial(uniformity, normalize=False), 1),
    "negative_cosine": (negative_cosine, 2),
    "barlow_twins": (barlow_twins, 2),
    "vicreg": (vicreg, 2),
    "matryoshka_clip": (matryoshka(functools.partial(clip, logit_scale=10.0), (2, 8, 16)), 2),
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
  want = [reference_other.batch_hard_triplet(x[i], labels[i]) for i in range(3)]
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
        (lambda: alignment(ONES, np.ones((3, 3))), r"`x` and `y` must have the same shape"),
        (lambda: alignment(ONES, ONES, alpha=0), r"`alpha` must be positive and finite, got 0"),
        (lambda: alignment(ONES, ONES, alpha=-2.0), r"`alpha` must be positive"),
        (lambda: uniformity(ONES, t=0.0), r"`t` must be positive and finite, got 0.0"),
        (lambda: uniformity(np.ones((1, 3))), r"`x` needs at least 2 examples .*pairs"),
        (lambda: uniformity(np.ones(3)), r"`x` must have rank 2"),
        (lambda: uniformity(ONES, impl="nope"), r"`impl` must be one of"),
        (lambda: uniformity(ONES, normalize=False, impl="nope"), r"`impl` must be one of"),
        (lambda: negative_cosine(ONES, np.ones((4, 2))), r"`p` and `z` must have the same shape"),
        (lambda: negative_cosine(ONES, np.ones((4, 3, 1))), r"`z` must have rank 2"),
        (lambda: barlow_twins(ONES, np.ones((5, 3))), r"`z1` and `z2` must have the same shape"),
        (lambda: barlow_twins(np.ones((1, 3)), np.ones((1, 3))), r"`z1` needs at least 2 examples"),
        (lambda: barlow_twins(ONES, ONES, lambda_=-1.0), r"`lambda_` must be >= 0"),
        (lambda: barlow_twins(ONES, ONES, eps=0.0), r"`eps` must be positive"),
        (lambda: vicreg(np.ones((1, 3)), np.ones((1, 3))), r"`z1` needs at least 2 examples"),
        (lambda: vicreg(ONES, np.ones(3)), r"`z2` must have rank 2"),
        (lambda: vicreg(ONES, ONES, std_coeff=-1.0), r"`std_coeff` must be >= 0"),
        (lambda: vicreg(ONES, ONES, eps=-1e-4), r"`eps` must be positive"),
        (lambda: matryoshka(clip, (4, 2)), r"`dims` must be positive and strictly increasing, got \[4, 2\]"),
        (lambda: matryoshka(clip, (0, 2)), r"`dims` must be positive"),
        (lambda: matryoshka(clip, ()), r"`dims` must name at least one"),
        (lambda: matryoshka(clip, 8), r"`dims` must be a sequence"),
        (lambda: matryoshka(clip, (2.5, 4)), r"`dims` must hold Python ints"),
        (lambda: matryoshka(clip, (2, 4), weights=(1.0,)), r"`weights` must have one entry per dim \(2\), got 1"),
        (lambda: matryoshka(clip, (2, 4), weights=(1.0, -1.0)), r"`weights` must be finite numbers >= 0"),
        (lambda: matryoshka("clip", (2,)), r"`loss_fn` must be callable"),
        (lambda: matryoshka(clip, (2, 4))(ONES, ONES, logit_scale=1.0), r"`dims` asks for 4 features but `image` has only 3"),
        (lambda: matryoshka(clip, (2,))(image=ONES, text=np.ones((4, 1)), logit_scale=1.0), r"`text` has only 1"),
        (lambda: matryoshka(lambda *xs: xs[0].sum(), (2,))(np.ones(3)), r"no floating array argument"),
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


def test_traced_hyperparameters_are_accepted():
  a, p, n = randn(80, 5, 3), randn(81, 5, 3), randn(82, 5, 3)
  f = jax.jit(lambda m: triplet(a, p, n, margin=m))
  np.testing.assert_allclose(float(f(0.7)), reference_other.triplet(a, p, n, 0.7), rtol=1e-5)
  g = jax.jit(lambda t: uniformity(a, t=t))
  np.testing.assert_allclose(float(g(1.5)), reference_other.uniformity(a, 1.5), rtol=1e-5)
  h = jax.jit(lambda lam: barlow_twins(a, p, lambda_=lam))
  np.testing.assert_allclose(float(h(0.1)), reference_other.barlow_twins(a, p, 0.1), rtol=1e-5)


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)
MASKED = {
    "triplet": (triplet, [randn(100, 6, 4), randn(101, 6, 4), randn(102, 6, 4)], 3, True),
    "batch_hard_triplet": (batch_hard_triplet, [randn(103, 6, 4), _LABELS], 1, True),
    "alignment": (alignment, [randn(104, 6, 4), randn(105, 6, 4)], 2, True),
    "alignment_alpha1": (functools.partial(alignment, alpha=1), [randn(104, 6, 4), randn(105, 6, 4)], 2, True),
    "negative_cosine": (negative_cosine, [randn(106, 6, 4), randn(107, 6, 4)], 1, True),
    "uniformity": (uniformity, [randn(108, 6, 4)], 1, False),
    "uniformity_raw": (functools.partial(uniformity, normalize=False), [randn(108, 6, 4)], 1, False),
    "barlow_twins": (barlow_twins, [randn(109, 6, 4), randn(110, 6, 4)], 2, False),
    "vicreg": (vicreg, [randn(111, 6, 4), randn(112, 6, 4)], 2, False),
    "matryoshka_clip": (lambda a, b, **kw: matryoshka(clip, dims=(2, 4))(a, b, logit_scale=5.0, **kw),
                        [randn(113, 6, 4), randn(114, 6, 4)], 2, True),
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
