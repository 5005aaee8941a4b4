"""Structured masks over the similarity matrix, given by ids instead of a B×B array.

A mask is described by a pair of integer id vectors `(row_ids, col_ids)` of lengths (Bq,) and (Bk,):
- `exclude=(r, c)` drops every pair with r_i == c_j (the diagonal when both are `arange`, both views of
  an instance in DCL when both are instance ids, all same-label pairs, ...),
- `include=(r, c)` keeps only pairs with r_i == c_j (same view, same cluster, ...),
- `positives=(r, c)` marks pairs with r_i == c_j as positives (sigmoid losses); None is the diagonal.
Engines evaluate the comparison per tile, so no engine except `dense` ever builds a B×B mask.

Invalid rows and columns (a batch padded to a static shape, `row_valid` / `col_valid` of the
reductions) are folded into the ids by `with_validity`: they get the reserved ids `INVALID_ROW_ID` and
`INVALID_COL_ID`, which equal no other id, so they are kept by no `include` and are positive for
nobody. User ids must not take these two values (the two smallest int32 numbers).
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


# Reserved ids (never equal to a user's id, nor to each other): an invalid row or column compares
# unequal to everything on the other side.
INVALID_ROW_ID = -(2**31)
INVALID_COL_ID = -(2**31) + 1


def check_validity(name: str, valid, n: int) -> jax.Array | None:
  """A per-row validity vector: None, or a bool array of shape (n,)."""
  if valid is None:
    return None
  valid = jnp.asarray(valid)
  if valid.shape != (n,):
    raise ValueError(f"`{name}` must have shape ({n},) (one flag per row), got shape {valid.shape}.")
  if valid.dtype != jnp.bool_:
    raise TypeError(
        f"`{name}` must be a boolean array (True for the rows to keep), got dtype {valid.dtype}; "
        f"pass `{name}.astype(bool)` for 0/1 flags."
    )
  return valid


def with_validity(
    pair: IdPair | None, row_valid: jax.Array | None, col_valid: jax.Array | None, n_rows: int, n_cols: int
) -> IdPair | None:
  """The id pair `pair` with invalid rows and columns given the reserved ids that equal nothing.

  As `include`, the result keeps exactly the pairs `pair` keeps (all pairs when `pair` is None) whose row
  AND column are valid; as `positives`, invalid rows and columns are positive for nobody.

      r'_i = r_i if row_valid_i else INVALID_ROW_ID,    c'_j = c_j if col_valid_j else INVALID_COL_ID

  >>> r, c = with_validity(None, jnp.array([True, False]), jnp.array([True, True, False]), 2, 3)
  >>> (r[:, None] == c[None, :]).astype(int).tolist()
  [[1, 1, 0], [0, 0, 0]]
  """
  if row_valid is None and col_valid is None:
    return pair
  if pair is None:
    pair = (jnp.zeros((n_rows,), jnp.int32), jnp.zeros((n_cols,), jnp.int32))
  r, c = pair
  if row_valid is not None:
    r = jnp.where(row_valid, r, jnp.int32(INVALID_ROW_ID))
  if col_valid is not None:
    c = jnp.where(col_valid, c, jnp.int32(INVALID_COL_ID))
  return r, c


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


def split_max(s: jax.Array, positive: jax.Array, valid: jax.Array | None):
  """For a tile of scores s: the max over positive and over negative valid entries, along each axis:
  (row_pos, row_neg, col_pos, col_neg), −inf where there is none."""
  pos = positive if valid is None else positive & valid
  neg = ~positive if valid is None else ~positive & valid
  top = lambda m, axis: jnp.max(jnp.where(m, s, -jnp.inf), axis=axis)
  return top(pos, 1), top(neg, 1), top(pos, 0), top(neg, 0)
