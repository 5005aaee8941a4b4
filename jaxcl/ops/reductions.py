"""The similarity reductions every loss is written against, and the engine dispatch.

With S_ij = scale_i · <q_i, k_j> (scale a scalar or one value per row) and a validity mask V given by
ids (`jaxcl.ops.masks`):

    logsumexp:    row_i = log Σ_{j: V_ij} exp S_ij          col_j = log Σ_{i: V_ij} exp S_ij
    sigmoid_sum:  out_i = Σ_j softplus(−z_ij · (S_ij + b)),  z_ij = +1 on positive pairs, −1 elsewhere

Both take `row_valid` / `col_valid` (bool (Bq,) / (Bk,)): the rows and columns of a batch padded to a
static shape. An invalid row or column takes part in nothing (V_ij = 0 in every pair it is in; for the
sigmoid its terms are left out of the sums), whatever it holds.

Terms linear in S (the positive logits Σ_j T_ij S_ij) never need S: the losses compute them from the
embeddings directly. Each engine (`impl`) computes these reductions with the same numerics and is
differentiable in q, k, scale (and b). The engines, their registry and the `impl="auto"` policy are in
`jaxcl.ops.engines`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.ops import blockwise
from jaxcl.ops import dense
from jaxcl.ops import engines
from jaxcl.ops import masks as masks_lib
from jaxcl.ops import sharded
from jaxcl.ops.engines import SHARDED_IMPLS, engine, resolve_impl

def _local_impl(impl: str, n_rows: int, n_cols: int) -> str:
  if impl in SHARDED_IMPLS:
    raise ValueError(
        f"`impl={impl!r}` is a sharded engine: it needs `axis_name` (the mesh axis the batch is split "
        "over, inside `jax.shard_map`), or call the loss on globally sharded arrays with a mesh."
    )
  return resolve_impl(impl, n_rows, n_cols)


class LogSumExp(NamedTuple):
  rows: jax.Array | None
  cols: jax.Array | None


def _check_qk(q, k):
  q = _checks.check_array("q", q, ndim=2)
  k = _checks.check_array("k", k, ndim=2)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"`q` and `k` must have the same feature size, got {q.shape} and {k.shape}.")
  return q, k


def logsumexp(
    q: jax.Array,
    k: jax.Array,
    *,
    scale: jax.Array | float,
    rows: bool = True,
    cols: bool = False,
    exclude: masks_lib.IdPair | None = None,
    include: masks_lib.IdPair | None = None,
    row_valid: jax.Array | None = None,
    col_valid: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> LogSumExp:
  """Row and/or column log-sum-exp of the masked similarity matrix S = scale · q kᵀ.

  Args:
    q: (Bq, D) rows. k: (Bk, D) columns. Any float dtype; the result is float32.
    scale: scalar or (Bq,) multiplier (1/temperature, a logit scale).
    rows, cols: which reductions to return (both in one pass over S).
    exclude: (row_ids, col_ids): pairs with equal ids are left out.
    include: (row_ids, col_ids): only pairs with equal ids are kept.
    row_valid, col_valid: None or bool (Bq,) / (Bk,): rows / columns that take part (a padded batch);
      an invalid row's result is -inf (nothing valid), with zero gradient. They become reserved ids in
      `include` (`jaxcl.ops.masks.with_validity`), so every engine handles them per tile.
    impl: engine name or "auto", or `jaxcl.ops.pallas.Settings(...)` (the pallas engine with those
      settings: block sizes, flavour, interpret mode); with `axis_name`: "allgather", "ring" or "auto".
    axis_name: inside `jax.shard_map`, the mesh axis the batch is split over: q, k and the ids are then
      this device's shards (ids global), and the reductions run over the global batch
      (`jaxcl.ops.sharded`).
  Returns:
    LogSumExp(rows=(Bq,) or None, cols=(Bk,) or None); -inf where no entry is valid.

  >>> import jax.numpy as jnp
  >>> q = jnp.eye(2)
  >>> out = logsumexp(q, q, scale=1.0, cols=True)
  >>> [round(float(v), 4) for v in out.rows]  # log(e + 1)
  [1.3133, 1.3133]
  """
  q, k = _check_qk(q, k)
  scale = _checks.check_scalar_or_vector("scale", scale, q.shape[0])
  exclude = masks_lib.check_id_pair("exclude", exclude, q.shape[0], k.shape[0])
  include = masks_lib.check_id_pair("include", include, q.shape[0], k.shape[0])
  row_valid = masks_lib.check_validity("row_valid", row_valid, q.shape[0])
  col_valid = masks_lib.check_validity("col_valid", col_valid, k.shape[0])
  include = masks_lib.with_validity(include, row_valid, col_valid, q.shape[0], k.shape[0])
  q, k = _zeroed(q, row_valid), _zeroed(k, col_valid)
  if not (rows or cols):
    raise ValueError("`rows` and `cols` are both False: nothing to compute.")
  if axis_name is not None:
    row, col = sharded.logsumexp(
        q, k, scale=scale, rows=rows, cols=cols, exclude=exclude, include=include,
        axis_name=axis_name, impl=impl,
    )
    return LogSumExp(row, col)
  row, col = engine(_local_impl(impl, q.shape[0], k.shape[0]), "logsumexp")(
      q, k, scale=scale, rows=rows, cols=cols, exclude=exclude, include=include
  )
  return LogSumExp(row, col)


def sigmoid_sum(
    q: jax.Array,
    k: jax.Array,
    *,
    scale: jax.Array | float,
    bias: jax.Array | float = 0.0,
    positives: masks_lib.IdPair | None = None,
    row_valid: jax.Array | None = None,
    col_valid: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  """Per row Σ_j softplus(−z_ij (S_ij + bias)) = −Σ_j log σ(z_ij (S_ij + bias)), float32 (Bq,).

  `positives=(row_ids, col_ids)` makes pairs with equal ids positive (z = +1); None means the diagonal.
  `axis_name` and `impl` as in `logsumexp` (under `shard_map`: local rows against the global columns).

  `row_valid` / `col_valid` (bool (Bq,) / (Bk,), a padded batch): the sum runs over the valid columns
  only, and an invalid row's result is 0 with zero gradient. No engine needs a column mask for this:
  invalid columns enter as k_j = 0 with reserved ids (`jaxcl.ops.masks.with_validity`, so they are
  negatives of every row), which makes each of their terms exactly softplus(bias), and those
  n_invalid · softplus(bias) (n_invalid over the global batch) are subtracted again:

      out_i = Σ_{j valid} softplus(−z_ij (S_ij + b)) = engine_i(q, k') − n_invalid · softplus(b)

  >>> import jax.numpy as jnp
  >>> round(float(sigmoid_sum(jnp.eye(2), jnp.eye(2), scale=1.0)[0]), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  q, k = _check_qk(q, k)
  scale = _checks.check_scalar_or_vector("scale", scale, q.shape[0])
  bias = jnp.asarray(bias)
  if bias.shape != ():
    raise ValueError(f"`bias` must be a scalar, got shape {bias.shape}.")
  if positives is None and q.shape[0] != k.shape[0]:
    raise ValueError(
        f"`positives=None` means the diagonal, which needs as many rows as columns; got {q.shape[0]} "
        f"rows and {k.shape[0]} columns."
    )
  positives = masks_lib.check_id_pair("positives", positives, q.shape[0], k.shape[0])
  row_valid = masks_lib.check_validity("row_valid", row_valid, q.shape[0])
  col_valid = masks_lib.check_validity("col_valid", col_valid, k.shape[0])
  if row_valid is None and col_valid is None:
    return _sigmoid_sum(q, k, scale, bias, positives, impl, axis_name)
  if positives is None:  # the diagonal, as ids (global positions under an axis name)
    positives = (_positions(q.shape[0], axis_name), _positions(k.shape[0], axis_name))
  positives = masks_lib.with_validity(positives, row_valid, col_valid, q.shape[0], k.shape[0])
  q, k = _zeroed(q, row_valid), _zeroed(k, col_valid)
  out = _sigmoid_sum(q, k, scale, bias, positives, impl, axis_name)
  if col_valid is not None:
    n_invalid = jnp.sum(~col_valid, dtype=jnp.float32)
    if axis_name is not None:
      n_invalid = jax.lax.psum(n_invalid, axis_name)
    out = out - n_invalid * jax.nn.softplus(bias.astype(jnp.float32))
  return out if row_valid is None else jnp.where(row_valid, out, 0.0)


def _zeroed(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """x with its invalid rows set to 0: whatever a padding row holds (inf, NaN) then reaches neither
  the results nor the gradients (which are exactly 0 for it)."""
  return x if valid is None else jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def _positions(n: int, axis_name) -> jax.Array:
  if axis_name is None:
    return jnp.arange(n, dtype=jnp.int32)
  return sharded.global_ids(n, axis_name)


def _sigmoid_sum(q, k, scale, bias, positives, impl, axis_name):
  if axis_name is not None:
    return sharded.sigmoid_sum(
        q, k, scale=scale, bias=bias, positives=positives, axis_name=axis_name, impl=impl
    )
  run = engine(_local_impl(impl, q.shape[0], k.shape[0]), "sigmoid_sum")
  return run(q, k, scale=scale, bias=bias, positives=positives)


class Top1(NamedTuple):
  rows: jax.Array
  cols: jax.Array


def top1(
    q: jax.Array,
    k: jax.Array,
    *,
    row_valid: jax.Array | None = None,
    col_valid: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> Top1:
  """In-batch top-1 retrieval hits with positives on the diagonal, without the (B, B) matrix.

      rows_i = <q_i, k_i> > max_{j ≠ i, valid} <q_i, k_j>      (query i retrieves its own key)
      cols_j = <q_j, k_j> > max_{i ≠ j, valid} <q_i, k_j>      (key j retrieves its own query)

  A tie with a negative counts as a miss, so a collapsed encoder (all scores equal) scores 0, not 1; a
  row with no valid negative is a hit. Both directions come from one pass over column tiles: the
  positive score is taken from the same tile as the negatives (same rounding). The local engine is
  dense while Bq·Bk <= DENSE_MAX_ELEMENTS, else `blockwise`'s tile loop (whatever `impl` names: a max
  needs no fused kernel); under `axis_name`, "allgather" or "ring" ("auto": as for the losses), with
  global ids. Invalid rows and columns (`row_valid` / `col_valid`) are neither queried nor retrieved
  and are misses. No gradient.

  Args:
    q: (B, D) queries. k: (B, D) keys, row-aligned.
  Returns:
    Top1(rows=(B,) bool, cols=(B,) bool): this device's rows and columns under `axis_name`.

  >>> import jax.numpy as jnp
  >>> q = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  >>> top1(q, q).rows.tolist()  # rows 0 and 2 tie
  [False, True, False]
  """
  q, k = _check_qk(q, k)
  if axis_name is None:
    _local_impl(impl, q.shape[0], k.shape[0])  # a known single-device engine name, or "auto"
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"`q` and `k` must have the same batch size (positives on the diagonal), got "
                     f"{q.shape} and {k.shape}.")
  row_valid = masks_lib.check_validity("row_valid", row_valid, q.shape[0])
  col_valid = masks_lib.check_validity("col_valid", col_valid, k.shape[0])
  n = q.shape[0]
  positives = masks_lib.with_validity((_positions(n, axis_name),) * 2, row_valid, col_valid, n, n)
  include = masks_lib.with_validity(None, row_valid, col_valid, n, n)
  q, k = _zeroed(q, row_valid), _zeroed(k, col_valid)
  if axis_name is not None:
    scores = sharded.top1_scores(q, k, positives=positives, include=include, axis_name=axis_name, impl=impl)
  else:
    local = dense if n * n <= engines.DENSE_MAX_ELEMENTS else blockwise
    scores = local.top1_scores(q, k, positives=positives, include=include)
  row_pos, row_neg, col_pos, col_neg = scores
  return Top1(row_pos > row_neg, col_pos > col_neg)


class Nearest(NamedTuple):
  index: jax.Array
  score: jax.Array


def nearest(q: jax.Array, k: jax.Array, *, impl: str = "auto") -> Nearest:
  """Each query's nearest key by inner product, without the (Bq, Bk) matrix:

      index_i = argmax_j <q_i, k_j>   (the smallest j on ties),      score_i = <q_i, k_{index_i}>

  For cosine neighbours, L2-normalise q and k first. "dense" materialises S; "auto" is dense while
  Bq·Bk <= DENSE_MAX_ELEMENTS; otherwise (and for any other single-device engine: an argmax needs no
  fused kernel) `blockwise`'s loop over column tiles keeps a running maximum. Scores accumulate in
  float32. No gradient: a neighbour is a selection (NNCLR's positives, kNN lookups).

  Args:
    q: (Bq, D) queries. k: (Bk, D) keys (a support set, a memory bank), Bk >= 1.
  Returns:
    Nearest(index=(Bq,) int32, score=(Bq,) float32).

  >>> import jax.numpy as jnp
  >>> k = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  >>> nearest(jnp.array([[2.0, 1.0], [0.0, 3.0]]), k).index.tolist()  # row 0 ties columns 0 and 2
  [0, 1]
  """
  q, k = _check_qk(q, k)
  if k.shape[0] < 1:
    raise ValueError(f"`k` must hold at least one key to search, got shape {k.shape}.")
  local = dense if _local_impl(impl, q.shape[0], k.shape[0]) == "dense" else blockwise
  return Nearest(*local.nearest(q, k))

