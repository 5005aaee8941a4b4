"""Tests of jaxcl/losses/matryoshka_2d.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.matryoshka_2d import STARBUCKS_PAIRS, layer_kl, matryoshka_2d, starbucks
from jaxcl.losses.multiview import multiview_infonce
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference
from tests.losses.reference.matryoshka_2d import ref_clip, ref_layer_kl


logsumexp = reference.common.logsumexp


def check(jax_loss, np_loss, args, **tolerances):
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


_MASK5 = np.array([1, 0, 1, 1, 1], bool)


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
