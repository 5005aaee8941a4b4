"""Tests of jaxcl/losses/clip.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from tests.helpers import (
    assert_engines_agree,
    assert_padded_equals_unpadded,
    assert_reductions_agree,
    assert_value_and_grads,
    randn,
)
from tests.losses import reference
import jaxcl


SHAPES = [(2, 3), (5, 4), (8, 16)]


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_clip_matches_reference(b, d, scale):
  assert_value_and_grads(
      functools.partial(losses.clip, logit_scale=scale),
      functools.partial(reference.clip.clip, logit_scale=scale),
      [randn(9, b, d), randn(10, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_clip_label_smoothing_matches_reference(b, d, eps):
  assert_value_and_grads(
      lambda i, t, s: losses.clip(i, t, logit_scale=s, label_smoothing=eps),
      lambda i, t, s: reference.clip.clip_label_smoothing(i, t, s, eps),
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
      functools.partial(reference.clip.siglip, logit_scale=10.0, logit_bias=-10.0),
      [randn(11, b, d), randn(12, b, d)],
  )


def test_learnable_scale_and_bias_gradients():
  image, text = randn(13, 6, 4), randn(14, 6, 4)
  g_scale, g_bias = jax.grad(
      lambda s, bias: losses.siglip(image, text, logit_scale=s, logit_bias=bias), argnums=(0, 1)
  )(3.0, -2.0)
  want_s = reference.common.numerical_grad(lambda s: reference.clip.siglip(image, text, s[()], -2.0), np.array(3.0))
  want_b = reference.common.numerical_grad(lambda b: reference.clip.siglip(image, text, 3.0, b[()]), np.array(-2.0))
  np.testing.assert_allclose([g_scale, g_bias], [want_s, want_b], rtol=1e-4)
  g_t = jax.grad(lambda t: losses.clip(image, text, logit_scale=1.0 / t))(0.1)
  want_t = reference.common.numerical_grad(lambda t: reference.clip.clip(image, text, 1.0 / t[()]), np.array(0.1))
  np.testing.assert_allclose(g_t, want_t, rtol=1e-4)


def test_clip_is_mean_of_two_infonce_directions():
  i, t = randn(22, 7, 5), randn(23, 7, 5)
  both = 0.5 * (losses.infonce(i, t, temperature=0.1) + losses.infonce(t, i, temperature=0.1))
  np.testing.assert_allclose(float(losses.clip(i, t, logit_scale=10.0)), float(both), rtol=1e-6)


# ------------------------------------------------------------------------------------------ grouped_itc
GROUPS = np.array([2, 0, 0, 1, 2, 1, 1, 2], np.int32)  # uneven groups, not contiguous


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_grouped_itc_matches_reference(scale):
  assert_value_and_grads(
      lambda i, t, s: losses.grouped_itc(i, t, GROUPS, logit_scale=s),
      lambda i, t, s: reference.clip.grouped_itc(i, t, GROUPS, s),
      [randn(94, 8, 4), randn(95, 8, 4), np.float32(scale)], jit=True,
  )


def test_grouped_itc_with_one_group_is_clip_and_with_equal_groups_the_mean_of_their_clip_losses():
  """One group: `clip`. Groups of 3 consecutive pairs (3 ranks' shards in M2-Encoder): the mean of the
  3 groups' CLIP losses (the float64 reference)."""
  i, t = randn(98, 9, 4), randn(99, 9, 4)
  one, three, whole = jax.jit(lambda i, t: (losses.grouped_itc(i, t, jnp.full(9, 7), logit_scale=5.0),
                                            losses.grouped_itc(i, t, jnp.arange(9) // 3, logit_scale=5.0),
                                            losses.clip(i, t, logit_scale=5.0)))(i, t)
  np.testing.assert_allclose(float(one), float(whole), rtol=1e-6)
  want = np.mean([reference.clip.clip(i[k:k + 3], t[k:k + 3], 5.0) for k in (0, 3, 6)])
  np.testing.assert_allclose(float(three), want, rtol=2e-5)


def test_grouped_itc_engines_agree(monkeypatch):
  monkeypatch.setattr(jaxcl.ops.blockwise, "DEFAULT_TILE", 3)
  make = lambda impl: lambda i, t: losses.grouped_itc(i, t, GROUPS, logit_scale=4.0, impl=impl)  # noqa: E731
  assert_engines_agree("grouped_itc", make, [jnp.asarray(randn(100, 8, 4)), jnp.asarray(randn(101, 8, 4))])


def test_grouped_itc_padded_batch_with_mask_equals_unpadded_batch():
  loss = lambda i, t, g, **kw: losses.grouped_itc(i, t, g, logit_scale=4.0, **kw)  # noqa: E731
  assert_padded_equals_unpadded(loss, [randn(102, 8, 4), randn(103, 8, 4), GROUPS], n_diff=2)


def test_grouped_itc_reduction_none_and_sum():
  """(2B,) per-anchor terms (images, then texts) whose masked mean is the loss; padding terms are 0."""
  a, b = randn(106, 6, 4), randn(107, 6, 4)
  assert_reductions_agree(_pairs_of_two, [a, b], 12)
  assert_reductions_agree(_pairs_of_two, [a, b], 12, mask=np.array([1, 0, 1, 1, 0, 1], bool))


@pytest.mark.parametrize("groups,error,match", [
    (None, TypeError, r"`group_ids` must be an integer array of shape \(8,\), got None"),
    (np.zeros(7, np.int32), ValueError, r"`group_ids` must have shape \(8,\), got \(7,\)"),
    (np.zeros(8, np.float32), TypeError, r"`group_ids` must have an integer dtype, got float32"),
])
def test_grouped_itc_bad_group_ids_raise(groups, error, match):
  with pytest.raises(error, match=match):
    losses.grouped_itc(randn(104, 8, 4), randn(105, 8, 4), groups, logit_scale=1.0)


def _pairs_of_two(a, b, **kw):
  """grouped_itc with groups of two consecutive pairs (B even)."""
  return losses.grouped_itc(a, b, jnp.arange(a.shape[0]) // 2, logit_scale=1 / 0.07, **kw)


ALL_PAIR_LOSSES = {
    "clip": functools.partial(losses.clip, logit_scale=1 / 0.07),
    "grouped_itc": _pairs_of_two,
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


MASKED_LOSSES = {
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
