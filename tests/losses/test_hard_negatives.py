"""Tests of jaxcl/losses/hard_negatives.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.losses.clip import clip
from jaxcl.losses.clustering import mcl_nt_xent
from jaxcl.losses.false_negatives import decoupled_softmax, positive_aware_infonce
from jaxcl.losses.hard_negatives import ce_clip, dual_view_moco, hn_nce
from jaxcl.losses.infonce import infonce
from tests import helpers
from tests.helpers import randn
from tests.losses.reference.hard_negatives import ref_ce_clip, ref_ce_thresholds, ref_dual_view_moco, ref_hn_nce


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


_engines = helpers.engines


# -------------------------------------------------------------------------------------------------- HN-NCE
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 0.5, 0.2), (0.0, 0.3, 0.5), (0.5, 1.0, 0.1)])
def test_hn_nce_matches_reference(alpha, beta, tau):
  assert_value_and_grads(
      lambda a, b: hn_nce(a, b, temperature=tau, alpha=alpha, beta=beta),
      lambda a, b: ref_hn_nce(a, b, tau, alpha, beta),
      [randn(1, 5, 4), randn(2, 5, 4)],
  )


def test_hn_nce_without_concentration_is_clip():
  x, y = randn(3, 6, 5), randn(4, 6, 5)
  got, want = jax.jit(lambda a, b: (hn_nce(a, b, temperature=0.1, beta=0.0), clip(a, b, logit_scale=10.0)))(x, y)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_hn_nce_concentration_increases_the_loss():
  # Σ_j w_ij e^{s_ij} with weights ∝ e^{β s} is (B−1)·E_w[e^s] >= Σ_j e^s·(B−1)/(B−1) (Chebyshev's sum
  # inequality: e^{βs} and e^{s} are similarly ordered), so the loss grows with β.
  x, y = randn(5, 6, 4), randn(6, 6, 4)
  values = [float(hn_nce(x, y, temperature=0.2, beta=b)) for b in (0.0, 0.5, 2.0)]
  assert values[0] < values[1] < values[2]


# ---------------------------------------------------------------------- reduction= and mask= (issue 12 item 9)
def _assert_mask_and_reductions(loss, arrays, n_anchors, impls=("dense", "blockwise"), n_diff=None):
  """For each engine: a padded batch with `mask` gives the unpadded loss and gradients (exactly 0 on the
  padding rows); "none" has the default value as its mean over the valid anchors and "sum" as its sum;
  a bad `mask` or `reduction` is refused naming the argument."""
  for impl in impls:
    bound = functools.partial(loss, impl=impl)
    try:
      helpers.assert_padded_equals_unpadded(bound, arrays, n_diff=n_diff, rtol=2e-6)
    except AssertionError as e:
      raise AssertionError(f"impl={impl}") from e
  b = np.shape(arrays[0])[0]
  helpers.assert_reductions_agree(loss, arrays, n_anchors)
  helpers.assert_reductions_agree(loss, arrays, n_anchors, mask=np.arange(b) != 1)
  arrays = [jnp.asarray(a) for a in arrays]
  with pytest.raises(ValueError, match="`reduction`"):
    loss(*arrays, reduction="avg")
  with pytest.raises(ValueError, match=r"`mask` must have shape \(%d,\)" % b):
    loss(*arrays, mask=jnp.ones((b + 1,), bool))
  with pytest.raises(TypeError, match="`mask` must be a boolean"):
    loss(*arrays, mask=jnp.ones((b,), jnp.int32))


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_hn_nce_mask_and_reduction(alpha):
  loss = functools.partial(hn_nce, temperature=0.3, alpha=alpha, beta=0.5)
  _assert_mask_and_reductions(loss, [randn(40, 5, 4), randn(41, 5, 4)], 10, impls=("dense", "blockwise", "pallas"))
  per = np.asarray(loss(randn(40, 5, 4), randn(41, 5, 4), reduction="none"), np.float64)
  want = [ref_hn_nce(randn(40, 5, 4).astype(np.float64), randn(41, 5, 4).astype(np.float64), 0.3, alpha, 0.5)]
  np.testing.assert_allclose(per.mean(), want[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ CE-CLIP
def test_ce_clip_matches_reference():
  img, txt, hn = randn(21, 3, 3), randn(22, 3, 3), randn(23, 3, 3, 3)
  valid = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], bool)
  thresholds = np.array([0.5, -0.2, 1.0], np.float32)
  assert_value_and_grads(
      lambda a, b, n: ce_clip(a, b, n, logit_scale=3.0, thresholds=thresholds, valid=valid).loss,
      lambda a, b, n: ref_ce_clip(a, b, n, 3.0, thresholds, valid, 0.3, 0.2),
      [img, txt, hn],
  )
  out = jax.jit(lambda a: ce_clip(a, txt, hn, logit_scale=3.0, thresholds=thresholds, valid=valid))(img)
  np.testing.assert_allclose(out.thresholds, ref_ce_thresholds(img, txt, hn, 3.0, valid), rtol=1e-5, atol=1e-6)
  unclipped = ref_ce_thresholds(img, txt, hn, 3.0, valid, -np.inf, np.inf)
  assert np.any(unclipped < 0)  # the clamp matters for these inputs
  free = jax.jit(lambda a: ce_clip(a, txt, hn, logit_scale=3.0, valid=valid, threshold_range=None))(img)
  np.testing.assert_allclose(free.thresholds, unclipped, rtol=1e-5)
  high = jax.jit(lambda a: ce_clip(a, txt, hn, logit_scale=3.0, valid=valid, threshold_range=(0.0, 0.1)))(img)
  np.testing.assert_allclose(high.thresholds, np.clip(unclipped, 0.0, 0.1), rtol=1e-5)
  grad = jax.jit(jax.grad(lambda a: ce_clip(a, txt, hn, logit_scale=3.0).thresholds.sum()))(jnp.asarray(img))
  np.testing.assert_array_equal(grad, 0.0)  # the thresholds are a state, not a differentiable output


def test_ce_clip_mask_and_reduction():
  thresholds = jnp.array([0.5, 1.0])
  valid = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]], bool)
  out = lambda a, b, n, v, **kw: ce_clip(a, b, n, logit_scale=3.0, thresholds=thresholds, valid=v,
                                         threshold_range=None, **kw)  # θ unclipped: its value is checked
  loss = lambda *args, **kw: out(*args, **kw).loss
  args = [randn(52, 5, 4), randn(53, 5, 4), randn(54, 5, 2, 4), valid]
  _assert_mask_and_reductions(loss, args, 5, impls=("dense", "blockwise", "pallas"), n_diff=3)
  per = out(*args, reduction="none")
  assert isinstance(per, losses.CeClipOutput)  # public, like the other multi-output losses' types
  want = ref_ce_clip(*[a.astype(np.float64) for a in args[:3]], 3.0, thresholds, valid, 0.3, 0.2)
  np.testing.assert_allclose(float(np.mean(per.loss)), want, rtol=1e-5)
  mean = out(*args)
  for name in ("loss", "itc", "imc", "cmr"):  # every field follows `reduction`
    assert getattr(per, name).shape == (5,), name
    np.testing.assert_allclose(float(np.mean(getattr(per, name))), float(getattr(mean, name)), rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(per.loss), np.asarray(per.itc + 0.3 * per.imc + 0.2 * per.cmr), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(per.thresholds), np.asarray(mean.thresholds))
  assert np.all(np.asarray(mean.thresholds) != 0)
  # the θ update of a padded batch is that of its valid pairs
  padded, keep = helpers.pad_batch(1, args, 3)
  got = jax.jit(lambda *xs: out(*xs, mask=jnp.asarray(keep)).thresholds)(*padded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(mean.thresholds), rtol=1e-6)


def test_ce_clip_without_hard_negatives_is_clip():
  img, txt, hn = randn(24, 5, 4), randn(25, 5, 4), randn(26, 5, 2, 4)
  out, want = jax.jit(lambda a, b, n: (
      ce_clip(a, b, n, logit_scale=5.0, valid=jnp.zeros((5, 2), bool)), clip(a, b, logit_scale=5.0)
  ))(img, txt, hn)
  np.testing.assert_allclose([float(out.loss), float(out.itc)], [float(want)] * 2, rtol=1e-5)
  np.testing.assert_allclose([float(out.imc), float(out.cmr)], [0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("top_k,dual", [(None, True), (3, True), (2, False)])
def test_dual_view_moco_matches_reference(top_k, dual):
  assert_value_and_grads(
      lambda a, b, n: dual_view_moco(a, b, n, temperature=0.2, top_k=top_k, dual_view=dual),
      lambda a, b, n: ref_dual_view_moco(a, b, n, 0.2, top_k, dual),
      [randn(50, 4, 3), randn(51, 4, 3), randn(52, 7, 3)],
  )


def test_dual_view_moco_reduces_to_moco_infonce():
  q, k, queue = randn(53, 5, 4), randn(54, 5, 4), randn(55, 9, 4)
  f = jax.jit(lambda a, b, n: (
      dual_view_moco(a, b, n, dual_view=False),
      dual_view_moco(a, b, n, dual_view=False, top_k=9),
      infonce(a, b, negatives=n, in_batch_negatives=False, temperature=0.2),
      dual_view_moco(a, b, n, dual_view=False, top_k=2),
  ))
  plain, all_k, moco, hard = f(q, k, queue)
  np.testing.assert_allclose([float(plain), float(all_k)], [float(moco)] * 2, rtol=1e-5)
  assert float(hard) < float(moco)  # fewer negatives in every denominator


# -------------------------------------------------------------------------------------------- engines
def test_every_engine_agrees_with_dense():
  x, y = randn(30, 6, 4), randn(31, 6, 4)
  ids = jnp.array([0, 1, 0, 2, 1, 0])
  hn, valid = randn(32, 6, 2, 4), jnp.asarray(np.array([[1, 0]] * 3 + [[1, 1]] * 3, bool))
  calls = {
      "hn_nce": lambda impl: lambda a, b: hn_nce(a, b, temperature=0.2, impl=impl),
      "decoupled_softmax": lambda impl: lambda a, b: decoupled_softmax(a, b, positives=(ids, ids), impl=impl),
      "mcl_nt_xent": lambda impl: lambda a, b: mcl_nt_xent(a, b, ids, impl=impl),
      "ce_clip": lambda impl: lambda a, b: ce_clip(a, b, hn, logit_scale=4.0, valid=valid, impl=impl).loss,
      "dual_view_moco": lambda impl: lambda a, b: dual_view_moco(a, b, hn[:, 0], impl=impl),
  }
  impls = _engines()
  assert {"dense", "blockwise", "pallas"} <= set(impls)
  for name, make in calls.items():
    out = jax.jit(lambda a, b: [jax.value_and_grad(make(i), argnums=(0, 1))(a, b) for i in impls])(x, y)
    want_value, want_grads = out[impls.index("dense")]
    for impl, (value, grads) in zip(impls, out):
      np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=f"{name} {impl}")
      for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")


# ------------------------------------------------------------------------------------------ bf16, errors
def test_bfloat16_inputs_give_float32_close_to_float32():
  x, y = randn(40, 6, 8), randn(41, 6, 8)
  ids = jnp.array([0, 1, 0, 2, 1, 0])
  for fn in (
      lambda a, b: hn_nce(a, b, temperature=0.2),
      lambda a, b: decoupled_softmax(a, b, positives=(ids, ids)),
      lambda a, b: mcl_nt_xent(a, b, ids),
      lambda a, b: positive_aware_infonce(a, b),
      lambda a, b: dual_view_moco(a, b, a[::-1] + b, top_k=3),
  ):
    lo = jax.jit(fn)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert lo.dtype == jnp.float32 and np.isfinite(float(lo))
    np.testing.assert_allclose(float(lo), float(jax.jit(fn)(x, y)), rtol=3e-2)


ONES = lambda shape: np.ones(shape, np.float32)  # noqa: E731


BAD = [
    (lambda: hn_nce(ONES((4, 3)), ONES((5, 3))), r"`image` and `text` must have the same shape"),
    (lambda: hn_nce(ONES((4, 3)), ONES((4, 3)), beta=-1.0), r"`beta` must be >= 0"),
    (lambda: hn_nce(ONES((4, 3)), ONES((4, 3)), temperature=0.0), r"`temperature` must be positive"),
    (lambda: ce_clip(ONES((4, 3)), ONES((4, 3)), ONES((4, 3))), r"`hard_negatives` must have rank 3"),
    (lambda: ce_clip(ONES((4, 3)), ONES((4, 3)), ONES((4, 2, 3)), threshold_range=(1.0, 0.0)),
     r"`threshold_range` must be None or \(low, high\) with low <= high"),
    (lambda: ce_clip(ONES((4, 3)), ONES((4, 3)), ONES((4, 2, 3)), thresholds=np.zeros(3)),
     r"`thresholds` must have shape \(2,\)"),
    (lambda: ce_clip(ONES((4, 3)), ONES((4, 3)), ONES((4, 2, 3)), valid=np.ones((4, 2))),
     r"`valid` must be a boolean array of shape \(4, 2\)"),
    (lambda: dual_view_moco(ONES((4, 3)), ONES((4, 3)), ONES((5, 2))), r"`queue` must have feature size 3"),
    (lambda: dual_view_moco(ONES((4, 3)), ONES((4, 3)), ONES((5, 3)), top_k=-1), r"`top_k` must be a positive int"),
    (lambda: dual_view_moco(ONES((4, 3)), ONES((4, 2)), ONES((5, 3))), r"`query` and `key` must have the same shape"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


@pytest.mark.parametrize("top_k,dual", [(None, True), (2, True), (None, False)])
def test_dual_view_moco_mask_and_reduction(top_k, dual):
  queue = jnp.asarray(randn(49, 6, 4))
  loss = lambda a, b, **kw: dual_view_moco(a, b, queue, temperature=0.3, top_k=top_k, dual_view=dual, **kw)
  args = [randn(50, 5, 4), randn(51, 5, 4)]
  impls = ("dense", "blockwise", "pallas") if top_k is None else ("dense",)
  _assert_mask_and_reductions(loss, args, 10 if dual else 5, impls=impls)
  per = np.asarray(loss(*args, reduction="none"), np.float64)
  want = ref_dual_view_moco(*[a.astype(np.float64) for a in args], np.asarray(queue, np.float64), 0.3, top_k, dual)
  np.testing.assert_allclose(per.mean(), want, rtol=1e-5)


def test_hn_nce_with_one_valid_pair_has_no_negative_and_stays_finite():
  """A mask leaving one pair: no negative, so each direction is −log(α e^s / α e^s) = 0 (it was NaN:
  log 0 in the weights' count), with finite gradients."""
  x = jnp.asarray(randn(31, 4, 3))
  y = x + 0.1
  mask = jnp.array([True, False, False, False])
  f = lambda x, y: losses.hn_nce(x, y, alpha=1.0, mask=mask)
  np.testing.assert_allclose(float(f(x, y)), 0.0, atol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.grad(f, argnums=(0, 1))(x, y))


SHARDED = [("ring", 3), ("allgather", 8)]


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_ce_clip_sharded_equals_dense(impl, n_devices):
  """Over 3 (ring) and 8 (allgather) devices, with missing hard negatives and padding pairs: the dense
  loss, its gradients (image, text and hard negatives) and θ."""
  image, text, hard = randn(0, 24, 8), randn(1, 24, 8), randn(2, 24, 2, 8)
  valid = jnp.asarray(randn(3, 24, 2) > -0.8)
  mask = jnp.arange(24) % 5 != 3
  theta = jnp.array([0.5, 1.0])
  loss = lambda i, t, n, v, m, **kw: ce_clip(i, t, n, logit_scale=4.0, thresholds=theta, valid=v, mask=m,  # noqa: E731
                                             **kw).loss
  helpers.assert_sharded_equals_dense(loss, [image, text, hard, valid, mask], impl=impl, n_devices=n_devices)
  if impl == "ring":
    return  # θ and the per-pair terms do not depend on the engine: checked once, on 8 devices
  mesh = helpers.device_mesh(n_devices)
  got = jax.jit(lambda *a: ce_clip(*a, logit_scale=4.0, thresholds=theta, valid=valid, mask=mask, impl=impl,
                                   mesh=mesh, reduction="none"))(image, text, hard)
  want = ce_clip(image, text, hard, logit_scale=4.0, thresholds=theta, valid=valid, mask=mask, impl="dense",
                 reduction="none")
  np.testing.assert_allclose(got.thresholds, want.thresholds, rtol=1e-5)
  np.testing.assert_allclose(got.cmr, want.cmr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_dual_view_moco_sharded_equals_dense(impl, n_devices):
  """The batch and the queue (along K) split over 3 (ring) and 8 (allgather) devices: the dense loss and
  gradients, with the queue's log-sum-exp and with the top k (queue gathered), padding pairs too."""
  q, k, queue = randn(0, 24, 8), randn(1, 24, 8), randn(2, 24, 8)
  mask = jnp.arange(24) % 5 != 3
  for top_k in (None, 5):
    loss = lambda a, b, n, m, **kw: dual_view_moco(a, b, n, temperature=0.5, top_k=top_k, mask=m, **kw)  # noqa: E731
    helpers.assert_sharded_equals_dense(loss, [q, k, queue, mask], impl=impl, n_devices=n_devices)
