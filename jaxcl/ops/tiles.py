"""The tiles of the similarity matrix S = scale · q kᵀ: what every engine computes on one tile.

- `Tiles`: the static tiling of one fused-kernel call (`jaxcl.ops.pallas`), and `tile_valid`, a tile's
  validity from ids and padding;
- the online log-sum-exp every engine folds tiles into (`online_update`, `finalize_lse`, `log_sum`);
- the per-tile gradients (`softmax_grad_tile`, `sigmoid_grad_tile`) and values (`sigmoid_value_tile`);
- `dot_precision`, the precision of the tile matmuls.

Plain `jax.numpy` on arrays: the same functions run inside the Mosaic and Triton kernels
(`jaxcl.ops.pallas_tpu`, `jaxcl.ops.pallas_gpu`), in the blockwise engine's XLA loop
(`jaxcl.ops.blockwise`), in the dense engine and across devices (`jaxcl.ops.sharded`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tiling of one kernel call: rows `a` (n_a valid of padded N_a) against columns `b`.

  >>> t = Tiles(128, 256, n_a=200, n_b=300, padded_a=256, padded_b=512, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> t.grid, t.swapped().grid
  ((2, 2), (2, 2))
  """

  block_a: int
  block_b: int
  n_a: int
  n_b: int
  padded_a: int
  padded_b: int
  interpret: Any
  num_warps: int | None
  num_stages: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.padded_a // self.block_a, self.padded_b // self.block_b

  @property
  def pad_a(self) -> bool:
    return self.padded_a != self.n_a

  @property
  def pad_b(self) -> bool:
    return self.padded_b != self.n_b

  def swapped(self) -> Tiles:
    return dataclasses.replace(
        self, block_a=self.block_b, block_b=self.block_a, n_a=self.n_b, n_b=self.n_a,
        padded_a=self.padded_b, padded_b=self.padded_a,
    )



def pad_to(x: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  """x zero padded at the end of each axis to `shape` (x itself where nothing is missing; None stays
  None): the padding of a block to the kernels' tiles.

  >>> pad_to(jnp.ones((1, 2)), (2, 3)).tolist()
  [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
  """
  if x is None:
    return None
  widths = [(0, n - m) for n, m in zip(shape, x.shape)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def tile_valid(row_pos, col_pos, tiles: Tiles, kinds: tuple[str, ...], id_tiles) -> jax.Array | None:
  """Validity of one tile, or None when every entry is valid.

  `row_pos`/`col_pos`: global indices of the tile's rows/columns (broadcastable to the tile);
  `id_tiles`: one (row_ids, col_ids) pair per entry of `kinds` ("exclude" drops equal ids, "include"
  keeps only equal ids). Padded rows and columns are invalid.

  >>> import jax.numpy as jnp
  >>> t = Tiles(2, 3, n_a=2, n_b=2, padded_a=2, padded_b=3, interpret=True, num_warps=None, num_stages=2)
  >>> ids = jnp.arange(3)
  >>> tile_valid(ids[:2, None], ids[None, :], t, ("exclude",), [(ids[:2, None], ids[None, :])]).tolist()
  [[False, True, False], [True, False, False]]
  """
  conds = []
  if tiles.pad_a:
    conds.append(row_pos < tiles.n_a)
  if tiles.pad_b:
    conds.append(col_pos < tiles.n_b)
  for kind, (r, c) in zip(kinds, id_tiles):
    conds.append(r != c if kind == "exclude" else r == c)
  return functools.reduce(operator.and_, conds) if conds else None


def dot_precision(dtype) -> jax.lax.Precision:
  """Precision of the tile matmuls for inputs of `dtype`, fixed so that the kernels never follow the
  process-wide `jax_default_matmul_precision`:

      float32 → HIGHEST (true float32 products: IEEE, not TF32, on GPU; fp32 contraction on TPU)
      else    → DEFAULT (bf16 × bf16 products are exact in the float32 accumulator)

  Mosaic refuses a bf16 matmul at HIGHEST ("Bad lhs type"), and Triton's DEFAULT for float32 is TF32.

  >>> import jax.numpy as jnp
  >>> dot_precision(jnp.float32), dot_precision(jnp.bfloat16)
  (Precision.HIGHEST, Precision.DEFAULT)
  """
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def online_update(m_prev, l_prev, s, axis: int, keepdims: bool):
  """Folds a tile `s` (invalid entries −inf) into running (max, sum exp(s − max)) along `axis`.

      m' = max(m, max s),   l' = l · exp(m − m') + Σ exp(s − m')

  the online softmax of "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
  (Dao et al., 2022); m' = −inf (nothing valid yet) is replaced by 0 so that no inf − inf occurs.

  >>> import jax.numpy as jnp
  >>> m, l = jnp.full((1,), -jnp.inf), jnp.zeros((1,))
  >>> for tile in (jnp.array([[0.0, -jnp.inf]]), jnp.array([[1.0, 2.0]])):
  ...   m, l = online_update(m, l, tile, axis=1, keepdims=False)
  >>> round(float(finalize_lse(m, l)[0]), 4)  # log(e^0 + e^1 + e^2)
  2.4076
  """
  expand = (lambda v: v) if keepdims else (lambda v: jnp.expand_dims(v, axis))
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=axis, keepdims=keepdims))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  total = jnp.sum(jnp.exp(s - expand(m_safe)), axis=axis, keepdims=keepdims)
  return m_new, l_prev * jnp.exp(m_prev - m_safe) + total


def log_sum(total, shift, empty=-jnp.inf):
  """log(total) + shift where total > 0, else `empty`: the log of a sum of exponentials computed as
  Σ exp(x − shift), with no log(0) (nor its NaN gradient) where nothing was summed.

  >>> import jax.numpy as jnp
  >>> log_sum(jnp.array([0.0, 1.0]), jnp.array([5.0, 2.0])).tolist()
  [-inf, 2.0]
  """
  nonempty = total > 0
  return jnp.where(nonempty, jnp.log(jnp.where(nonempty, total, 1.0)) + shift, empty)


def finalize_lse(m, l):
  """log-sum-exp from (max, sum): m + log l, −inf where nothing was valid (l = 0).

  >>> import jax.numpy as jnp
  >>> finalize_lse(jnp.array([-jnp.inf, 1.0]), jnp.array([0.0, 1.0])).tolist()
  [-inf, 1.0]
  """
  return log_sum(l, m)


def softmax_grad_tile(s, valid, row_lse, g_row, col_lse, g_col):
  """dS for log-sum-exp outputs: g_row·exp(S − row) + g_col·exp(S − col) on valid entries, else 0.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[1.0, 3.0]]))  # row lse = log 4: softmax (1/4, 3/4)
  >>> softmax_grad_tile(s, None, jnp.log(4.0), 2.0, None, None).tolist()
  [[0.5, 1.5]]
  """
  out = 0.0
  for lse, g in ((row_lse, g_row), (col_lse, g_col)):
    if lse is None:
      continue
    x = s - lse
    if valid is not None:
      x = jnp.where(valid, x, -jnp.inf)
    out = out + g * jnp.exp(x)
  return out


def softplus(x):
  """log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)), stable for large |x|.

  >>> import jax.numpy as jnp
  >>> [round(float(v), 4) for v in softplus(jnp.array([-1e4, 0.0, 1e4]))]
  [0.0, 0.6931, 10000.0]
  """
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid(x):
  """σ(x) = 1 / (1 + exp(−x)); exp overflow gives exactly 0.

  >>> import jax.numpy as jnp
  >>> sigmoid(jnp.array([-1e4, 0.0, 1e4])).tolist()
  [0.0, 0.5, 1.0]
  """
  return 1.0 / (1.0 + jnp.exp(-x))


def sigmoid_value_tile(logits, positive, valid):
  """softplus(−z · logits), z = +1 on positives and −1 elsewhere, 0 on invalid entries.

  >>> import jax.numpy as jnp
  >>> out = sigmoid_value_tile(jnp.array([1.0, 1.0]), jnp.array([True, False]), None)
  >>> [round(v, 4) for v in out.tolist()]  # softplus(-1), softplus(1)
  [0.3133, 1.3133]
  """
  z = jnp.where(positive, 1.0, -1.0)
  val = softplus(-z * logits)
  return val if valid is None else jnp.where(valid, val, 0.0)


def sigmoid_grad_tile(logits, positive, valid, g):
  """d/dlogits of g · softplus(−z · logits) = −g z σ(−z · logits), 0 on invalid entries.

  >>> import jax.numpy as jnp
  >>> sigmoid_grad_tile(jnp.zeros(2), jnp.array([True, False]), None, 1.0).tolist()
  [-0.5, 0.5]
  """
  z = jnp.where(positive, 1.0, -1.0)
  out = -(g * z) * sigmoid(-z * logits)
  return out if valid is None else jnp.where(valid, out, 0.0)
