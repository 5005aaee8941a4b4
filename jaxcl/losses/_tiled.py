"""Row reductions over S = scale · q kᵀ under masks or per-pair functions the id-pair engines cannot express.

`jaxcl.ops` engines take masks as id pairs (one id per row and per column). Some objectives need more:
a set of k positive columns per row (MLCD), or a non-linear function of each positive logit (focal
SupCon). These helpers compute

    row_sum_i = Σ_j f(S_ij, i, j)        row_logsumexp_i = log Σ_{j: valid(i, j)} exp S_ij

either densely (`dense=True`, the (Bq, Bk) matrix at once) or over column tiles in a `lax.scan` whose
body is rematerialised (`jax.checkpoint`): forward and backward hold O(Bq·tile), never O(Bq·Bk). They
are plain JAX, differentiable in q, k, scale and anything `f` closes over.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxcl.ops.blockwise import DEFAULT_TILE  # columns per tile, as in the blockwise engine

# f(logits (Bq, t) float32, col_ids (t,) int32) -> (Bq, t) float32 contributions (0 on padded columns
# is applied by the caller).
TileFn = Callable[[jax.Array, jax.Array], jax.Array]


def _tiles(k: jax.Array, tile: int):
  bk = k.shape[0]
  tile = max(1, min(int(tile), bk))
  n = -(-bk // tile)
  pad = n * tile - bk
  k_t = jnp.pad(k, ((0, pad), (0, 0))).reshape(n, tile, k.shape[1])
  cols = jnp.arange(n * tile, dtype=jnp.int32).reshape(n, tile)
  return k_t, cols


def _logits(q32, k_tile, scale):
  return scale[:, None] * (q32 @ k_tile.astype(jnp.float32).T)


def row_sum(q, k, scale, fn: TileFn, *, dense: bool, tile: int = DEFAULT_TILE) -> jax.Array:
  """(Bq,) float32: Σ_j fn(S)_ij over the Bk columns."""
  bq, bk = q.shape[0], k.shape[0]
  q32 = q.astype(jnp.float32)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (bq,))
  if dense:
    return jnp.sum(fn(_logits(q32, k, scale), jnp.arange(bk, dtype=jnp.int32)), axis=1)
  k_t, cols = _tiles(k, tile)

  @jax.checkpoint
  def body(acc, xs):
    k_tile, col_ids = xs
    out = fn(_logits(q32, k_tile, scale), col_ids)
    return acc + jnp.sum(jnp.where(col_ids[None, :] < bk, out, 0.0), axis=1), None

  init = jnp.zeros_like(q32[:, 0])  # device-varying like q inside shard_map (a scan carry keeps its type)
  acc, _ = jax.lax.scan(body, init, (k_t, cols))
  return acc


def row_max(q, k, scale, valid_fn, *, dense: bool, tile: int = DEFAULT_TILE) -> jax.Array:
  """(Bq,) float32 max over valid columns (no gradient); -inf where a row has none."""
  q, k, scale = (jax.lax.stop_gradient(x) for x in (q, k, jnp.asarray(scale, jnp.float32)))
  bq, bk = q.shape[0], k.shape[0]
  q32 = q.astype(jnp.float32)
  scale = jnp.broadcast_to(scale, (bq,))

  def tile_max(k_tile, col_ids):
    s = _logits(q32, k_tile, scale)
    valid = (col_ids < bk)[None, :]
    if valid_fn is not None:
      valid = valid & valid_fn(col_ids)
    return jnp.max(jnp.where(valid, s, -jnp.inf), axis=1)

  if dense:
    return tile_max(k, jnp.arange(bk, dtype=jnp.int32))
  k_t, cols = _tiles(k, tile)
  out, _ = jax.lax.scan(lambda m, xs: (jnp.maximum(m, tile_max(*xs)), None),
                        jnp.full((bq,), -jnp.inf, jnp.float32), (k_t, cols))
  return out


def row_logsumexp(q, k, scale, valid_fn=None, *, dense: bool, tile: int = DEFAULT_TILE) -> jax.Array:
  """(Bq,) float32 log Σ_{j: valid} exp S_ij, `valid_fn(col_ids) -> (Bq, t) bool` (None: all).

  -inf (zero gradient) where a row has no valid column.
  """
  m = row_max(q, k, scale, valid_fn, dense=dense, tile=tile)
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  bk = k.shape[0]

  def fn(s, col_ids):
    valid = (col_ids < bk)[None, :]
    if valid_fn is not None:
      valid = valid & valid_fn(col_ids)
    # -inf before the exp (not a `where` after it): no overflow, and no 0·inf in the backward pass.
    return jnp.exp(jnp.where(valid, s - shift[:, None], -jnp.inf))

  total = row_sum(q, k, scale, fn, dense=dense, tile=tile)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, shift + jnp.log(safe), -jnp.inf)
