"""InfoNCE, NT-Xent, DCL, DCLW, CLIP, SigLIP against float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import losses
from tests import reference
from tests.helpers import assert_padded_equals_unpadded, assert_reductions_agree, assert_value_and_grads, randn

SHAPES = [(2, 3), (5, 4), (8, 16)]


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_infonce_matches_reference(b, d, temperature):
  assert_value_and_grads(
      functools.partial(losses.infonce, temperature=temperature),
      functools.partial(reference.infonce, temperature=temperature),
      [randn(1, b, d), randn(2, b, d)],
  )


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("in_batch", [True, False])
def test_infonce_with_negatives_matches_reference(shared, in_batch):
  b, d, h = 4, 5, 3
  neg = randn(3, 7, d) if shared else randn(3, b, h, d)
  assert_value_and_grads(
      lambda q, k, n: losses.infonce(q, k, temperature=0.2, negatives=n, in_batch_negatives=in_batch),
      lambda q, k, n: reference.infonce(q, k, 0.2, negatives=n, in_batch_negatives=in_batch),
      [randn(1, b, d), randn(2, b, d), neg],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_nt_xent_matches_reference(b, d):
  assert_value_and_grads(
      functools.partial(losses.nt_xent, temperature=0.5),
      functools.partial(reference.nt_xent, temperature=0.5),
      [randn(3, b, d), randn(4, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_dcl_matches_reference(b, d):
  assert_value_and_grads(
      functools.partial(losses.dcl, temperature=0.3),
      functools.partial(reference.dcl, temperature=0.3),
      [randn(5, b, d), randn(6, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_dclw_matches_reference(b, d):
  # The DCLW weight is a constant: the reference is differentiated with the weight held fixed.
  z1, z2 = randn(7, b, d), randn(8, b, d)
  got = losses.dclw(z1, z2, temperature=0.3, sigma=0.5)
  np.testing.assert_allclose(float(got), reference.dclw(z1, z2, 0.3, 0.5), rtol=2e-5)
  a, c = reference.normalize(z1), reference.normalize(z2)
  pos = np.sum(a * c, 1) / 0.5
  w = 2.0 - b * np.exp(pos - pos.max()) / np.exp(pos - pos.max()).sum()
  grad = jax.grad(lambda x: losses.dclw(x, z2, temperature=0.3, sigma=0.5))(z1)
  want = reference.numerical_grad(lambda x: reference.dcl(x, z2, 0.3, weights=w), z1)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_clip_matches_reference(b, d, scale):
  assert_value_and_grads(
      functools.partial(losses.clip, logit_scale=scale),
      functools.partial(reference.clip, logit_scale=scale),
      [randn(9, b, d), randn(10, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_clip_label_smoothing_matches_reference(b, d, eps):
  assert_value_and_grads(
      lambda i, t, s: losses.clip(i, t, logit_scale=s, label_smoothing=eps),
      lambda i, t, s: reference.clip_label_smoothing(i, t, s, eps),
      [randn(90, b, d), randn(91, b, d), np.float32(5.0)],
  )


@pytest.mark.parametrize("value", [-0.1, 1.0, np.nan, "0.1"])
def test_clip_label_smoothing_out_of_range_raises(value):
  with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0, 1\)"):
    losses.clip(randn(92, 4, 3), randn(93, 4, 3), logit_scale=1.0, label_smoothing=value)


@pytest.mark.parametrize("b,d", SHAPES)
def test_siglip_matches_reference(b, d):
  assert_value_and_grads(
      functools.partial(losses.siglip, logit_scale=10.0, logit_bias=-10.0),
      functools.partial(reference.siglip, logit_scale=10.0, logit_bias=-10.0),
      [randn(11, b, d), randn(12, b, d)],
  )


def test_learnable_scale_and_bias_gradients():
  image, text = randn(13, 6, 4), randn(14, 6, 4)
  g_scale, g_bias = jax.grad(
      lambda s, bias: losses.siglip(image, text, logit_scale=s, logit_bias=bias), argnums=(0, 1)
  )(3.0, -2.0)
  want_s = reference.numerical_grad(lambda s: reference.siglip(image, text, s[()], -2.0), np.array(3.0))
  want_b = reference.numerical_grad(lambda b: reference.siglip(image, text, 3.0, b[()]), np.array(-2.0))
  np.testing.assert_allclose([g_scale, g_bias], [want_s, want_b], rtol=1e-4)
  g_t = jax.grad(lambda t: losses.clip(image, text, logit_scale=1.0 / t))(0.1)
  want_t = reference.numerical_grad(lambda t: reference.clip(image, text, 1.0 / t[()]), np.array(0.1))
  np.testing.assert_allclose(g_t, want_t, rtol=1e-4)


# ---------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("b", [2, 3, 16])
def test_nt_xent_identical_views_is_log_2b_minus_1(b):
  # All 2B embeddings identical: every similarity is equal, so each anchor's softmax is uniform over
  # its 2B − 1 candidates and the loss is log(2B − 1) at any temperature.
  z = jnp.ones((b, 5))
  np.testing.assert_allclose(float(losses.nt_xent(z, z)), np.log(2 * b - 1), rtol=1e-6)


def test_dcl_is_below_nt_xent():
  for seed in range(5):
    z1, z2 = randn(seed, 8, 6), randn(seed + 100, 8, 6)
    assert float(losses.dcl(z1, z2, temperature=0.5)) <= float(losses.nt_xent(z1, z2, temperature=0.5))


def test_dclw_with_huge_sigma_is_dcl():
  z1, z2 = randn(20, 6, 4), randn(21, 6, 4)
  np.testing.assert_allclose(
      float(losses.dclw(z1, z2, sigma=1e6)), float(losses.dcl(z1, z2)), rtol=1e-5
  )


def test_clip_is_mean_of_two_infonce_directions():
  i, t = randn(22, 7, 5), randn(23, 7, 5)
  both = 0.5 * (losses.infonce(i, t, temperature=0.1) + losses.infonce(t, i, temperature=0.1))
  np.testing.assert_allclose(float(losses.clip(i, t, logit_scale=10.0)), float(both), rtol=1e-6)


def test_infonce_queue_form_is_cross_entropy_over_positive_and_queue():
  q, k, queue = randn(24, 4, 3), randn(25, 4, 3), randn(26, 9, 3)
  moco = losses.infonce(q, k, temperature=0.2, negatives=queue, in_batch_negatives=False)
  qn, kn, nn = (np.asarray(losses.l2_normalize(jnp.asarray(x))) for x in (q, k, queue))
  logits = np.concatenate([np.sum(qn * kn, 1, keepdims=True), qn @ nn.T], axis=1) / 0.2
  ce = np.mean(reference.logsumexp(logits, 1) - logits[:, 0])
  np.testing.assert_allclose(float(moco), ce, rtol=1e-5)


def test_normalize_false_uses_raw_dot_products():
  q, k = randn(27, 4, 3), randn(28, 4, 3)
  s = q.astype(np.float64) @ k.T.astype(np.float64)
  want = np.mean(reference.logsumexp(s, 1) - np.diag(s))
  np.testing.assert_allclose(float(losses.infonce(q, k, temperature=1.0, normalize=False)), want, rtol=1e-5)


# --------------------------------------------------------------------------- transforms, dtypes, extremes
ALL_PAIR_LOSSES = {
    "infonce": functools.partial(losses.infonce, temperature=0.1),
    "nt_xent": functools.partial(losses.nt_xent, temperature=0.5),
    "dcl": functools.partial(losses.dcl, temperature=0.1),
    "dclw": functools.partial(losses.dclw, temperature=0.1),
    "clip": functools.partial(losses.clip, logit_scale=1 / 0.07),
    "siglip": functools.partial(losses.siglip, logit_scale=10.0, logit_bias=-10.0),
}


@pytest.mark.parametrize("name", sorted(ALL_PAIR_LOSSES))
def test_jit_grad_vmap(name):
  fn = ALL_PAIR_LOSSES[name]
  a, b = randn(30, 3, 6, 4), randn(31, 3, 6, 4)
  eager = np.array([float(fn(a[i], b[i])) for i in range(3)])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(a, b)), eager, rtol=1e-5)
  g = jax.jit(jax.grad(fn))(a[0], b[0])
  assert g.shape == a[0].shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted(ALL_PAIR_LOSSES))
def test_bf16_inputs_close_to_fp32(name):
  fn = ALL_PAIR_LOSSES[name]
  a, b = randn(32, 16, 32), randn(33, 16, 32)
  lo = fn(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  hi = fn(jnp.asarray(a), jnp.asarray(b))
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(float(lo), float(hi), rtol=3e-2)
  g = jax.grad(fn)(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(ALL_PAIR_LOSSES))
def test_extremes_are_finite(name):
  fn = ALL_PAIR_LOSSES[name]
  a = randn(34, 8, 4)
  cases = [(a, a), (a * 1e-12, a), (np.zeros_like(a), a), (a * 1e6, -a)]
  for x, y in cases:
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(y))
    assert np.isfinite(float(value)), (name, x.max())
    assert all(np.all(np.isfinite(g)) for g in grads), name


def test_low_temperature_and_high_scale_are_finite():
  a, b = randn(35, 8, 4), randn(36, 8, 4)
  for fn in [
      lambda x, y: losses.infonce(x, y, temperature=0.01),
      lambda x, y: losses.nt_xent(x, y, temperature=0.01),
      lambda x, y: losses.dcl(x, y, temperature=0.01),
      lambda x, y: losses.dclw(x, y, temperature=0.01),
      lambda x, y: losses.clip(x, y, logit_scale=100.0),
      lambda x, y: losses.siglip(x, y, logit_scale=100.0, logit_bias=-10.0),
  ]:
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(a, b)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in grads)


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(a, b, **kw), anchors per sample)
MASKED_LOSSES = {
    "infonce": (functools.partial(losses.infonce, temperature=0.1), 1),
    "infonce_queue": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.2, negatives=randn(70, 7, 4), **kw), 1),
    "moco": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.2, negatives=randn(71, 7, 4),
                                               in_batch_negatives=False, **kw), 1),
    "nt_xent": (functools.partial(losses.nt_xent, temperature=0.5), 2),
    "dcl": (functools.partial(losses.dcl, temperature=0.1), 2),
    "dclw": (functools.partial(losses.dclw, temperature=0.1), 2),
    "clip": (functools.partial(losses.clip, logit_scale=1 / 0.07), 2),
    "clip_smoothed": (functools.partial(losses.clip, logit_scale=1 / 0.07, label_smoothing=0.1), 2),
    "siglip": (functools.partial(losses.siglip, logit_scale=10.0, logit_bias=-10.0), 1),
}


@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas"])
@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
def test_padded_batch_with_mask_equals_unpadded_batch(name, impl, monkeypatch):
  monkeypatch.setattr(jaxcl.ops.blockwise, "DEFAULT_TILE", 3)
  loss, _ = MASKED_LOSSES[name]
  assert_padded_equals_unpadded(functools.partial(loss, impl=impl), [randn(80, 5, 4), randn(81, 5, 4)])


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
def test_reduction_none_and_sum(name):
  loss, per_sample = MASKED_LOSSES[name]
  a, b = randn(82, 6, 4), randn(83, 6, 4)
  assert_reductions_agree(loss, [a, b], per_sample * 6)
  assert_reductions_agree(loss, [a, b], per_sample * 6, mask=np.array([1, 0, 1, 1, 0, 1], bool))


def test_fully_masked_batch_is_zero_with_zero_gradients():
  a, b = randn(84, 4, 4), randn(85, 4, 4)
  for loss, _ in MASKED_LOSSES.values():
    value, grads = jax.value_and_grad(lambda a, b: loss(a, b, mask=jnp.zeros(4, bool)), argnums=(0, 1))(a, b)
    assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)


@pytest.mark.parametrize("name", sorted(ALL_PAIR_LOSSES))
@pytest.mark.parametrize("kwargs,error,match", [
    ({"reduction": "avg"}, ValueError, r"`reduction` must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ({"mask": np.ones(3, bool)}, ValueError, r"`mask` must have shape \(4,\)"),
    ({"mask": np.ones(4, np.int32)}, TypeError, r"`mask` must be a boolean array"),
])
def test_bad_reduction_and_mask_raise(name, kwargs, error, match):
  with pytest.raises(error, match=match):
    ALL_PAIR_LOSSES[name](np.ones((4, 3)), randn(86, 4, 3), **kwargs)


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: losses.infonce(np.ones((4, 3)), np.ones((5, 3))), r"`query` and `key` must have the same shape"),
        (lambda: losses.infonce(np.ones((4,)), np.ones((4,))), r"`query` must have rank 2, got shape \(4,\)"),
        (lambda: losses.infonce(np.ones((4, 3)), np.ones((4, 3)), temperature=0.0), r"`temperature` must be positive"),
        (lambda: losses.infonce(np.ones((1, 3)), np.ones((1, 3))), r"`query` needs at least 2 examples"),
        (lambda: losses.infonce(np.ones((4, 3)), np.ones((4, 3)), in_batch_negatives=False), r"needs `negatives`"),
        (lambda: losses.infonce(np.ones((4, 3)), np.ones((4, 3)), negatives=np.ones((2, 4))), r"`negatives` must have feature size 3"),
        (lambda: losses.infonce(np.ones((4, 3)), np.ones((4, 3)), negatives=np.ones((3, 2, 3))), r"per-row `negatives` must have shape \(4, H, 3\)"),
        (lambda: losses.nt_xent(np.ones((1, 3)), np.ones((1, 3))), r"`z1` needs at least 2 examples"),
        (lambda: losses.nt_xent(np.ones((4, 3)), np.ones((4, 2))), r"`z1` and `z2` must have the same shape"),
        (lambda: losses.dcl(np.ones((4, 3)), np.ones((4, 3)), temperature=-1.0), r"`temperature` must be positive"),
        (lambda: losses.dclw(np.ones((4, 3)), np.ones((4, 3)), sigma=0.0), r"`sigma` must be positive"),
        (lambda: losses.clip(np.ones((4, 3)), np.ones((4, 3)), logit_scale=0.0), r"`logit_scale` must be positive"),
        (lambda: losses.siglip(np.ones((4, 3)), np.ones((4, 3)), logit_scale=1.0, logit_bias=np.inf), r"`logit_bias` must be finite"),
        (lambda: losses.clip(np.ones((4, 3), np.int32), np.ones((4, 3)), logit_scale=1.0), r"`image` must be a floating-point array"),
        (lambda: losses.clip(np.ones((4, 3)), np.ones((4, 3)), logit_scale=1.0, impl="nope"), r"`impl` must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="same shape"):
    jax.jit(losses.clip, static_argnames="logit_scale")(jnp.ones((4, 3)), jnp.ones((3, 3)), logit_scale=2.0)


def test_traced_temperature_is_accepted():
  a, b = randn(40, 5, 3), randn(41, 5, 3)
  f = jax.jit(lambda t: losses.nt_xent(a, b, temperature=t))
  np.testing.assert_allclose(float(f(0.5)), reference.nt_xent(a, b, 0.5), rtol=1e-5)


def test_package_exports():
  assert jaxcl.losses.infonce is losses.infonce
  for name in losses.__all__:
    if not name.isupper():  # constants such as STARBUCKS_PAIRS
      assert callable(getattr(losses, name)), name


# ------------------------------------------------------------------------------------ l2_normalize
def _l2_normalize_reference(x, t, eps=1e-6):
  """float64: y = x / max(‖x‖, eps) and the gradient of Σ y·t, (t − y (y·t)) / ‖x‖ or t / eps."""
  x = np.asarray(x, np.float64)
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  y = x / np.maximum(n, eps)
  g = np.where(n >= eps, (t - y * np.sum(y * t, -1, keepdims=True)) / np.maximum(n, eps), t / eps)
  return y, g


# float32's largest and smallest normal magnitudes, and across: rows of norm below eps are x / eps
L2_MAGNITUDES = [3.4e38, 1e38, 3e37, 1e30, 1e10, 1.0, 1e-5, 1e-6, 3e-7, 1e-20, 2e-38, 1.2e-38]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_l2_normalize_matches_float64_across_magnitudes(dtype):
  """Rows with max |x| of 3e37 gave zeros and 1e38 NaN (1/m underflows); now every magnitude up to
  float32's maximum has norm 1 and the right direction, and tiny rows are x / eps, gradients too."""
  rng = np.random.default_rng(80)
  d = rng.standard_normal((len(L2_MAGNITUDES), 7))
  d /= np.abs(d).max(axis=1, keepdims=True)
  t = rng.standard_normal(d.shape)
  magnitudes = np.minimum(np.array(L2_MAGNITUDES), float(jnp.finfo(dtype).max))
  x = jnp.asarray(d * magnitudes[:, None], dtype)
  y = losses.l2_normalize(x)
  g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x).astype(jnp.float32) * t))(x)
  assert y.dtype == dtype and g.dtype == dtype
  want_y, want_g = _l2_normalize_reference(np.asarray(x, np.float32), t)
  tol = 3e-7 if dtype == jnp.float32 else 8e-3
  y, g = np.asarray(y, np.float64), np.asarray(g, np.float64)
  # atol: entries below float32's smallest normal number (in the rows near 1e-38) are flushed to 0 by
  # XLA; their true value x / eps is below tiny / eps = 1.2e-32
  np.testing.assert_allclose(y, want_y, rtol=tol, atol=float(np.finfo(np.float32).tiny) / 1e-6)
  unit = magnitudes >= 1e-6
  np.testing.assert_allclose(np.linalg.norm(y[unit], axis=1), 1.0, rtol=4 * tol)
  # per row, relative to the row's largest gradient; gradients below float32's smallest normal number
  # (rows beyond 1e37, whose true gradient is ~1/‖x‖) are flushed to 0
  row_scale = np.abs(want_g).max(axis=1, keepdims=True)
  assert np.all(np.abs(g - want_g) <= 4 * tol * row_scale + 1e-37), np.abs(g - want_g).max(axis=1)


def test_l2_normalize_zero_subnormal_and_empty_rows():
  """A zero row stays zero with gradient t / eps (the function is x / eps near 0); rows of subnormal
  numbers are zeros on XLA (it flushes subnormals) with the same finite gradient; empty rows stay empty."""
  t = np.array([[1.0, -2.0, 3.0]] * 3)
  x = jnp.asarray(np.array([[0.0, 0.0, 0.0], [1e-40, -3e-41, 0.0], [1e-45, 0.0, 1e-45]], np.float32))
  y = losses.l2_normalize(x)
  g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x) * t))(x)
  assert np.all(np.abs(np.asarray(y)) <= 1e-33)  # x / eps, or 0 where subnormals are flushed
  np.testing.assert_allclose(np.asarray(g), t / 1e-6, rtol=1e-6)
  assert losses.l2_normalize(jnp.zeros((3, 0))).shape == (3, 0)


def _l2_normalize_gradient(x, t, **kwargs):
  return jax.grad(lambda x: jnp.sum(losses.l2_normalize(x, **kwargs).astype(jnp.float32) * t))(x)


def test_l2_normalize_under_jit_vmap_and_another_axis():
  """Values and gradients under jit, under vmap (a leading batch of matrices) and along axis 0."""
  rng = np.random.default_rng(81)
  x = rng.standard_normal((2, 5, 7)).astype(np.float32) * np.array([1e-8, 3.0])[:, None, None]
  t = rng.standard_normal((2, 5, 7))
  want_y, want_g = _l2_normalize_reference(x, t)
  y = jax.jit(jax.vmap(losses.l2_normalize))(jnp.asarray(x))
  g = jax.jit(jax.vmap(_l2_normalize_gradient))(jnp.asarray(x), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-5 * np.abs(want_g).max())
  xt, tt = jnp.asarray(x[1].T), jnp.asarray(t[1].T, jnp.float32)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(xt, axis=0)), want_y[1].T, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(_l2_normalize_gradient(xt, tt, axis=0)), want_g[1].T, rtol=1e-5,
                             atol=1e-6)


def test_l2_normalize_second_derivative_matches_float64_differences():
  """grad of grad: the Hessian-vector product of Σ y·t against central differences of the float64
  gradient (0 for a zero row, where the function is x / eps)."""
  rng = np.random.default_rng(82)
  x = rng.standard_normal((4, 6)) * np.array([[0.5], [1.0], [40.0], [0.0]])
  t, v = rng.standard_normal((2, 4, 6))
  h = 1e-7
  want = (_l2_normalize_reference(x + h * v, t)[1] - _l2_normalize_reference(x - h * v, t)[1]) / (2 * h)
  x32, t32, v32 = (jnp.asarray(a, jnp.float32) for a in (x, t, v))
  got = jax.grad(lambda x: jnp.sum(_l2_normalize_gradient(x, t32) * v32))(x32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert np.all(np.asarray(got)[3] == 0)


def test_l2_normalize_inside_shard_map():
  """Rows split over 2 devices inside `jax.shard_map` (check_vma on): values and gradients as on one."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  rng = np.random.default_rng(83)
  x = rng.standard_normal((6, 5)) * np.array([[1.0], [1e-9], [0.0], [1e30], [2.0], [1e-3]])
  t = rng.standard_normal((6, 5))
  want_y, want_g = _l2_normalize_reference(np.asarray(x, np.float32), t)
  spec = jax.sharding.PartitionSpec("data")

  def loss(x, t):
    local = lambda x, t: jax.lax.psum(jnp.sum(losses.l2_normalize(x) * t), "data")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec(),
                         check_vma=True)(x, t)

  x32, t32 = jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)
  value, g = jax.jit(jax.value_and_grad(loss))(x32, t32)
  np.testing.assert_allclose(float(value), np.sum(want_y * t), rtol=1e-5)
  scale = np.abs(want_g).max(axis=1, keepdims=True)
  assert np.all(np.abs(np.asarray(g) - want_g) <= 1e-5 * scale), np.abs(np.asarray(g) - want_g).max(axis=1)


def test_clip_normalization_temporaries_compiled_for_a_v5e_chip():
  """Compiled (deviceless) for one TPU v5e chip, `value_and_grad` of clip on bf16 (65536, 512) with its
  default normalisation: temporaries within 4x the input bytes (issue 16, 4d)."""
  from jaxcl import targets  # noqa: PLC0415

  one = jax.sharding.SingleDeviceSharding(targets.get("v5e:2x2").devices[0])
  x = jax.ShapeDtypeStruct((65536, 512), jnp.bfloat16, sharding=one)
  inputs = 2 * 65536 * 512 * 2

  loss = lambda a, b: losses.clip(a, b, logit_scale=10.0)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, x).compile()
  assert targets.kernel_calls(compiled)["mosaic"] > 0  # the Pallas kernels, not the dense engine
  assert targets.memory(compiled).temp_bytes <= 4 * inputs


def test_retrieval_accuracy_matches_numpy_argmax():
  a = randn(95, 30, 5)
  b = a + randn(96, 30, 5)
  valid = np.random.default_rng(97).random(30) < 0.6
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s = norm(a.astype(np.float64)) @ norm(b.astype(np.float64)).T
  for mask in (None, valid):
    keep = np.ones(30, bool) if mask is None else mask
    sub = s[np.ix_(keep, keep)]
    want = [np.mean(np.argmax(sub, 1) == np.arange(len(sub))), np.mean(np.argmax(sub, 0) == np.arange(len(sub)))]
    got = losses.retrieval_accuracy(a, b, mask=mask)
    np.testing.assert_allclose([float(got.a_to_b), float(got.b_to_a)], want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"`mask` must have shape \(30,\)"):
    losses.retrieval_accuracy(a, b, mask=np.ones(3, bool))


# Public names of jaxcl.losses that are not losses (geometry, similarities, encoders, state, wrappers
# that forward **kwargs), so take no `reduction` / `mask`.
NOT_LOSSES = {"exterior_angle", "filip_similarity", "gram_volume", "half_aperture", "isogclr_state",
              "l2_normalize", "lorentz_distance", "lorentz_expmap0", "matryoshka", "matryoshka_2d",
              "mcl_cluster_ids", "retrieval_accuracy", "sae_decode", "sae_encode", "sae_pre_activation",
              "snr_distance", "starbucks", "subclass_kmeans", "topk_activation", "topk_mask"}


def test_every_loss_takes_reduction_and_mask():
  import inspect  # noqa: PLC0415

  functions = {n: getattr(losses, n) for n in losses.__all__
               if inspect.isfunction(getattr(losses, n)) or inspect.isfunction(getattr(getattr(losses, n), "__wrapped__", None))}
  missing = [n for n, f in functions.items() if n not in NOT_LOSSES
             and not {"reduction", "mask"} <= set(inspect.signature(f).parameters)]
  assert not missing, f"losses without reduction= / mask=: {missing}"
  assert NOT_LOSSES <= set(functions), NOT_LOSSES - set(functions)
