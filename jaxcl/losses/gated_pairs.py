"""Gated pairs: InfoNCE for arbitrary positive pairs, each contrasted in its own gated feature subspace
(SimLAP / Hydra).

| paper | function | engines |
|---|---|---|
| Rethinking Positive Pairs in Contrastive Learning | gated_pair_infonce | all, allgather, ring (labelled: tiled row reductions, keys gathered) |
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.ops import engines
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.losses import _common
from jaxcl.losses import _tiled


def _gates_per_query(loss):
  """Broadcasts shared (D,) gates to one row per query, (Bq, D), outside `shard_map` (without
  `axis_name`), so that `shardable` splits them with the queries; the gradient of the shared gates is
  the sum over their rows."""
  signature = inspect.signature(loss)

  @functools.wraps(loss)
  def wrapper(*args, **kwargs):
    a = signature.bind(*args, **kwargs)
    query, gates = a.arguments.get("query"), a.arguments.get("gates")
    if (a.arguments.get("axis_name") is None and jnp.ndim(gates) == 1 and jnp.ndim(query) == 2
        and jnp.shape(gates)[0] == jnp.shape(query)[1]):
      a.arguments["gates"] = jnp.broadcast_to(jnp.asarray(gates), jnp.shape(query))
    return loss(*a.args, **a.kwargs)

  return wrapper


# ------------------------------------------------------------------------------ gated arbitrary pairs
@_common.keyword_only
@_gates_per_query
@_common.shardable("query", "key", "gates", "query_labels", "pair_labels", "key_labels", "mask")
def gated_pair_infonce(
    query: jax.Array,
    key: jax.Array,
    gates: jax.Array,
    *,
    query_labels: jax.Array | None = None,
    pair_labels: jax.Array | None = None,
    key_labels: jax.Array | None = None,
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""InfoNCE for arbitrary positive pairs, each compared in its own gated feature subspace.

  "Rethinking Positive Pairs in Contrastive Learning" (Wu et al., 2024; the framework is called Hydra
  in v1 and SimLAP in v2). Any two samples, e.g. of two different classes (a, b), form a positive pair;
  a gate vector g_i = g_{ab} ∈ [0, 1]^D selects the dimensions in which the pair should agree, and the
  pair is contrasted inside that subspace. q and k are L2-normalised *before* gating, and

      S_ij = <(g_i ⊙ g_i) ⊙ q_i, k_j> / τ

  as in the authors' code (erow/FastSSL, `model/simlap.py`, `SimLAP.disparate_loss`: `contrast(z1 *
  gate * gate, k2) * scale`, τ = 0.1 at initialisation, learnable there): the gate folds into the query
  exactly, so the similarities run on any engine.

  Class-level pairs (`query_labels` y1, `pair_labels` y2, `key_labels` y_k), the authors' objective:
  query i of class y1_i is paired with class y2_i; its positives are *all* keys of class y2_i, and keys
  of class y1_i or y2_i leave the denominator, so each positive is contrasted against itself plus the
  keys of other classes (their `multipos_ce_loss` with `pos_mask = c2_mask`, `exclude_mask = c1_mask |
  c2_mask`); the loss is the mean over all positive (i, p) pairs:

      P(i) = {j : y_k,j = y2_i}      N(i) = {j : y_k,j ∉ {y1_i, y2_i}}
      loss = 1/Σ_i |P(i)| · Σ_i Σ_{p ∈ P(i)} [ −S_ip + log(exp S_ip + Σ_{j ∈ N(i)} exp S_ij) ]

  `key_labels` None means y1 (the authors' keys are the second views of the query samples). When no
  key carries any query's pair label the loss is undefined: an error if the labels are concrete, 0
  under `jit`. The negative log-sum-exp excludes two label sets and each positive term is non-linear
  in S_ip, so both are this library's own row reductions: dense (the Bq×Bk matrix) or tiled
  (O(Bq·tile) memory) on the other engines.

  Without labels (row-aligned pairs): key i is query i's only positive and every other key is a negative
  seen through gate i,

      loss = mean_i [ −S_ii + log Σ_j exp S_ij ],

  one log-sum-exp per row on `impl`. This is the class-level loss with every sample its own class
  (y1 = y2 = y_k = arange(B)); it differs from the paper's class-level objective in that other keys of
  the paired class are negatives rather than positives, and keys of the query's own class and of the
  paired class stay in the denominator. With all gates 1 it is `infonce(query, key)`.

  The gates (the authors' `BasicGate`: sigmoid(MLP((E[y1] + E[y2]) / 2)), symmetric in the pair), their
  regulariser and how pairs are drawn are the caller's.

  Sharded (`axis_name` / `mesh`; queries, keys, gates, labels and mask split along the batch): without
  labels the log-sum-exp runs on the sharded engines; with labels each device gathers the keys, their
  labels and validity and reduces its own queries against all of them (for "ring" too: the label
  masks and the per-pair softplus need every pair), then the sums are added over devices.

  Args:
    query: (Bq, D) embeddings. key: (Bk, D) embeddings; without labels Bk = Bq and row i is a pair.
    gates: (Bq, D) gates in [0, 1] (or (D,) shared by every query); may be traced (learned).
    query_labels, pair_labels: (Bq,) integer labels y1 and y2, given together (or both None).
    key_labels: (Bk,) integer labels of the keys; None means `query_labels` (needs Bk = Bq).
    temperature: τ > 0.
    normalize: L2-normalise query and key first.
    reduction: without labels "mean", "sum" or "none": the (B,) per-pair terms −S_ii + log Σ_j S_ij.
      With labels only "mean": the loss is a mean over positive (i, p) pairs, not over queries.
    mask: None or bool (Bq,): False marks padding queries, which are not anchors; when `key` has as
      many rows as `query` (row i of both the same sample: always without labels or `key_labels`) the
      key rows where it is False are neither positives nor negatives either. Keys of a different batch
      size are all real.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; shared (D,) gates are broadcast to one row
      per query first (inside your own `shard_map` pass them replicated, or per query and split).
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> round(float(gated_pair_infonce(x, x, jnp.ones((2, 2)), temperature=1.0)), 4)  # log(e + 1) - 1
  0.3133
  >>> # Classes 0, 1, 2 paired with 1, 1, 0: query 0 has key 1 (s = 0) against key 2, query 1 key 1
  >>> # (s = 1) against keys 0 and 2, query 2 key 0 against key 1: (2 log 2 + log(e + 2) − 1) / 3.
  >>> x = jnp.eye(3)
  >>> round(float(gated_pair_infonce(x, x, jnp.ones(3), query_labels=jnp.array([0, 1, 2]),
  ...                                pair_labels=jnp.array([1, 1, 0]), temperature=1.0)), 4)
  0.6459
  """
  labelled = query_labels is not None or pair_labels is not None or key_labels is not None
  _common.check_reduction(reduction, per_anchor=not labelled)
  if not labelled:
    q, k = _common.pair("query", query, "key", key, normalize=normalize, axis_name=axis_name)
    mask = _common.sample_mask(mask, q.shape[0])
    key_valid = mask
  else:
    if query_labels is None or pair_labels is None:
      raise ValueError(
          "`query_labels` and `pair_labels` must be given together (with `key_labels` optional), got "
          f"query_labels={'None' if query_labels is None else 'an array'}, "
          f"pair_labels={'None' if pair_labels is None else 'an array'}, "
          f"key_labels={'None' if key_labels is None else 'an array'}."
      )
    q = _checks.check_array("query", query, ndim=2)
    k = _checks.check_array("key", key, ndim=2)
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"`query` and `key` must have the same feature size, got {q.shape} and {k.shape}.")
    _checks.check_min_batch("query", q, 1, why="the mean needs a query")
    _checks.check_min_batch("key", k, 1, why="a query needs a key")
    y1 = _checks.check_labels("query_labels", query_labels, q.shape[0])
    y2 = _checks.check_labels("pair_labels", pair_labels, q.shape[0])
    if key_labels is None:
      if k.shape[0] != q.shape[0]:
        raise ValueError(
            "`key_labels` is needed when `key` and `query` have different batch sizes, got "
            f"{k.shape} and {q.shape}."
        )
      key_labels = y1
    yk = _checks.check_labels("key_labels", key_labels, k.shape[0])
    mask = _common.sample_mask(mask, q.shape[0])
    key_valid = mask if k.shape[0] == q.shape[0] else None
    c2, ck = _checks.concrete_value(y2), _checks.concrete_value(yk)
    kept = None if mask is None else _checks.concrete_value(mask)
    if mask is not None and kept is None:
      c2 = None  # a traced mask: the real rows are unknown
    elif kept is not None:
      c2 = None if c2 is None else c2[kept]
      ck = None if ck is None or key_valid is None else ck[kept]
    if c2 is not None and ck is not None and not np.any(c2[:, None] == ck[None, :]):
      raise ValueError(
          f"no key has a query's pair label, so there is no positive pair: `pair_labels` {c2} and "
          f"`key_labels` {ck}."
      )
    q, k = _common.maybe_normalize(q, normalize), _common.maybe_normalize(k, normalize)
  gates = _checks.check_array("gates", gates, ndim=(1, 2))
  if gates.shape not in (q.shape, (q.shape[1],)):
    raise ValueError(f"`gates` must have shape {q.shape} or ({q.shape[1]},), got {gates.shape}.")
  g = _checks.concrete_value(gates)
  if g is not None and (not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1):
    raise ValueError("`gates` must lie in [0, 1], got an entry outside it.")
  inv_t = _common.inverse_temperature(temperature)
  g32 = jnp.broadcast_to(gates.astype(jnp.float32), q.shape)
  gated_q = (g32 * g32 * q.astype(jnp.float32)).astype(q.dtype)
  if not labelled:
    lse = ops.logsumexp(gated_q, k, scale=inv_t, row_valid=mask, col_valid=mask, impl=impl,
                        axis_name=axis_name).rows
    positive = inv_t * _common.rowwise_dot(gated_q, k)
    return _common.reduce_loss(lse - positive, reduction, mask, axis_name)

  if axis_name is not None:  # label masks and per-pair terms: this device's queries against every key
    _checks.check_choice("impl", impl, ("auto",) + SHARDED_IMPLS)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    k, yk = gather(k), gather(yk)
    key_valid = None if key_valid is None else gather(key_valid)
    impl = "auto"  # the local engine for the gathered keys
  bk = k.shape[0]
  dense = engines.is_dense(impl, q.shape[0], bk)
  row_ok = jnp.ones((q.shape[0], 1), bool) if mask is None else mask[:, None]

  def key_ok(col_ids):
    return row_ok if key_valid is None else row_ok & key_valid[jnp.minimum(col_ids, bk - 1)][None, :]

  def key_label(col_ids):  # padded columns of the last tile: clamp (the reductions drop them)
    return yk[jnp.minimum(col_ids, bk - 1)][None, :]

  def negative(col_ids):
    yc = key_label(col_ids)
    return (yc != y1[:, None]) & (yc != y2[:, None]) & key_ok(col_ids)

  neg = _tiled.row_logsumexp(gated_q, k, inv_t, negative, dense=dense)  # -inf: no negative
  has_neg = jnp.isfinite(neg)[:, None]
  neg = jnp.where(has_neg[:, 0], neg, 0.0)

  def positive_terms(s, col_ids):
    # −S_ip + log(exp S_ip + exp N_i) = softplus(N_i − S_ip); 0 when N(i) is empty.
    is_pos = (key_label(col_ids) == y2[:, None]) & key_ok(col_ids)
    return jnp.where(is_pos & has_neg, jax.nn.softplus(neg[:, None] - s), 0.0)

  total = jnp.sum(_tiled.row_sum(gated_q, k, inv_t, positive_terms, dense=dense))
  if key_valid is None:
    sorted_yk = jnp.sort(yk)
    n_pos = jnp.searchsorted(sorted_yk, y2, side="right") - jnp.searchsorted(sorted_yk, y2, side="left")
  else:  # Bq = Bk: count the real keys of each pair label (a segment sum over shared compact ids)
    ids = _common.compact_ids(jnp.concatenate([y2, yk.astype(y2.dtype)]))
    per_label = jax.ops.segment_sum(key_valid.astype(jnp.int32), ids[q.shape[0]:], num_segments=ids.shape[0])
    n_pos = per_label[ids[:q.shape[0]]]
  n_pos = _common.zero_invalid(n_pos.astype(jnp.float32), mask)
  return _common.batch_sum(total, axis_name) / jnp.maximum(_common.batch_sum(n_pos, axis_name), 1.0)
