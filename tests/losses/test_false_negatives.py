"""Tests of jaxcl/losses/false_negatives.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.false_negatives import decoupled_softmax, positive_aware_infonce
from jaxcl.losses.infonce import infonce
from tests import helpers
from tests.helpers import randn
from tests.losses.reference.false_negatives import ref_decoupled, ref_positive_aware


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


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


# --------------------------------------------------------------------------------------- decoupled softmax
def test_decoupled_softmax_matches_reference_with_ids_and_mask():
  ids = np.array([0, 1, 0, 2, 1, 0], np.int32)
  mask = ids[:, None] == ids[None, :]
  mask_general = mask.copy()
  mask_general[3, 0] = True  # not an equivalence relation: only the dense engine can take it
  q, k = randn(7, 6, 4), randn(8, 6, 4)
  assert_value_and_grads(
      lambda a, b: decoupled_softmax(a, b, positives=(ids, ids), temperature=0.3),
      lambda a, b: ref_decoupled(a, b, 0.3, mask),
      [q, k],
  )
  assert_value_and_grads(
      lambda a, b: decoupled_softmax(a, b, positives=jnp.asarray(mask_general), temperature=0.3),
      lambda a, b: ref_decoupled(a, b, 0.3, mask_general),
      [q, k],
  )


def test_decoupled_softmax_mask_and_reduction():
  ids = np.array([0, 1, 0, 2, 1], np.int32)  # padding rows get random ids in [-5, 5): they would collide
  loss = lambda a, b, i, **kw: decoupled_softmax(a, b, positives=(i, i), temperature=0.3, **kw)
  args = [randn(47, 5, 4), randn(48, 5, 4), ids]
  _assert_mask_and_reductions(loss, args, 5, impls=("dense", "blockwise", "pallas"), n_diff=2)
  per = np.asarray(loss(*args, reduction="none"), np.float64)
  want = ref_decoupled(*[a.astype(np.float64) for a in args[:2]], 0.3, ids[:, None] == ids[None])
  np.testing.assert_allclose(per.mean(), want, rtol=1e-5)
  # the (B, B) mask form (dense): the padded batch's positives mask is the unpadded one on the real rows
  (pa, pb, pids), valid = helpers.pad_batch(0, args, 3)
  dense = lambda a, b, **kw: decoupled_softmax(a, b, positives=jnp.asarray(pids[:, None] == pids[None]),
                                               temperature=0.3, **kw)
  helpers.assert_padded_equals_unpadded(
      lambda a, b, **kw: dense(a, b, **kw), args[:2], rtol=2e-6,
      unpadded_loss=lambda a, b: decoupled_softmax(a, b, positives=jnp.asarray(ids[:, None] == ids[None]),
                                                   temperature=0.3))
  helpers.assert_reductions_agree(dense, [pa, pb], 8, mask=valid)


def test_decoupled_softmax_reduces_to_infonce_and_mask_equals_ids():
  q, k = randn(9, 5, 4), randn(10, 5, 4)
  ids = np.array([3, 3, 1, 2, 1], np.int32)
  f = jax.jit(lambda a, b: (
      decoupled_softmax(a, b, temperature=0.2),
      decoupled_softmax(a, b, positives=(jnp.arange(5), jnp.arange(5)), temperature=0.2),
      infonce(a, b, temperature=0.2),
      decoupled_softmax(a, b, positives=(ids, ids), temperature=0.2),
      decoupled_softmax(a, b, positives=jnp.asarray(ids[:, None] == ids[None]), temperature=0.2),
  ))
  none, diag, info, by_ids, by_mask = f(q, k)
  np.testing.assert_allclose([float(none), float(diag)], [float(info)] * 2, rtol=1e-5)
  np.testing.assert_allclose(float(by_ids), float(by_mask), rtol=1e-5)
  assert float(by_ids) < float(info)  # fewer terms in the denominators


# ----------------------------------------------------------------------------------- positive-aware mining
PA_CASES = [
    # threshold, margin, top_k, hard negatives, in-batch
    ("relative", 0.95, None, True, True),
    ("additive", 0.0, 2, True, True),
    ("relative", 0.5, 1, False, True),
    ("additive", 0.05, 3, True, False),
]


@pytest.mark.parametrize("threshold,margin,top_k,with_hn,in_batch", PA_CASES)
def test_positive_aware_infonce_matches_reference(threshold, margin, top_k, with_hn, in_batch):
  q = randn(11, 5, 4)
  k = q + 0.5 * randn(12, 5, 4)  # positives fairly close, so some candidates pass and some do not
  hn = randn(13, 5, 3, 4) if with_hn else None
  args = [q, k] + ([hn] if with_hn else [])

  def jax_loss(a, b, *n):
    return positive_aware_infonce(
        a, b, hard_negatives=n[0] if n else None, temperature=0.2, threshold=threshold, margin=margin,
        top_k=top_k, in_batch_negatives=in_batch,
    )

  def np_loss(a, b, *n):
    return ref_positive_aware(a, b, n[0] if n else None, 0.2, threshold, margin, top_k, in_batch)

  assert_value_and_grads(jax_loss, np_loss, args)


@pytest.mark.parametrize("top_k,in_batch", [(None, True), (2, True), (1, False)])
def test_positive_aware_infonce_mask_and_reduction(top_k, in_batch):
  # a padding key would be kept (its garbage cosine is random) and in the top-k without the mask
  loss = lambda a, b, n, **kw: positive_aware_infonce(
      a, b, hard_negatives=n, temperature=0.2, threshold="additive", margin=0.1, top_k=top_k,
      in_batch_negatives=in_batch, **{k: v for k, v in kw.items() if k != "impl"})
  _assert_mask_and_reductions(loss, [randn(44, 5, 4), randn(45, 5, 4), randn(46, 5, 2, 4)], 5, impls=("dense",))
  args = [randn(44, 5, 4), randn(45, 5, 4), randn(46, 5, 2, 4)]
  per = np.asarray(loss(*args, reduction="none"), np.float64)
  want = ref_positive_aware(*[a.astype(np.float64) for a in args], 0.2, "additive", 0.1, top_k, in_batch)
  np.testing.assert_allclose(per.mean(), want, rtol=1e-5)


def test_positive_aware_infonce_filters_something_and_without_filter_is_infonce():
  q = randn(14, 6, 4)
  k = q + 0.3 * randn(15, 6, 4)
  hn = randn(16, 6, 2, 4)
  f = jax.jit(lambda a, b, n: (
      positive_aware_infonce(a, b, hard_negatives=n, temperature=0.1, threshold="additive", margin=10.0),
      infonce(a, b, negatives=n, temperature=0.1),
      positive_aware_infonce(a, b, hard_negatives=n, temperature=0.1),
  ))
  unfiltered, info, filtered = f(q, k, hn)
  np.testing.assert_allclose(float(unfiltered), float(info), rtol=1e-5)
  assert float(filtered) < float(info)


ONES = lambda shape: np.ones(shape, np.float32)  # noqa: E731


BAD = [
    (lambda: decoupled_softmax(ONES((4, 3)), ONES((4, 3)), positives=(np.arange(4), np.arange(4)[::-1])),
     r"row_ids\[i\] == col_ids\[i\]"),
    (lambda: decoupled_softmax(ONES((4, 3)), ONES((4, 3)), positives=np.ones((4, 3), bool)),
     r"boolean array of shape \(4, 4\)"),
    (lambda: decoupled_softmax(ONES((4, 3)), ONES((4, 3)), positives=np.eye(4, dtype=bool), impl="blockwise"),
     r"needs the dense engine"),
    (lambda: positive_aware_infonce(ONES((4, 3)), ONES((4, 3)), threshold="nope"), r"`threshold` must be one of"),
    (lambda: positive_aware_infonce(ONES((4, 3)), ONES((4, 3)), top_k=0), r"`top_k` must be a positive int"),
    (lambda: positive_aware_infonce(ONES((4, 3)), ONES((4, 3)), in_batch_negatives=False),
     r"needs `hard_negatives`"),
    (lambda: positive_aware_infonce(ONES((4, 3)), ONES((4, 3)), hard_negatives=ONES((4, 2, 5))),
     r"`hard_negatives` must have shape \(4, H, 3\)"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


@pytest.mark.parametrize("impl,n_devices", [("ring", 3), ("allgather", 8)])
def test_decoupled_softmax_sharded_equals_dense(impl, n_devices):
  """The batch split over 3 (ring) and 8 (allgather) devices with padding pairs: the dense loss and
  gradients with label-id positives (the engine's log-sum-exp) and with a (B, B) mask (split by rows,
  keys gathered)."""
  q, k = randn(0, 24, 8), randn(1, 24, 8)
  labels = jnp.arange(24) % 7
  mask = jnp.arange(24) % 5 != 3
  by_ids = lambda a, b, m, r, c, **kw: decoupled_softmax(a, b, positives=(r, c), temperature=0.5, mask=m, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(by_ids, [q, k, mask, labels, labels], impl=impl, n_devices=n_devices)
  by_mask = lambda a, b, m, p, **kw: decoupled_softmax(a, b, positives=p, temperature=0.5, mask=m, **kw)  # noqa: E731
  positive_mask = labels[:, None] == labels[None, :]
  helpers.assert_sharded_equals_dense(by_mask, [q, k, mask, positive_mask], impl=impl, n_devices=n_devices)
