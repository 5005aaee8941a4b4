"""The dense engine: materialises the (Bq, Bk) similarity matrix.

The reference every other engine is tested against, and the fastest at small batch sizes. Memory is
O(Bq·Bk). All arithmetic is float32 whatever the input dtype (bf16 inputs go into the matmul as bf16
with float32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.ops import masks as masks_lib
from jaxcl.ops import tiles as tile_math


def similarity(q: jax.Array, k: jax.Array, scale: jax.Array) -> jax.Array:
  """S_ij = scale_i · <q_i, k_j> in float32, `scale` a scalar or a (Bq,) vector."""
  s = jnp.einsum("id,jd->ij", q, k, preferred_element_type=jnp.float32)
  return jnp.reshape(scale, (-1, 1)).astype(jnp.float32) * s


def masked_logsumexp(x: jax.Array, valid: jax.Array | None, axis: int) -> jax.Array:
  """log Σ exp(x) over `axis` where `valid`; -inf (with zero gradient) where nothing is valid."""
  if valid is None:
    return jax.nn.logsumexp(x, axis=axis)
  m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  # Masked entries go to exp(−inf) = 0 *before* the exp: exp of an excluded large logit would overflow
  # and turn the backward pass into 0·inf = NaN.
  total = jnp.sum(jnp.exp(jnp.where(valid, x - m, -jnp.inf)), axis=axis)
  return tile_math.log_sum(total, jnp.squeeze(m, axis))


def logsumexp(q, k, *, scale, rows, cols, exclude, include):
  """Row and/or column log-sum-exp of the masked similarity matrix (see `jaxcl.ops.logsumexp`)."""
  s = similarity(q, k, scale)
  valid = masks_lib.dense_valid(exclude, include)
  row = masked_logsumexp(s, valid, axis=1) if rows else None
  col = masked_logsumexp(s, valid, axis=0) if cols else None
  return row, col


def sigmoid_sum(q, k, *, scale, bias, positives):
  """Σ_j softplus(−z_ij · (S_ij + b)) per row (see `jaxcl.ops.sigmoid_sum`)."""
  logits = similarity(q, k, scale) + jnp.asarray(bias, jnp.float32)
  z = masks_lib.dense_signs(positives, q.shape[0], k.shape[0])
  return jnp.sum(jax.nn.softplus(-z * logits), axis=1)


def top1_scores(q, k, *, positives, include):
  """(row_pos, row_neg, col_pos, col_neg): per row the largest score <q_i, k_j> over its positive
  columns (ids equal in `positives`) and over its other valid columns (`include`), per column the same
  over rows; −inf where there is none. No gradient."""
  s = jax.lax.stop_gradient(jnp.einsum("id,jd->ij", q, k, preferred_element_type=jnp.float32))
  return masks_lib.split_max(s, positives[0][:, None] == positives[1][None, :], masks_lib.dense_valid(None, include))


def nearest(q, k):
  """(index, score): per row the column j with the largest <q_i, k_j> (the smallest j on ties) and that
  score, float32. No gradient."""
  s = jax.lax.stop_gradient(jnp.einsum("id,jd->ij", q, k, preferred_element_type=jnp.float32))
  index = jnp.argmax(s, axis=1).astype(jnp.int32)
  return index, jnp.take_along_axis(s, index[:, None], axis=1)[:, 0]
