"""Soft-target expectations Σ_j P_ij <q_i, k_j> with P a (fixed) teacher softmax, without a B×B matrix.

A soft-target cross-entropy  −Σ_j T_ij log softmax_j(S_i·) = (Σ_j T_ij) LSE_i(S) − Σ_j T_ij S_ij  has
its log-sum-exp on any engine (`jaxcl.ops.logsumexp`); the linear part is cheap from the embeddings
when T is sparse or a label mask, but when T is itself a softmax of a teacher's similarities,

    P_ij = exp(t_i <a_i, b_j> − LSE_i),      Σ_j P_ij <q_i, k_j>

is an attention-like contraction of two B×B matrices. `expected_dot` computes it either densely (the
`dense` engine) or over column tiles in a `lax.scan` whose body is rematerialised (`jax.checkpoint`),
so the forward and the backward hold O(B·tile) at a time, never O(B²). P is a target: no gradient flows
into the teacher inputs (a, b, t, LSE); the gradient flows into q and k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.ops.blockwise import DEFAULT_TILE  # columns per tile, as in the blockwise engine


def _f32(x):
  return x.astype(jnp.float32)


def expected_dot(
    tq: jax.Array,
    tk: jax.Array,
    t_scale: jax.Array,
    t_lse: jax.Array,
    q: jax.Array | None,
    k: jax.Array | None,
    *,
    exclude_self: bool = False,
    row_ids: jax.Array | None = None,
    row_valid: jax.Array | None = None,
    col_valid: jax.Array | None = None,
    dense: bool,
    tile: int = DEFAULT_TILE,
) -> jax.Array:
  """(Bq,) float32: Σ_j P_ij <q_i, k_j>, P_ij = exp(t_scale_i <tq_i, tk_j> − t_lse_i) on valid pairs.

  `exclude_self` leaves the diagonal (j = i) out of P, i being the row's position among the columns:
  `row_ids` (int (Bq,), e.g. the global ids of a device's rows against the gathered batch) or by default
  its own position 0..Bq−1; `row_valid` / `col_valid` (bool (Bq,) / (Bk,),
  a padded batch) leave invalid rows (their result is 0) and columns out of P. `dense` materialises the (Bq, Bk) matrices;
  otherwise column tiles of width `tile` are visited by a rematerialised scan. With q = k = None it
  returns Σ_j P_ij log P_ij (minus the teacher's entropy), each log P_ij formed before the sum so that
  no large logits cancel.
  """
  bq, bk = tq.shape[0], tk.shape[0]
  tq, tk = jax.lax.stop_gradient(_f32(tq)), jax.lax.stop_gradient(_f32(tk))
  t_scale = jax.lax.stop_gradient(jnp.broadcast_to(_f32(jnp.asarray(t_scale)), (bq,)))
  t_lse = jax.lax.stop_gradient(_f32(t_lse))
  entropy = q is None
  q32 = None if entropy else _f32(q)
  k32 = jnp.zeros((bk, 0), jnp.float32) if entropy else _f32(k)
  rows = jnp.arange(bq, dtype=jnp.int32) if row_ids is None else row_ids.astype(jnp.int32)

  def weighted(tk_tile, k_tile, col_ids, in_range):
    logits = t_scale[:, None] * (tq @ tk_tile.T)
    valid = in_range[None, :]
    if exclude_self:
      valid = valid & (rows[:, None] != col_ids[None, :])
    if row_valid is not None:
      valid = valid & row_valid[:, None]
    if col_valid is not None:
      valid = valid & col_valid[jnp.minimum(col_ids, bk - 1)][None, :]
    log_p = jnp.where(valid, logits - t_lse[:, None], 0.0)
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    return jnp.sum(p * (log_p if entropy else q32 @ k_tile.T), axis=1)

  if dense:
    cols = jnp.arange(bk, dtype=jnp.int32)
    return weighted(tk, k32, cols, jnp.ones((bk,), bool))

  tile = max(1, min(int(tile), bk))
  n_tiles = -(-bk // tile)
  pad = n_tiles * tile - bk
  tk_t = jnp.pad(tk, ((0, pad), (0, 0))).reshape(n_tiles, tile, -1)
  k_t = jnp.pad(k32, ((0, pad), (0, 0))).reshape(n_tiles, tile, -1)
  cols = jnp.arange(n_tiles * tile, dtype=jnp.int32).reshape(n_tiles, tile)

  @jax.checkpoint
  def body(acc, xs):
    tk_tile, k_tile, col_ids = xs
    return acc + weighted(tk_tile, k_tile, col_ids, col_ids < bk), None

  acc, _ = jax.lax.scan(body, jnp.zeros((bq,), jnp.float32), (tk_t, k_t, cols))
  return acc
