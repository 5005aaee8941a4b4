"""The blockwise engine: column tiles in a loop, never the (Bq, Bk) similarity matrix.

The keys are visited in tiles of `tile` columns by a `lax.fori_loop` (one compiled body, whatever the
batch size). Each step forms one tile S_t = scale · q k_tᵀ of shape (Bq, tile) and

- folds it into the row log-sum-exp with an online (max, sum-exp) accumulator (Milakov & Gimelshein,
  "Online normalizer calculation for softmax", 2018; `jaxcl.ops.tiles.online_update`, as in the kernels),
- finishes the column log-sum-exp of its columns (a column lies in one tile), so rows and columns come
  out of ONE pass, as the symmetric CLIP loss needs.

The backward pass is a `jax.custom_vjp` that recomputes every tile from the saved row/column results
(the FlashAttention recipe, Dao et al., 2022): for the log-sum-exp

    dS_ij = V_ij · (g_row_i · exp(S_ij − row_i) + g_col_j · exp(S_ij − col_j))
    G += dS k_t,   dk_t = (scale · dS)ᵀ q,   and at the end  dq = scale · G,  dscale_i = <q_i, G_i>

(Σ_j dS_ij <q_i, k_j> = <q_i, G_i>, so the scale gradient needs no pass over a tile), and for the
sigmoid sum d logits_ij = −z_ij σ(−z_ij · logits_ij) · g_i: four matmuls in all against the three of
the dense engine. The backward tiles are formed transposed, (tile, Bq), which makes both gradient matmuls
contract short or leading axes (about 30% faster on CPU than contracting the long Bq axis). For float32
inputs the scale is folded into q once (scale_i · q_i), so a tile is one matmul with no scaling pass.
Masks are evaluated per tile from the id slices (`masks.tile_valid`).

The Bk columns are split into ceil(Bk / tile) tiles of equal width. When that width does not divide Bk,
the last tile is slid back to end at column Bk instead of padding the keys: its columns already seen by
the previous tile are left out of the row sums (and of G), while their column results and dk, complete
within any tile, are recomputed identically. So the keys are never copied, and peak memory is
O(B·D + Bq·tile), never O(Bq·Bk).

Numerics are those of `jaxcl.ops.dense`: float32 results, bf16 inputs go into the matmuls as bf16 with
float32 accumulation, -inf (with zero gradient) where a row or column has no valid entry.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcl.ops import _vma
from jaxcl.ops import masks as masks_lib
from jaxcl.ops import engines
from jaxcl.ops import tiles as tile_math

# The widest tile when `tile=None`: min(DEFAULT_TILE, max(128, 2·D)) columns. Chosen on a 2-core CPU
# (experiments/bench_loss.py): 256..2048 run within a few percent of each other at D = 256, and a
# (Bq, tile) float32 tile is then about tile / (2D) times the two (B, D) float32 inputs, so narrower
# tiles for small D keep the temporaries within a few times the inputs. Set it, or pass `tile=`
# (e.g. through functools.partial) to override.
DEFAULT_TILE = 512

_F32 = jnp.float32
_CONTRACT_D = (((1,), (1,)), ((), ()))  # (m, D) x (n, D) -> (m, n)
_CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # (m, n) x (m, D) -> (n, D)
_MATMUL = (((1,), (0,)), ((), ()))  # (m, n) x (n, D) -> (m, D)


def tile_size(tile: int | None, n_cols: int, dim: int) -> int:
  """Columns per tile actually used: Bk split into ceil(Bk / tile) tiles of equal width (<= tile), so
  the slid-back last tile repeats fewer columns than there are tiles (Bk = 513, tile 512: 2 × 257)."""
  if tile is None:
    tile = min(DEFAULT_TILE, max(128, 2 * dim))
  if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
    raise ValueError(f"`tile` must be a positive int (columns per tile), got {tile!r}.")
  n_tiles = -(-n_cols // tile)
  return -(-n_cols // n_tiles)


def tile_window(t, tile: int, n_cols: int):
  """Start of tile t, and the mask of its columns not already covered by tile t − 1 (None: all)."""
  if n_cols % tile == 0:
    return t * tile, None
  start = jnp.minimum(t * tile, n_cols - tile)
  fresh = start + jnp.arange(tile, dtype=jnp.int32) >= t * tile
  return start, fresh


def _and(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _where(mask, x, fill=0.0):
  return x if mask is None else jnp.where(mask, x, fill)


def _scores(q, k_t):
  """<q_i, k_j> for one tile, float32 accumulation whatever the input dtype."""
  return lax.dot_general(q, k_t, _CONTRACT_D, preferred_element_type=_F32)


def _fold_scale(q, scale):
  """The rows the matmuls see: scale_i · q_i when q is float32 or wider (so S_t is one matmul and the
  scale costs no pass over the tile), q itself for bf16/fp16 (the scale is applied in float32 after the
  matmul, as the dense engine does, instead of rounding scale · q to 16 bits)."""
  if jnp.dtype(q.dtype).itemsize >= 4:
    return (scale[:, None] * q).astype(q.dtype), True
  return q, False


def _tile_logits(q_s, k_t, scale, folded):
  s = _scores(q_s, k_t)
  return s if folded else scale[:, None] * s


def _tile_logits_t(q_s, k_t, scale, folded):
  """S_tᵀ (tile, Bq): the backward pass works on transposed tiles (see `_backward_tile`)."""
  s = _scores(k_t, q_s)
  return s if folded else scale[None, :] * s


def _backward_tile(ds_t, q, q_s, k_t, scale, folded, fresh):
  """For one transposed tile dS_tᵀ (tile, Bq): Gᵀ_t = k_tᵀ dS_tᵀ over the fresh columns (D, Bq), with
  dq = scale · Σ_t G_t, and the complete dk_t = Σ_i scale_i dS_ij q_i (tile, D); float32 results of
  matmuls in the input dtype. With dS stored transposed both are plain or small-side-transposed matmuls,
  about 30% faster on CPU than contracting the long Bq axis of a row-major (Bq, tile) dS."""
  k_fresh = k_t if fresh is None else jnp.where(fresh[:, None], k_t, jnp.zeros((), k_t.dtype))
  g_t = lax.dot_general(k_fresh, ds_t.astype(q.dtype), _CONTRACT_ROWS, preferred_element_type=_F32)
  if folded:
    dk = lax.dot_general(ds_t.astype(q.dtype), q_s, _MATMUL, preferred_element_type=_F32)
  else:
    dk = lax.dot_general((scale[None, :] * ds_t).astype(q.dtype), q, _MATMUL, preferred_element_type=_F32)
  return g_t, dk


def _finish_backward(q, scale, g_t, dtype):
  """From Gᵀ (D, Bq): dq = scale_i · G_i (in `dtype`) and dscale_i = <q_i, G_i>
  (`engines.scale_grads`)."""
  dq, dscale = engines.scale_grads(q, scale, g_t.T)
  return dq.astype(dtype), dscale


def _swap(pair):
  return None if pair is None else (pair[1], pair[0])


def _tile_valid_t(exclude, include, start, tile):
  """The validity of a transposed tile (tile, Bq): the comparisons are symmetric, so swap the sides."""
  return masks_lib.tile_valid(_swap(exclude), _swap(include), _slicer(start, tile), lambda ids: ids)


def _slicer(start, tile):
  return lambda ids: lax.dynamic_slice_in_dim(ids, start, tile)


def _empty_rows_to_pos_inf(lse):
  """-inf (nothing valid) becomes +inf, so exp(S − lse) is 0 there in the backward pass."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse)


# ------------------------------------------------------------------------------------------ logsumexp
class _Tiling(NamedTuple):
  """The static part of a blockwise log-sum-exp: the key tile size and which reductions are wanted."""

  tile: int
  rows: bool  # the row log-sum-exps
  cols: bool  # the column log-sum-exps


def _lse_forward(tiling: _Tiling, q, k, scale, exclude, include):
  tile, want_rows, want_cols = tiling
  n_rows, n_cols = q.shape[0], k.shape[0]
  n_tiles = -(-n_cols // tile)
  q_s, folded = _fold_scale(q, scale)

  def body(t, carry):
    m, l, col = carry
    start, fresh = tile_window(t, tile, n_cols)
    s = _tile_logits(q_s, lax.dynamic_slice_in_dim(k, start, tile), scale, folded)
    valid = masks_lib.tile_valid(exclude, include, lambda ids: ids, _slicer(start, tile))
    if want_rows:
      row_valid = _and(valid, None if fresh is None else fresh[None, :])
      m, l = tile_math.online_update(m, l, _where(row_valid, s, -jnp.inf), axis=1, keepdims=False)
    if want_cols:
      m_c = jnp.max(_where(valid, s, -jnp.inf), axis=0)
      m_c = jnp.where(m_c == -jnp.inf, 0.0, m_c)
      l_c = jnp.sum(_where(valid, jnp.exp(s - m_c[None, :])), axis=0)
      col = lax.dynamic_update_slice_in_dim(col, tile_math.log_sum(l_c, m_c), start, axis=0)
    return m, l, col

  init = (
      jnp.full((n_rows if want_rows else 0,), -jnp.inf, _F32),
      jnp.zeros((n_rows if want_rows else 0,), _F32),
      jnp.zeros((n_cols if want_cols else 0,), _F32),
  )
  m, l, col = lax.fori_loop(0, n_tiles, body, _vma.like(init, q, k, scale, exclude, include))
  return (tile_math.finalize_lse(m, l) if want_rows else None), (col if want_cols else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lse(tiling: _Tiling, q, k, scale, exclude, include):
  return _lse_forward(tiling, q, k, scale, exclude, include)


def _lse_fwd(tiling: _Tiling, q, k, scale, exclude, include):
  row, col = _lse_forward(tiling, q, k, scale, exclude, include)
  return (row, col), (q, k, scale, exclude, include, row, col)


def _lse_bwd(tiling: _Tiling, res, g):
  tile, want_rows, want_cols = tiling
  q, k, scale, exclude, include, row, col = res
  g_row, g_col = g
  g_q, dk = _lse_grads(
      tile, q, k, scale, exclude, include, row if want_rows else None, g_row, col if want_cols else None,
      g_col, dk_dtype=k.dtype,
  )
  dq, dscale = _finish_backward(q, scale, g_q, q.dtype)
  none = lambda pair: None if pair is None else (None, None)
  return dq, dk, dscale, none(exclude), none(include)


def _lse_grads(tile, q, k, scale, exclude, include, row, g_row, col, g_col, *, dk_dtype):
  """(Gᵀ (D, Bq) float32, dk) of Σ g_row·row + Σ g_col·col from the final row / column log-sum-exp
  (None where not wanted), one recomputed tile at a time: G_i = Σ_j dS_ij k_j (`_finish_backward`)."""
  want_rows, want_cols = row is not None, col is not None
  n_cols = k.shape[0]
  n_tiles = -(-n_cols // tile)
  if want_rows:
    row, g_row = _empty_rows_to_pos_inf(row), g_row.astype(_F32)
  if want_cols:
    col, g_col = _empty_rows_to_pos_inf(col), g_col.astype(_F32)

  q_s, folded = _fold_scale(q, scale)

  def body(t, carry):
    g_q, dk = carry
    start, fresh = tile_window(t, tile, n_cols)
    k_t = lax.dynamic_slice_in_dim(k, start, tile)
    s_t = _tile_logits_t(q_s, k_t, scale, folded)  # (tile, Bq)
    ds_t = 0.0
    if want_rows:
      ds_t = g_row[None, :] * jnp.exp(s_t - row[None, :])
    if want_cols:
      g_c, col_t = (lax.dynamic_slice_in_dim(x, start, tile)[:, None] for x in (g_col, col))
      ds_t = ds_t + g_c * jnp.exp(s_t - col_t)
    ds_t = _where(_tile_valid_t(exclude, include, start, tile), ds_t)
    g_t, dk_t = _backward_tile(ds_t, q, q_s, k_t, scale, folded, fresh)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_t.astype(dk.dtype), start, axis=0)
    return g_q + g_t, dk

  init = (jnp.zeros(q.shape[::-1], _F32), jnp.zeros(k.shape, dk_dtype))
  return lax.fori_loop(
      0, n_tiles, body, _vma.like(init, q, k, scale, exclude, include, row, col, g_row, g_col)
  )


_lse.defvjp(_lse_fwd, _lse_bwd)


def logsumexp(q, k, *, scale, rows, cols, exclude, include, tile: int | None = None):
  r"""Row and/or column log-sum-exp of the masked S = scale · q kᵀ, one column tile at a time.

  The blockwise engine behind `jaxcl.ops.logsumexp(..., impl="blockwise")`:

      row_i = log Σ_{j: V_ij} exp S_ij,    col_j = log Σ_{i: V_ij} exp S_ij

  computed in ONE pass over column tiles with an online (max, sum-exp) accumulator for the rows
  ("Online normalizer calculation for softmax", Milakov & Gimelshein, 2018), and differentiated by
  recomputing each tile from the saved results ("FlashAttention", Dao et al., 2022).

  Args:
    q: (Bq, D) rows. k: (Bk, D) columns. Any float dtype; results are float32.
    scale: scalar or (Bq,) multiplier.
    rows, cols: which reductions to return.
    exclude, include: id pairs (see `jaxcl.ops.masks`), evaluated per tile.
    tile: at most this many columns per tile (tiles are balanced); None: min(DEFAULT_TILE, max(128, 2·D)).
  Returns:
    (row (Bq,) or None, col (Bk,) or None), -inf where nothing is valid.

  >>> import jax.numpy as jnp
  >>> row, col = logsumexp(jnp.eye(3), jnp.eye(3), scale=1.0, rows=True, cols=True, exclude=None,
  ...                      include=None, tile=2)
  >>> [round(float(v), 4) for v in row]  # log(e + 2)
  [1.5514, 1.5514, 1.5514]
  """
  if not (rows or cols):
    raise ValueError("`rows` and `cols` are both False: nothing to compute.")
  tile = tile_size(tile, k.shape[0], k.shape[1])
  scale = jnp.broadcast_to(jnp.asarray(scale, _F32), (q.shape[0],))
  return _lse(_Tiling(tile, bool(rows), bool(cols)), q, k, scale, exclude, include)


# ---------------------------------------------------------------------------------------- sigmoid_sum
def _tile_signs(positives, start, tile, n_rows, transposed=False):
  """z of one tile: +1 where the ids match (the diagonal when `positives` is None), −1 elsewhere;
  (Bq, tile), or (tile, Bq) when `transposed`."""
  if positives is None:
    r = jnp.arange(n_rows, dtype=jnp.int32)
    c = start + jnp.arange(tile, dtype=jnp.int32)
  else:
    r, c = positives[0], lax.dynamic_slice_in_dim(positives[1], start, tile)
  if transposed:
    return masks_lib.signs(c[:, None] == r[None, :])
  return masks_lib.signs(r[:, None] == c[None, :])


def _sig_forward(tile, q, k, scale, bias, positives):
  n_rows, n_cols = q.shape[0], k.shape[0]
  q_s, folded = _fold_scale(q, scale)

  def body(t, total):
    start, fresh = tile_window(t, tile, n_cols)
    logits = _tile_logits(q_s, lax.dynamic_slice_in_dim(k, start, tile), scale, folded) + bias
    z = _tile_signs(positives, start, tile, n_rows)
    terms = jax.nn.softplus(-z * logits)
    return total + jnp.sum(_where(None if fresh is None else fresh[None, :], terms), axis=1)

  init = _vma.like(jnp.zeros((n_rows,), _F32), q, k, scale, bias, positives)
  return lax.fori_loop(0, -(-n_cols // tile), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sig(tile, q, k, scale, bias, positives):
  return _sig_forward(tile, q, k, scale, bias, positives)


def _sig_fwd(tile, q, k, scale, bias, positives):
  return _sig_forward(tile, q, k, scale, bias, positives), (q, k, scale, bias, positives)


def _sig_bwd(tile, res, g):
  q, k, scale, bias, positives = res
  g_q, dk, dbias = _sig_grads(tile, q, k, scale, bias, positives, g, dk_dtype=k.dtype)
  dq, dscale = _finish_backward(q, scale, g_q, q.dtype)
  return dq, dk, dscale, dbias, None if positives is None else (None, None)


def _sig_grads(tile, q, k, scale, bias, positives, g, *, dk_dtype):
  """(Gᵀ (D, Bq) float32, dk, dbias) of Σ_i g_i sig_i, one recomputed tile at a time (G as in
  `_lse_grads`)."""
  n_rows, n_cols = q.shape[0], k.shape[0]
  g = g.astype(_F32)
  q_s, folded = _fold_scale(q, scale)

  def body(t, carry):
    g_q, dk, dbias = carry
    start, fresh = tile_window(t, tile, n_cols)
    k_t = lax.dynamic_slice_in_dim(k, start, tile)
    logits_t = _tile_logits_t(q_s, k_t, scale, folded) + bias  # (tile, Bq)
    z_t = _tile_signs(positives, start, tile, n_rows, transposed=True)
    dlogits_t = -z_t * jax.nn.sigmoid(-z_t * logits_t) * g[None, :]
    dbias = dbias + jnp.sum(_where(None if fresh is None else fresh[:, None], dlogits_t))
    g_t, dk_t = _backward_tile(dlogits_t, q, q_s, k_t, scale, folded, fresh)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_t.astype(dk.dtype), start, axis=0)
    return g_q + g_t, dk, dbias

  init = (jnp.zeros(q.shape[::-1], _F32), jnp.zeros(k.shape, dk_dtype), jnp.zeros((), _F32))
  init = _vma.like(init, q, k, scale, bias, positives, g)
  return lax.fori_loop(0, -(-n_cols // tile), body, init)


_sig.defvjp(_sig_fwd, _sig_bwd)


def sigmoid_sum(q, k, *, scale, bias, positives, tile: int | None = None):
  r"""Per row Σ_j softplus(−z_ij (S_ij + bias)), S = scale · q kᵀ, one column tile at a time.

  The blockwise engine behind `jaxcl.ops.sigmoid_sum(..., impl="blockwise")`, the SigLIP sum ("Sigmoid
  Loss for Language Image Pre-Training", Zhai et al., 2023) with z_ij = +1 on positive pairs (ids equal,
  or the diagonal when `positives` is None) and −1 elsewhere. Each tile is recomputed in the backward
  pass, where d logits_ij = −z_ij σ(−z_ij · logits_ij) per unit of the row's cotangent.

  Args:
    q: (Bq, D) rows. k: (Bk, D) columns. scale: scalar or (Bq,). bias: scalar.
    positives: None (the diagonal) or an id pair.
    tile: at most this many columns per tile (tiles are balanced); None: min(DEFAULT_TILE, max(128, 2·D)).
  Returns:
    (Bq,) float32.

  >>> import jax.numpy as jnp
  >>> out = sigmoid_sum(jnp.eye(3), jnp.eye(3), scale=1.0, bias=0.0, positives=None, tile=2)
  >>> round(float(out[0]), 4)  # softplus(-1) + 2 softplus(0)
  1.6996
  """
  tile = tile_size(tile, k.shape[0], k.shape[1])
  scale = jnp.broadcast_to(jnp.asarray(scale, _F32), (q.shape[0],))
  return _sig(tile, q, k, scale, jnp.asarray(bias, _F32), positives)


engines.register_engine("blockwise", logsumexp=logsumexp, sigmoid_sum=sigmoid_sum)


# ------------------------------------------------------------------------- one block, no custom VJP
# The block functions of the sharded ring (`jaxcl.ops.sharded`), the same four as in `jaxcl.ops.pallas`:
# a block's partial results forward, its gradients from the FINAL results backward; float32 outputs.
def lse_block(q, k, scale, exclude, include, *, rows: bool, cols: bool, tile: int | None = None):
  """(row (Bq,) or None, col (Bk,) or None): one block's log-sum-exp, one column tile at a time.

  >>> import jax.numpy as jnp
  >>> row, _ = lse_block(jnp.eye(3), jnp.eye(3), jnp.ones(3), None, None, rows=True, cols=False, tile=2)
  >>> round(float(row[0]), 4)  # log(e + 2)
  1.5514
  """
  tile = tile_size(tile, k.shape[0], k.shape[1])
  return _lse_forward((tile, rows, cols), q, k, scale, exclude, include)


def lse_block_grads(q, k, scale, exclude, include, row, g_row, col, g_col, *, tile: int | None = None):
  """(g (Bq, D), dk (Bk, D)), float32, of Σ_i g_row_i row_i + Σ_j g_col_j col_j for one block, where
  `row` / `col` are the FINAL log-sum-exps (None where not wanted):

      dS_ij = V_ij (g_row_i e^{S_ij − row_i} + g_col_j e^{S_ij − col_j}),
      g_i = Σ_j dS_ij k_j,   dk_j = Σ_i scale_i dS_ij q_i

  (dq and dscale from the g summed over blocks: `engines.scale_grads`).

  >>> import jax.numpy as jnp
  >>> lse = jnp.full(2, jnp.log(jnp.e + 1.0))
  >>> g, _ = lse_block_grads(jnp.eye(2), jnp.eye(2), jnp.ones(2), None, None, lse, jnp.ones(2),
  ...                            None, None)
  >>> [round(float(v), 4) for v in g[0]]  # softmax of row 0: (e, 1) / (e + 1)
  [0.7311, 0.2689]
  """
  tile = tile_size(tile, k.shape[0], k.shape[1])
  g_t, dk = _lse_grads(tile, q, k, scale, exclude, include, row, g_row, col, g_col, dk_dtype=_F32)
  return g_t.T, dk


def sigmoid_block(q, k, scale, bias, positives, *, tile: int | None = None):
  """One block's Σ_j softplus(−z_ij (S_ij + bias)) per row, float32 (Bq,).

  >>> import jax.numpy as jnp
  >>> ids = jnp.arange(2)
  >>> round(float(sigmoid_block(jnp.eye(2), jnp.eye(2), jnp.ones(2), 0.0, (ids, ids))[0]), 4)
  1.0064
  """
  tile = tile_size(tile, k.shape[0], k.shape[1])
  return _sig_forward(tile, q, k, scale, jnp.asarray(bias, _F32), positives)


def sigmoid_block_grads(q, k, scale, bias, positives, g, *, tile: int | None = None):
  """(g, dk, dbias), float32, of Σ_i g_i sig_i for one block (`sigmoid_block`; g as in
  `lse_block_grads`).

  >>> import jax.numpy as jnp
  >>> ids = jnp.arange(2)
  >>> *_, dbias = sigmoid_block_grads(jnp.eye(2), jnp.eye(2), jnp.ones(2), 0.0, (ids, ids), jnp.ones(2))
  >>> round(float(dbias), 4)  # 2 (-σ(-1) + σ(0))
  0.4621
  """
  tile = tile_size(tile, k.shape[0], k.shape[1])
  g_t, dk, dbias = _sig_grads(tile, q, k, scale, jnp.asarray(bias, _F32), positives, g, dk_dtype=_F32)
  return g_t.T, dk, dbias


# ------------------------------------------------------------------------------------- top-1 retrieval
def top1_scores(q, k, *, positives, include, tile: int | None = None):
  """`jaxcl.ops.dense.top1_scores` one column tile at a time: (row_pos, row_neg, col_pos, col_neg), the
  largest positive and negative valid score of each row and column, −inf where there is none. Running
  maxima need no care for the columns a slid-back last tile sees twice. No gradient."""
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  n_rows, n_cols = q.shape[0], k.shape[0]
  tile = tile_size(tile, n_cols, k.shape[1])

  def body(t, carry):
    row_pos, row_neg, col_pos, col_neg = carry
    start, _ = tile_window(t, tile, n_cols)
    cut = _slicer(start, tile)
    s = _scores(q, cut(k))
    positive = positives[0][:, None] == cut(positives[1])[None, :]
    r_pos, r_neg, c_pos, c_neg = masks_lib.split_max(
        s, positive, masks_lib.tile_valid(None, include, lambda ids: ids, cut))
    put = lambda col, c: lax.dynamic_update_slice_in_dim(col, c, start, axis=0)
    return jnp.maximum(row_pos, r_pos), jnp.maximum(row_neg, r_neg), put(col_pos, c_pos), put(col_neg, c_neg)

  init = (_neg_inf(n_rows), _neg_inf(n_rows), _neg_inf(n_cols), _neg_inf(n_cols))
  return lax.fori_loop(0, -(-n_cols // tile), body, _vma.like(init, q, k, positives, include))


# ------------------------------------------------------------------------------------ nearest neighbour
def nearest(q, k, *, tile: int | None = None):
  """`jaxcl.ops.dense.nearest` one column tile at a time: (index, score) of each row's largest
  <q_i, k_j>. Tiles run in column order and a later tile wins only with a strictly larger score, so ties
  go to the smallest j as in the dense engine (the slid-back last tile's repeated columns never win).
  No gradient."""
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  n_rows, n_cols = q.shape[0], k.shape[0]
  tile = tile_size(tile, n_cols, k.shape[1])

  def body(t, carry):
    best_index, best_score = carry
    start, _ = tile_window(t, tile, n_cols)
    s = _scores(q, lax.dynamic_slice_in_dim(k, start, tile))
    j = jnp.argmax(s, axis=1).astype(jnp.int32)
    score = jnp.take_along_axis(s, j[:, None], axis=1)[:, 0]
    better = score > best_score
    return jnp.where(better, start + j, best_index), jnp.where(better, score, best_score)

  init = (jnp.zeros((n_rows,), jnp.int32), _neg_inf(n_rows))
  return lax.fori_loop(0, -(-n_cols // tile), body, _vma.like(init, q, k))


def _neg_inf(n):
  return jnp.full((n,), -jnp.inf, _F32)
