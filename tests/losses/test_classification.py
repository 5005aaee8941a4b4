"""Tests of jaxcl/losses/classification.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
import jaxcl
from tests import helpers
from tests.helpers import (
    assert_engines_agree,
    assert_padded_equals_unpadded,
    assert_reductions_agree,
    assert_value_and_grads,
    randn,
)
from tests.losses import reference


# ------------------------------------------------------------------------------------------- CatLIP
TARGETS = (np.random.default_rng(0).random((6, 5)) < 0.3).astype(np.float32)


def test_catlip_matches_reference():
  assert_value_and_grads(lambda z: losses.catlip(z, TARGETS), lambda z: reference.classification.catlip(z, TARGETS),
                         [3 * randn(1, 6, 5)], jit=True)


def test_catlip_soft_targets_match_reference():
  soft = np.random.default_rng(1).random((4, 3)).astype(np.float32)
  assert_value_and_grads(lambda z: losses.catlip(z, soft), lambda z: reference.classification.catlip(z, soft),
                         [randn(2, 4, 3)], jit=True)


def test_catlip_with_one_class_is_binary_cross_entropy_and_with_one_hot_sums_over_classes():
  """One class: −log σ(z) for a positive, −log σ(−z) for a negative (hand values); one-hot targets of
  C classes: the positive's term plus the C − 1 negatives' softplus."""
  z = np.array([[0.0], [2.0]], np.float32)
  got = losses.catlip(z, np.array([[1.0], [0.0]]), reduction="none")
  np.testing.assert_allclose(np.asarray(got), [np.log(2.0), np.log1p(np.exp(2.0))], rtol=1e-6)
  z = np.array([[1.0, -1.0, 0.5]], np.float32)
  got = float(losses.catlip(z, np.array([[False, True, False]])))
  np.testing.assert_allclose(got, np.log1p(np.exp(1.0)) + np.log1p(np.exp(1.0)) + np.log1p(np.exp(0.5)), rtol=1e-6)


def test_catlip_reduction_and_padded_batch():
  z = randn(3, 6, 5)
  assert_reductions_agree(lambda z, **kw: losses.catlip(z, TARGETS, **kw), [z], 6)
  assert_reductions_agree(lambda z, **kw: losses.catlip(z, TARGETS, **kw), [z], 6,
                          mask=np.array([1, 0, 1, 1, 0, 1], bool))
  assert_padded_equals_unpadded(lambda z, t, **kw: losses.catlip(z, t, **kw), [z, TARGETS], n_diff=1)


def test_catlip_bf16_and_extreme_logits():
  z = 4 * randn(4, 6, 5)
  lo = losses.catlip(jnp.asarray(z, jnp.bfloat16), TARGETS)
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(float(lo), float(losses.catlip(z, TARGETS)), rtol=2e-2)
  value, grad = jax.value_and_grad(lambda z: losses.catlip(z, TARGETS))(jnp.asarray(1e30 * z))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_catlip_targets_match_reference_and_feed_catlip():
  token_ids = np.array([[0, 3, 3, 5], [1, 1, 1, 1], [4, 2, 0, 5]], np.int32)  # 1: padding, no class
  vocabulary = np.array([2, -1, 0, 1, -1, 2], np.int32)
  got = jax.jit(lambda i, v: losses.catlip_targets(i, v, num_classes=4))(token_ids, vocabulary)
  want = reference.classification.catlip_targets(token_ids, vocabulary, 4)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want[0].tolist() == [0, 1, 1, 0] and not want[1].any()  # repeated word once; nothing to learn
  z = randn(5, 3, 4)
  np.testing.assert_allclose(float(losses.catlip(z, got)), reference.classification.catlip(z, want), rtol=1e-6)


@pytest.mark.parametrize("call,error,match", [
    (lambda: losses.catlip(np.zeros((2, 3), np.float32), np.zeros((2, 4))), ValueError,
     r"`targets` must have the shape of `logits` \(2, 3\), got \(2, 4\)"),
    (lambda: losses.catlip(np.zeros((2, 3), np.float32), 2 * np.ones((2, 3))), ValueError,
     r"`targets` must lie in \[0, 1\], got values in \[2.0, 2.0\]"),
    (lambda: losses.catlip(np.zeros((2, 3), np.int32), np.ones((2, 3))), TypeError,
     r"`logits` must be a floating-point array"),
    (lambda: losses.catlip(np.zeros((2, 3), np.float32), np.ones((2, 3)), reduction="avg"), ValueError,
     r"`reduction` must be one of"),
    (lambda: losses.catlip_targets(np.array([[0, 3]]), np.array([0, 1, 2]), num_classes=3), ValueError,
     r"`token_ids` must lie in \[0, 2\], got values in \[0, 3\]"),
    (lambda: losses.catlip_targets(np.array([[0, 1]]), np.array([0, 3]), num_classes=3), ValueError,
     r"`vocabulary` must lie in \[-1, 2\], got values in \[0, 3\]"),
    (lambda: losses.catlip_targets(np.array([[0.0]]), np.array([0]), num_classes=1), TypeError,
     r"`token_ids` must have an integer dtype, got float"),
    (lambda: losses.catlip_targets(np.array([[0]]), np.array([0]), num_classes=0), ValueError,
     r"`num_classes` must be a positive Python int, got 0"),
])
def test_catlip_bad_inputs_raise_clear_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --------------------------------------------------------------------------------------------- UNPG
LABELS = np.array([0, 2, 1, 2, 0, 3, 1, 2], np.int32)


@pytest.mark.parametrize("margin_type,margin", [("arcface", 0.5), ("cosface", 0.35)])
def test_unpg_matches_reference(margin_type, margin):
  """10 of the 23 negative pairs of these features fall outside the whiskers (w = 0.05), none within
  0.05 of a whisker (finite differences do not move a pair across)."""
  x, w = randn(20, 8, 4), randn(21, 5, 4)
  assert_value_and_grads(
      lambda x, w: losses.unpg(x, LABELS, w, scale=8.0, margin=margin, margin_type=margin_type, whisker=0.05),
      lambda x, w: reference.classification.unpg(x, LABELS, w, 8.0, margin, margin_type, whisker=0.05),
      [x, w], jit=True)


def test_unpg_without_negative_pairs_is_arcface_and_a_wide_whisker_keeps_every_pair():
  """One label: no negative pair, the ArcFace loss (the reference without pairs); w = 1e6 keeps every
  pair, as `whisker=None` (the engine path) does."""
  x, w = randn(22, 6, 4), randn(23, 3, 4)
  same, labels = np.ones(6, np.int32), LABELS[:6] % 3

  @jax.jit
  def three(x, w):
    return (losses.unpg(x, same, w, scale=4.0), losses.unpg(x, labels, w, scale=4.0, whisker=1e6),
            losses.unpg(x, labels, w, scale=4.0, whisker=None))

  one_label, wide, unfiltered = (float(v) for v in three(x, w))
  np.testing.assert_allclose(one_label, reference.classification.unpg(x, same, w, 4.0, 0.5), rtol=1e-5)
  np.testing.assert_allclose(unfiltered, wide, rtol=1e-5)
  np.testing.assert_allclose(wide, reference.classification.unpg(x, labels, w, 4.0, 0.5, whisker=None), rtol=1e-5)


def test_unpg_engines_agree(monkeypatch):
  """Both pair terms at once: through the engines (`whisker=None`) and dense with the filter."""
  monkeypatch.setattr(jaxcl.ops.blockwise, "DEFAULT_TILE", 3)
  make = lambda impl: lambda x, w: (losses.unpg(x, LABELS, w, scale=8.0, whisker=None, impl=impl)  # noqa: E731
                                    + losses.unpg(x, LABELS, w, scale=8.0, whisker=1.5, impl=impl))
  assert_engines_agree("unpg", make, [jnp.asarray(randn(24, 8, 4)), jnp.asarray(randn(25, 5, 4))])


def test_unpg_reduction_and_padded_batch():
  x, w = randn(26, 6, 4), randn(27, 4, 4)
  labels = LABELS[:6] % 4
  loss = lambda x, **kw: losses.unpg(x, labels, w, scale=8.0, **kw)  # noqa: E731
  assert_reductions_agree(loss, [x], 6, mask=np.array([1, 0, 1, 1, 0, 1], bool))
  both = lambda x, y, **kw: (losses.unpg(x, y, w, scale=8.0, whisker=None, **kw)  # noqa: E731
                            + losses.unpg(x, y, w, scale=8.0, whisker=1.5, **kw))  # the engines' and the filter's pairs
  assert_padded_equals_unpadded(both, [x, labels], n_diff=1, rtol=1e-5)


def test_unpg_bf16_and_extremes_are_finite():
  x, w = randn(28, 8, 4), randn(29, 5, 4)
  loss = jax.jit(lambda x, w: losses.unpg(x, LABELS, w, scale=8.0))
  lo = loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(float(lo), float(loss(x, w)), rtol=3e-2)
  aligned = w[LABELS % 5]  # every feature on its proxy: cos = 1, where arccos has an infinite slope
  value, grads = jax.jit(jax.value_and_grad(lambda x, w: losses.unpg(x, LABELS % 5, w), argnums=(0, 1)))(aligned, w)
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("impl, n_devices, whisker, masked", [("ring", 3, None, False), ("allgather", 8, 0.5, True)])
def test_unpg_sharded_equals_dense(impl, n_devices, whisker, masked):
  """The examples split over 3 or 8 devices (a padded batch on 8), the class weights replicated: the
  value and gradients (class weights too) of the one-device loss, the pairs those of the global batch:
  on the sharded engine without a filter; with w = 0.5 (21 of the 135 pairs of the padded batch fall
  outside the whiskers) every device filters the gathered batch's pairs."""
  mask = np.arange(24) % 5 != 2
  labels = (np.arange(24, dtype=np.int32) * 7) % 5
  loss = lambda x, y, w, m, **kw: losses.unpg(  # noqa: E731
      x, y, w, scale=8.0, margin=0.3, whisker=whisker, mask=m if masked else None, **kw)
  helpers.assert_sharded_equals_dense(loss, [randn(30, 24, 4), labels, randn(31, 5, 4), mask], impl=impl,
                                      n_devices=n_devices)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": np.array([0, 5])}, ValueError, r"`labels` must lie in \[0, 2\], got values in \[0, 5\]"),
    ({"class_weights": np.ones((3, 2), np.float32)}, ValueError,
     r"`features` and `class_weights` must have the same feature size, got \(2, 4\) and \(3, 2\)"),
    ({"margin_type": "sphereface"}, ValueError, r"`margin_type` must be one of \('arcface', 'cosface'\)"),
    ({"whisker": -1.0}, ValueError, r"`whisker` must be >= 0, got -1.0"),
    ({"scale": 0.0}, ValueError, r"`scale` must be positive"),
])
def test_unpg_bad_inputs_raise_clear_errors(kwargs, error, match):
  args = {"features": np.ones((2, 4), np.float32), "labels": np.array([0, 1]), "class_weights": np.ones((3, 4), np.float32)}
  args.update(kwargs)
  with pytest.raises(error, match=match):
    losses.unpg(args.pop("features"), args.pop("labels"), args.pop("class_weights"), **args)
