"""Tests of jaxcl/losses/infonce.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from tests.helpers import assert_padded_equals_unpadded, assert_reductions_agree, assert_value_and_grads, randn
from tests.losses import reference
import jaxcl


SHAPES = [(2, 3), (5, 4), (8, 16)]


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_infonce_matches_reference(b, d, temperature):
  assert_value_and_grads(
      functools.partial(losses.infonce, temperature=temperature),
      functools.partial(reference.infonce.infonce, temperature=temperature),
      [randn(1, b, d), randn(2, b, d)],
  )


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("in_batch", [True, False])
def test_infonce_with_negatives_matches_reference(shared, in_batch):
  b, d, h = 4, 5, 3
  neg = randn(3, 7, d) if shared else randn(3, b, h, d)
  assert_value_and_grads(
      lambda q, k, n: losses.infonce(q, k, temperature=0.2, negatives=n, in_batch_negatives=in_batch),
      lambda q, k, n: reference.infonce.infonce(q, k, 0.2, negatives=n, in_batch_negatives=in_batch),
      [randn(1, b, d), randn(2, b, d), neg],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_nt_xent_matches_reference(b, d):
  assert_value_and_grads(
      functools.partial(losses.nt_xent, temperature=0.5),
      functools.partial(reference.infonce.nt_xent, temperature=0.5),
      [randn(3, b, d), randn(4, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_dcl_matches_reference(b, d):
  assert_value_and_grads(
      functools.partial(losses.dcl, temperature=0.3),
      functools.partial(reference.infonce.dcl, temperature=0.3),
      [randn(5, b, d), randn(6, b, d)],
  )


@pytest.mark.parametrize("b,d", SHAPES)
def test_dclw_matches_reference(b, d):
  # The DCLW weight is a constant: the reference is differentiated with the weight held fixed.
  z1, z2 = randn(7, b, d), randn(8, b, d)
  got = losses.dclw(z1, z2, temperature=0.3, sigma=0.5)
  np.testing.assert_allclose(float(got), reference.infonce.dclw(z1, z2, 0.3, 0.5), rtol=2e-5)
  a, c = reference.common.normalize(z1), reference.common.normalize(z2)
  pos = np.sum(a * c, 1) / 0.5
  w = 2.0 - b * np.exp(pos - pos.max()) / np.exp(pos - pos.max()).sum()
  grad = jax.grad(lambda x: losses.dclw(x, z2, temperature=0.3, sigma=0.5))(z1)
  want = reference.common.numerical_grad(lambda x: reference.infonce.dcl(x, z2, 0.3, weights=w), z1)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5)


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


def test_infonce_queue_form_is_cross_entropy_over_positive_and_queue():
  q, k, queue = randn(24, 4, 3), randn(25, 4, 3), randn(26, 9, 3)
  moco = losses.infonce(q, k, temperature=0.2, negatives=queue, in_batch_negatives=False)
  qn, kn, nn = (np.asarray(losses.l2_normalize(jnp.asarray(x))) for x in (q, k, queue))
  logits = np.concatenate([np.sum(qn * kn, 1, keepdims=True), qn @ nn.T], axis=1) / 0.2
  ce = np.mean(reference.common.logsumexp(logits, 1) - logits[:, 0])
  np.testing.assert_allclose(float(moco), ce, rtol=1e-5)


def test_normalize_false_uses_raw_dot_products():
  q, k = randn(27, 4, 3), randn(28, 4, 3)
  s = q.astype(np.float64) @ k.T.astype(np.float64)
  want = np.mean(reference.common.logsumexp(s, 1) - np.diag(s))
  np.testing.assert_allclose(float(losses.infonce(q, k, temperature=1.0, normalize=False)), want, rtol=1e-5)


ALL_PAIR_LOSSES = {
    "infonce": functools.partial(losses.infonce, temperature=0.1),
    "nt_xent": functools.partial(losses.nt_xent, temperature=0.5),
    "dcl": functools.partial(losses.dcl, temperature=0.1),
    "dclw": functools.partial(losses.dclw, temperature=0.1),
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


MASKED_LOSSES = {
    "infonce": (functools.partial(losses.infonce, temperature=0.1), 1),
    "infonce_queue": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.2, negatives=randn(70, 7, 4), **kw), 1),
    "moco": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.2, negatives=randn(71, 7, 4),
                                               in_batch_negatives=False, **kw), 1),
    "nt_xent": (functools.partial(losses.nt_xent, temperature=0.5), 2),
    "dcl": (functools.partial(losses.dcl, temperature=0.1), 2),
    "dclw": (functools.partial(losses.dclw, temperature=0.1), 2),
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
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_traced_temperature_is_accepted():
  a, b = randn(40, 5, 3), randn(41, 5, 3)
  f = jax.jit(lambda t: losses.nt_xent(a, b, temperature=t))
  np.testing.assert_allclose(float(f(0.5)), reference.infonce.nt_xent(a, b, 0.5), rtol=1e-5)
