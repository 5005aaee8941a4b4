"""Structured masks over the similarity matrix, given by ids instead of a B×B array.

A mask is described by a pair of integer id vectors `(row_ids, col_ids)` of lengths (Bq,) and (Bk,):
- `exclude=(r, c)` drops every pair with r_i == c_j (the diagonal when both are `arange`, both views of
  an instance in DCL when both are instance ids, all same-label pairs, ...),
- `include=(r, c)` keeps only pairs with r_i == c_j (same view, same cluster, ...),
- `positives=(r, c)` marks pairs with r_i == c_j as positives (sigmoid losses); None is the diagonal.
Engines evaluate the comparison per tile, so no engine except `dense` ever builds a B×B mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks

IdPair = tuple[jax.Array, jax.Array]


def diagonal(n: int) -> IdPair:
  """Ids whose equal pairs are the diagonal of an n×n matrix."""
  ids = jnp.arange(n, dtype=jnp.int32)
  return ids, ids


def check_id_pair(name: str, pair: IdPair | None, n_rows: int, n_cols: int) -> IdPair | None:
  if pair is None:
    return None
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    raise TypeError(f"`{name}` must be a pair (row_ids, col_ids) of integer arrays, got {type(pair).__name__}.")
  _checks.check_int32(f"{name}[0]", pair[0])
  _checks.check_int32(f"{name}[1]", pair[1])
  r, c = (jnp.asarray(p) for p in pair)
  if r.shape != (n_rows,) or c.shape != (n_cols,):
    raise ValueError(
        f"`{name}` must hold ids of shapes ({n_rows},) and ({n_cols},), got {r.shape} and {c.shape}."
    )
  for side, ids in (("row", r), ("column", c)):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"`{name}` {side} ids must be integers, got dtype {ids.dtype}.")
  return r.astype(jnp.int32), c.astype(jnp.int32)


def tile_valid(exclude: IdPair | None, include: IdPair | None, row_slice, col_slice) -> jax.Array | None:
  """The validity of a tile: `row_slice`/`col_slice` pick the tile's ids from each pair."""
  valid = None
  if exclude is not None:
    valid = row_slice(exclude[0])[:, None] != col_slice(exclude[1])[None, :]
  if include is not None:
    keep = row_slice(include[0])[:, None] == col_slice(include[1])[None, :]
    valid = keep if valid is None else valid & keep
  return valid


def dense_valid(exclude: IdPair | None, include: IdPair | None) -> jax.Array | None:
  everything = lambda ids: ids
  return tile_valid(exclude, include, everything, everything)


def signs(positive: jax.Array) -> jax.Array:
  """z = +1 for positive pairs, −1 otherwise, in float32."""
  return jnp.where(positive, 1.0, -1.0).astype(jnp.float32)


def dense_signs(positives: IdPair | None, n_rows: int, n_cols: int) -> jax.Array:
  if positives is None:
    positives = (jnp.arange(n_rows), jnp.arange(n_cols))
  return signs(positives[0][:, None] == positives[1][None, :])
