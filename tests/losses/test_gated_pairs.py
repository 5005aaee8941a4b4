"""Tests of jaxcl/losses/gated_pairs.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.gated_pairs import gated_pair_infonce
from jaxcl.losses.infonce import infonce
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.gated_pairs import ref_gated, ref_gated_labels


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


norm = reference.common.normalize


# -------------------------------------------------------------------------------------- gated pairs
@pytest.mark.parametrize("gate_shape", [(5, 4), (4,)])
def test_gated_pair_infonce_matches_reference(gate_shape):
  gates = np.random.default_rng(9).uniform(0.1, 1.0, gate_shape).astype(np.float32)
  assert_value_and_grads(
      lambda q, k, g: gated_pair_infonce(q, k, g, temperature=0.2),
      lambda q, k, g: ref_gated(q, k, g, 0.2),
      [randn(10, 5, 4), randn(11, 5, 4), gates],
  )


def test_gated_pair_infonce_with_open_gates_is_infonce_and_closed_dims_are_ignored():
  q, k = randn(12, 6, 4), randn(13, 6, 4)
  loss = jax.jit(lambda a, b, g: gated_pair_infonce(a, b, g, temperature=0.1, normalize=False))
  want = jax.jit(lambda a, b: infonce(a, b, temperature=0.1, normalize=False))
  np.testing.assert_allclose(float(loss(q, k, np.ones(4, np.float32))), float(want(q, k)), rtol=1e-6)
  # Gate (1, 1, 0, 0): only the first two dimensions count.
  gate = np.array([1, 1, 0, 0], np.float32)
  np.testing.assert_allclose(float(loss(q, k, gate)), float(want(q[:, :2], k[:, :2])), rtol=1e-6)


GATED_LABEL_CASES = [
    # (Bq, Bk, y1, y2, yk): yk None = y1 (keys are the other views of the queries)
    (6, 6, [0, 1, 0, 2, 1, 3], [1, 1, 2, 0, 3, 0], None),
    (5, 7, [4, 4, 9, 2, 2], [9, 2, 2, 9, 4], [9, 2, 4, 4, 9, 7, 2]),
    (4, 4, [0, 0, 1, 1], [1, 0, 0, 1], None),  # pairs of one class: all same-class keys are positives
]


@pytest.mark.parametrize("bq,bk,y1,y2,yk", GATED_LABEL_CASES)
def test_gated_pair_infonce_with_labels_matches_reference(bq, bk, y1, y2, yk):
  y1, y2 = np.array(y1, np.int32), np.array(y2, np.int32)
  yk_arr = y1 if yk is None else np.array(yk, np.int32)
  gates = np.random.default_rng(4).uniform(0.1, 1.0, (bq, 5)).astype(np.float32)
  assert_value_and_grads(
      lambda q, k, g: gated_pair_infonce(q, k, g, query_labels=y1, pair_labels=y2,
                                         key_labels=None if yk is None else yk_arr, temperature=0.2),
      lambda q, k, g: ref_gated_labels(q, k, g, y1, y2, yk_arr, 0.2),
      [randn(36, bq, 5), randn(37, bk, 5), gates],
  )


def test_gated_pair_infonce_with_sample_ids_as_labels_is_the_row_aligned_loss():
  q, k = randn(38, 6, 4), randn(39, 6, 4)
  gates = np.random.default_rng(5).uniform(0.2, 1.0, (6, 4)).astype(np.float32)
  ids = np.arange(6, dtype=np.int32)
  got = jax.jit(lambda a, b: gated_pair_infonce(a, b, gates, query_labels=ids, pair_labels=ids))(q, k)
  want = jax.jit(lambda a, b: gated_pair_infonce(a, b, gates))(q, k)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_gated_pair_infonce_anchor_without_negatives_is_finite():
  # Query 0 (class 0 paired with 1) sees only keys of classes 0 and 1: its terms are log 1 = 0.
  y1, y2, yk = np.array([0, 2, 2]), np.array([1, 0, 1]), np.array([0, 1, 1, 0])
  q, k = randn(40, 3, 4), randn(41, 4, 4)
  loss = lambda a, b: gated_pair_infonce(a, b, np.ones(4, np.float32), query_labels=y1, pair_labels=y2,
                                         key_labels=yk, impl="blockwise")
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, k)
  np.testing.assert_allclose(float(value), ref_gated_labels(q, k, np.ones(4), y1, y2, yk, 0.1), rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[0] == 0.0)


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


I4 = np.arange(4, dtype=np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((4, 2))), r"`gates` must have shape \(4, 3\) or \(3,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), 2 * ONES((3,))), r"`gates` must lie in \[0, 1\]"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,))), r"`query` and `key` must have the same shape"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4), r"`query_labels` and `pair_labels` must be given together"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), key_labels=I4), r"`query_labels` and `pair_labels` must be given together"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,)), query_labels=I4, pair_labels=I4), r"`key_labels` is needed when `key` and `query` have different batch sizes"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 2)), ONES((3,)), query_labels=I4, pair_labels=I4, key_labels=I4), r"same feature size"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4[:3]), r"`pair_labels` must have shape \(4,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,)), query_labels=I4, pair_labels=I4, key_labels=I4), r"`key_labels` must have shape \(5,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4.astype(np.float32), pair_labels=I4), r"`query_labels` must have an integer dtype"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4 + 4), r"no key has a query's pair label"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ------------------------------------------------------------------------------- reduction and mask
_Y5, _SUB5 = np.array([0, 1, 0, 2, 1], np.int32), np.array([0, 0, 1, 0, 0], np.int32)


_GATES5 = np.random.default_rng(7).uniform(0.2, 1.0, (5, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), reduction="avg"), r"`reduction` must be one of"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4,
                                    reduction="sum"), r"`reduction` must be 'mean' for this loss"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_gated_pair_infonce_mask_covers_only_the_queries_when_the_keys_are_another_batch(impl):
  keys, key_labels = jnp.asarray(randn(166, 7, 3)), np.array([0, 1, 2, 0, 1, 2, 3], np.int32)
  loss = lambda q, g, y1, y2, **kw: gated_pair_infonce(q, keys, jnp.clip(g, 0.0, 1.0), query_labels=y1, pair_labels=y2,
                                                       key_labels=key_labels, temperature=0.3, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [randn(167, 5, 3), _GATES5, _Y5, np.roll(_Y5, 1)], n_diff=2, rtol=2e-6)


@pytest.mark.parametrize("impl, n_devices, labelled", [("ring", 3, False), ("allgather", 8, True)])
def test_sharded_equals_dense(impl, n_devices, labelled):
  """The batch split over 3 or 8 devices: row-aligned pairs with shared (D,) gates (broadcast to the
  queries, their gradient summed), and class-level pairs on a padded batch (the keys gathered): the
  value and gradients of the one-device loss."""
  rng = np.random.default_rng(6)
  q, k = randn(90, 24, 4), randn(91, 24, 4)
  if labelled:
    y1, y2 = rng.integers(0, 4, 24), rng.integers(0, 4, 24)
    mask = np.arange(24) % 5 != 2
    loss = lambda a, b, g, y, p, m, **kw: gated_pair_infonce(  # noqa: E731
        a, b, g, query_labels=y, pair_labels=p, mask=m, temperature=0.3, **kw)
    args = [q, k, rng.uniform(0.2, 1.0, (24, 4)).astype(np.float32), y1, y2, mask]
  else:
    loss = lambda a, b, g, **kw: gated_pair_infonce(a, b, g, temperature=0.3, **kw)  # noqa: E731
    args = [q, k, rng.uniform(0.2, 1.0, 4).astype(np.float32)]
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)
