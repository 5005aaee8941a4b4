"""Tests of jaxcl/losses/sentence.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.infonce import infonce
from jaxcl.losses.sentence import diffcse, mcse, micse, quick_thoughts, simcse
from tests import helpers
from tests.helpers import randn
from tests.losses.reference import sentence as ref


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


def attention(seed: int, shape, zeros: bool = True) -> np.ndarray:
  """Attention probabilities along the last axis (softmax of normals), with a few entries 0 in every view
  (padded keys) when `zeros`: the same positions for every seed."""
  x = np.exp(randn(seed, *shape))
  if zeros:
    x[..., -1] = 0.0
    x[0, ..., :2] = 0.0
  return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def rtd(seed: int, shape):
  """Discriminator logits and a replaced mask."""
  rng = np.random.default_rng(seed)
  return randn(seed, *shape), rng.uniform(size=shape) < 0.3


# ------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("weight", [None, 0.0, 0.7])
def test_simcse_matches_reference(weight):
  """Unsupervised (no hard negatives) and supervised with the released code's hard-negative weight."""
  z = [randn(1, 5, 4), randn(2, 5, 4)] + ([] if weight is None else [randn(3, 5, 4)])
  w = weight or 0.0
  assert_value_and_grads(
      lambda *a: simcse(*a, temperature=0.2, hard_negative_weight=w),
      lambda *a: ref.simcse(*a, temperature=0.2, hard_negative_weight=w),
      z,
  )


@pytest.mark.parametrize("counted", [False, True])
def test_diffcse_matches_reference(counted):
  logits, replaced = rtd(4, (4, 2, 3))
  token_mask = np.arange(3) < np.array([3, 1, 2, 3])[:, None, None] if counted else None
  token_mask = None if token_mask is None else np.broadcast_to(token_mask, (4, 2, 3))
  assert_value_and_grads(
      lambda a, b, x: diffcse(a, b, x, replaced, token_mask=token_mask, temperature=0.2, rtd_weight=0.5),
      lambda a, b, x: ref.diffcse(a, b, x, replaced, temperature=0.2, rtd_weight=0.5, token_mask=token_mask),
      [randn(5, 4, 3), randn(6, 4, 3), logits],
  )


def test_micse_matches_reference():
  assert_value_and_grads(
      lambda a, b, x, y: micse(a, b, x, y, temperature=0.2, mi_weight=0.5),
      lambda a, b, x, y: ref.micse(a, b, x, y, temperature=0.2, mi_weight=0.5),
      [randn(7, 4, 3), randn(8, 4, 3), attention(9, (4, 2, 5)), attention(10, (4, 2, 5))],
  )


def test_mcse_matches_reference():
  assert_value_and_grads(
      lambda *a: mcse(*a, temperature=0.2, grounding_temperature=0.3, grounding_weight=0.5),
      lambda *a: ref.mcse(*a, temperature=0.2, grounding_temperature=0.3, grounding_weight=0.5),
      [randn(11, 4, 3), randn(12, 4, 3), randn(13, 4, 2), randn(14, 4, 2), randn(15, 4, 2)],
  )


@pytest.mark.parametrize("context_size, normalize", [(1, False), (2, True)])
def test_quick_thoughts_matches_reference(context_size, normalize):
  assert_value_and_grads(
      lambda f, g: quick_thoughts(f, g, context_size=context_size, temperature=0.5, normalize=normalize),
      lambda f, g: ref.quick_thoughts(f, g, context_size, 0.5, normalize_inputs=normalize),
      [randn(16, 6, 3), randn(17, 6, 3)],
  )


# ---------------------------------------------------------------------------------------- identities
def test_simcse_is_infonce_without_hard_negatives_and_with_weight_zero():
  """Unsupervised SimCSE is InfoNCE at τ = 0.05; supervised with w = 0 is InfoNCE with the hard
  negatives as shared extra negatives."""
  a, p, n = randn(18, 6, 4), randn(19, 6, 4), randn(20, 6, 4)
  got = jax.jit(lambda a, p, n: (simcse(a, p), simcse(a, p, n)))(a, p, n)
  want = jax.jit(lambda a, p, n: (infonce(a, p, temperature=0.05), infonce(a, p, temperature=0.05, negatives=n)))(
      a, p, n)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6)


def test_extra_terms_with_weight_zero_are_simcse():
  """DiffCSE, miCSE and MCSE with λ = 0 are SimCSE; and MCSE whose grounding pairs are the SimCSE pair
  at the same temperature is (1 + λ) · SimCSE."""
  a, p = randn(21, 5, 4), randn(22, 5, 4)
  logits, replaced = rtd(23, (5, 3))
  att1, att2 = attention(24, (5, 1, 4)), attention(25, (5, 1, 4))

  def losses(a, p):
    return (simcse(a, p), diffcse(a, p, logits, replaced, rtd_weight=0.0), micse(a, p, att1, att2, mi_weight=0.0),
            mcse(a, p, a, a, p, grounding_weight=0.0), mcse(a, p, a, a, p, grounding_temperature=0.05,
                                                              grounding_weight=0.3))

  want, *got = jax.jit(losses)(a, p)
  np.testing.assert_allclose(np.array(got[:3]), [want] * 3, rtol=1e-6)
  np.testing.assert_allclose(float(got[3]), 1.3 * float(want), rtol=1e-6)


def test_quick_thoughts_of_two_sentences_is_softplus():
  """B = 2, c = 1: each sentence's one neighbour against itself at logit 0: ℓ_i = softplus(−s_{i,1−i})."""
  f, g = randn(26, 2, 3), randn(27, 2, 3)
  s = np.array([f[0] @ g[1], f[1] @ g[0]], np.float64) / 0.5
  got = jax.jit(lambda f, g: quick_thoughts(f, g, temperature=0.5, reduction="none"))(f, g)
  np.testing.assert_allclose(np.asarray(got), np.logaddexp(0.0, -s), rtol=1e-5, atol=1e-6)


def test_micse_of_identical_views_is_the_information_floor():
  """Identical attention (ρ = 1): I = −½ log 1e-6 on every row; c = 1 without zeros."""
  a, p = randn(28, 3, 4), randn(29, 3, 4)
  att = attention(30, (3, 2, 5), zeros=False)
  got = jax.jit(lambda a, p: micse(a, p, att, att, mi_weight=1.0) - simcse(a, p))(a, p)
  np.testing.assert_allclose(float(got), 0.5 * np.log(1e-6) * (1 + 1e-6), rtol=1e-5)


# ------------------------------------------------------------------------------------- engines, dtype
def _every_loss(impl=None, dtype=jnp.float32):
  """The sum of the five losses with options that reach each term, on 6 sentences."""
  logits, replaced = rtd(31, (6, 2, 3))
  att1, att2 = attention(32, (6, 2, 5)), attention(33, (6, 2, 5))
  kw = {} if impl is None else {"impl": impl}

  def total(a, p, n, g, v):
    a, p, n, g, v = (x.astype(dtype) for x in (a, p, n, g, v))
    return (simcse(a, p, n, hard_negative_weight=0.5, **kw)
            + diffcse(a, p, logits, replaced, rtd_weight=0.3, **kw)
            + micse(a, p, att1, att2, mi_weight=0.3, **kw)
            + mcse(a, p, g, g + 0.1, v, grounding_weight=0.3, **kw)
            + quick_thoughts(a, p, context_size=2, temperature=2.0, **kw))

  args = [randn(34 + i, 6, 8) for i in range(3)] + [randn(37, 6, 4), randn(38, 6, 4)]
  return total, args


def test_engines_agree():
  _, args = _every_loss()
  helpers.assert_engines_agree("sentence losses", lambda impl: _every_loss(impl)[0], args)


def test_bfloat16_is_close_to_float32():
  total32, args = _every_loss()
  total16, _ = _every_loss(dtype=jnp.bfloat16)
  got, want = jax.jit(lambda *a: (total16(*a), total32(*a)))(*args)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(want), rtol=2e-2)


# ------------------------------------------------------------------------------ sharded, mask, reduction
SHARDED_CASES = {
    "simcse": (lambda a, p, n, m, **kw: simcse(a, p, n, hard_negative_weight=0.5, temperature=0.2, mask=m, **kw),
               lambda: [randn(40, 12, 4), randn(41, 12, 4), randn(42, 12, 4), np.arange(12) % 5 != 3]),
    "diffcse": (lambda a, p, x, y, t, **kw: diffcse(a, p, x, y, token_mask=t, rtd_weight=0.5, temperature=0.2, **kw),
                lambda: [randn(43, 8, 4), randn(44, 8, 4), *rtd(45, (8, 3)), np.arange(3) < np.arange(8)[:, None] % 3 + 1]),
    "micse": (lambda a, p, x, y, **kw: micse(a, p, x, y, mi_weight=0.5, temperature=0.2, **kw),
              lambda: [randn(46, 12, 4), randn(47, 12, 4), attention(48, (12, 2, 5)), attention(49, (12, 2, 5))]),
    "mcse": (lambda *a, **kw: mcse(*a, grounding_weight=0.5, temperature=0.2, **kw),
             lambda: [randn(50 + i, 8, 4) for i in range(5)]),
    "quick_thoughts": (lambda f, g, **kw: quick_thoughts(f, g, context_size=2, temperature=2.0, **kw),
                       lambda: [randn(55, 12, 4), randn(56, 12, 4)]),
}


@pytest.mark.parametrize("name, impl, n_devices", [
    ("simcse", "ring", 3), ("diffcse", "allgather", 8), ("micse", "ring", 3), ("mcse", "allgather", 8),
    ("quick_thoughts", "ring", 6)])
def test_sharded_equals_dense(name, impl, n_devices):
  """The batch split over devices: the value and gradients of the one-device loss (simcse with a padded
  batch; quick_thoughts with context rows that cross the devices' edges, two per device)."""
  loss, args = SHARDED_CASES[name]
  helpers.assert_sharded_equals_dense(loss, args(), impl=impl, n_devices=n_devices)


def test_padded_batch_equals_unpadded():
  """Padding sentences (random positions) change nothing: SimCSE with hard negatives, DiffCSE, miCSE."""
  logits, replaced = rtd(57, (5, 3))
  att1, att2 = attention(58, (5, 2, 4)), attention(59, (5, 2, 4))

  def loss(a, p, n, x, y, u, v, mask=None):
    return (simcse(a, p, n, hard_negative_weight=0.5, mask=mask) + diffcse(a, p, x, y, rtd_weight=0.5, mask=mask)
            + micse(a, p, jnp.abs(u), jnp.abs(v), mi_weight=0.5, mask=mask))

  helpers.assert_padded_equals_unpadded(
      loss, [randn(60, 5, 4), randn(61, 5, 4), randn(62, 5, 4), logits, replaced, att1, att2], n_diff=3,
      rtol=2e-6)


def test_quick_thoughts_padding_at_the_end_equals_the_shorter_text():
  f, g = randn(63, 7, 3), randn(64, 7, 3)
  mask = np.arange(7) < 5
  got, want = jax.jit(lambda f, g: (quick_thoughts(f, g, mask=mask, context_size=2),
                                    quick_thoughts(f[:5], g[:5], context_size=2)))(f, g)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize("name", ["diffcse", "micse", "quick_thoughts"])
def test_reductions_agree(name):
  loss, args = SHARDED_CASES[name]
  helpers.assert_reductions_agree(loss, args(), 8 if name == "diffcse" else 12)


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)
B43 = ONES((4, 3))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: simcse(B43, ONES((4, 2))), r"`anchor` and `positive` must have the same shape"),
        (lambda: simcse(ONES((1, 3)), ONES((1, 3))), r"`anchor` needs at least 2 examples"),
        (lambda: simcse(B43, B43, ONES((3, 3))), r"`hard_negatives` must have shape \(4, 3\)"),
        (lambda: simcse(B43, B43, hard_negative_weight=np.inf), r"`hard_negative_weight` must be finite"),
        (lambda: simcse(B43, B43, temperature=0.0), r"`temperature` must be positive"),
        (lambda: diffcse(B43, B43, ONES((4,)), np.ones(4, bool)), r"`rtd_logits` must have rank 2"),
        (lambda: diffcse(B43, B43, ONES((3, 5)), np.ones((3, 5), bool)), r"`rtd_logits` must have one row per sentence"),
        (lambda: diffcse(B43, B43, ONES((4, 5)), ONES((4, 5))), r"`replaced` must be a boolean array of shape \(4, 5\)"),
        (lambda: diffcse(B43, B43, ONES((4, 5)), np.ones((4, 5), bool), token_mask=np.ones((4, 4), bool)),
         r"`token_mask` must be None or a boolean array of shape \(4, 5\)"),
        (lambda: diffcse(B43, B43, ONES((4, 5)), np.ones((4, 5), bool), rtd_weight=-1.0), r"`rtd_weight` must be >= 0"),
        (lambda: micse(B43, B43, ONES((4, 5)), ONES((4, 6))), r"`attention1` and `attention2` must have the same shape"),
        (lambda: micse(B43, B43, ONES((4, 5)), ONES((4, 5)), mi_weight=-0.1), r"`mi_weight` must be >= 0"),
        (lambda: mcse(B43, B43, ONES((4, 2)), ONES((4, 2)), ONES((4, 3))), r"`grounding1` and `image` must have the same shape"),
        (lambda: mcse(B43, B43, ONES((5, 2)), ONES((5, 2)), ONES((5, 2))), r"`grounding1` must have one row per sentence"),
        (lambda: mcse(B43, B43, B43, B43, B43, grounding_temperature=-1.0), r"`grounding_temperature` must be positive"),
        (lambda: quick_thoughts(B43, B43, context_size=0), r"`context_size` must be an integer >= 1"),
        (lambda: quick_thoughts(ONES((1, 3)), ONES((1, 3))), r"`inputs` needs at least 2 examples along axis 0 \(a sentence needs a neighbour\)"),
        (lambda: simcse(B43, B43, mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: quick_thoughts(B43, B43, reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
