"""Tests of jaxcl/losses/geometric.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.losses.alignment_uniformity import alignment
from jaxcl.losses.clip import clip
from jaxcl.losses.geometric import cacr, contrastive_gap, gram, gram_negatives, gram_volume
from jaxcl.ops import blockwise
from jaxcl.ops import pallas
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference
from tests.losses.reference.geometric import (ref_cacr, ref_contrastive_gap, ref_gram,
                                              ref_gram_negative_probabilities)


normalize = reference.common.normalize


logsumexp = reference.common.logsumexp


def check(jax_loss, np_loss, args, **tolerances):
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


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
  want = reference.common.numerical_grad(lambda t: ref_cacr(x, t_neg=t[()]), np.array(1.5))
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
  want = reference.common.numerical_grad(lambda t: ref_gram(t[()], *ys), np.array(0.3))
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


_MASK5 = np.array([1, 0, 1, 1, 1], bool)


@pytest.mark.parametrize("impl", ["dense"])
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


@pytest.mark.parametrize("impl", helpers.PADDED_TEST_ENGINES)
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


def test_gram_negatives_are_drawn_with_the_reference_probabilities():
  """3,000 draws (one vmapped call) of every row's hard negatives, with a padding sample: the
  frequencies are the float64 reference's probabilities (sd <= 0.009), never the row itself or the
  padding; the same key draws the same indices."""
  xs = [randn(153 + k, 6, 4) for k in range(3)]
  mask = np.array([True, True, True, False, True, True])
  want_data, want_anchor = ref_gram_negative_probabilities(0.3, *xs, mask=mask)
  draw = jax.jit(jax.vmap(lambda key: gram_negatives(*xs, key=key, temperature=0.3, mask=mask)))
  out = draw(jax.random.split(jax.random.key(0), 3000))
  for drawn, want in ((np.asarray(out.data), want_data), (np.asarray(out.anchor), want_anchor)):
    freq = np.stack([np.bincount(drawn[:, r], minlength=6) for r in range(6)]) / drawn.shape[0]
    valid_rows = mask  # a padding row draws too; its entry is not used
    np.testing.assert_allclose(freq[valid_rows], want[valid_rows], atol=0.04)
    assert np.all(drawn != np.arange(6)) and not np.any(drawn == 3)
  again = gram_negatives(*xs, key=jax.random.split(jax.random.key(0), 3000)[7], temperature=0.3, mask=mask)
  np.testing.assert_array_equal(np.asarray(again.data), np.asarray(out.data[7]))


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


# ------------------------------------------------------------------------------------ sharded batches
PADDED = np.arange(24) % 5 != 2  # 24 rows split over 3 and 8 devices, every fifth one padding


def _sharded_case(name, masked):
  """(loss closure, arguments): the masked loss or the unmasked one with a traced scale."""
  x = lambda seed: randn(seed, 24, 4)  # noqa: E731
  if name == "cacr":  # the instances are axis 1 of the (V, B, D) views
    loss, args = lambda v, **kw: cacr(v, t_neg=2.0, **kw), [randn(12, 3, 24, 4)]
  elif name == "contrastive_gap":  # the cross-modal uniformity (the in-modal ones' code) unmasked only
    loss = lambda a, b, s, **kw: contrastive_gap(a, b, logit_scale=s, cross_uniformity=not masked, **kw)  # noqa: E731
    args = [x(1), x(2), 3.0]
  else:  # three modalities: the `*others` of gram split alike
    loss, args = lambda *a, **kw: gram(*a[:-1], temperature=a[-1], **kw), [x(1), x(2), x(3), 0.5]
  return (lambda *a, **kw: loss(*a, mask=PADDED, **kw), args) if masked else (loss, args)


@pytest.mark.parametrize("impl,n_devices", [("ring", 3), ("allgather", 8)])
@pytest.mark.parametrize("name", ["cacr", "contrastive_gap", "gram"])
def test_sharded_batch_equals_dense(name, impl, n_devices):
  """Over a mesh the value and the gradients (a traced logit scale or temperature included) are those
  of the dense loss on one device, with padding rows (ring) and without (allgather)."""
  loss, args = _sharded_case(name, masked=impl == "ring")
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)


def test_sharded_gram_negatives_are_the_unsharded_draws():
  """Each global row draws with its own key: over a mesh (a padded batch; "allgather" runs the same
  gathered code) the indices are those of the one-device call."""
  xs, key = [randn(k, 24, 4) for k in (1, 2)], jax.random.key(3)
  want = gram_negatives(*xs, key=key, temperature=0.5, mask=PADDED)
  got = jax.jit(lambda *a: gram_negatives(*a, key=key, temperature=0.5, mask=PADDED, impl="ring",
                                          mesh=helpers.device_mesh(8)))(*xs)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
