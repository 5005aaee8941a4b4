"""Mosaic (TPU) kernels of the `pallas` engine.

Every kernel runs over a grid (row blocks i × column blocks j), j innermost and "arbitrary" (it carries
accumulators), i "parallel" (split across TensorCores on megacore chips) unless the column log-sum-exp
is fused into the same pass. Block shapes follow the Mosaic (8, 128) rule: the q/k blocks are
(block, D) with block a multiple of 16 (bf16 packs 16 rows per vreg) and D the whole, 128-padded
feature axis; every vector is a lane-dense (1, N) array in (1, block) blocks, block a multiple of 128
or the whole axis, and a kernel turns a row vector's block into a (block, 1) column in VMEM (an (N, 1)
array in HBM would be laid out in (8, 128) tiles: 128 lanes for one value). Dots are bf16 × bf16 or
f32 × f32 with float32 accumulation (`preferred_element_type`).

Kernels (S = scale · a bᵀ tile by tile, V the validity from ids and padding):
- `lse_forward`: row (max, sum-exp) in VMEM scratch, written at the last j; optionally the column
  accumulators too, kept for all columns in a (n_col_blocks, 1, block) VMEM scratch and written at the
  last i (then the row axis must run sequentially: both axes "arbitrary").
- `lse_backward`: Σ_j dS_ij b_j accumulated in the resident float32 output block (the dq kernel; the
  dk kernel is the same call with a and b swapped and the scale along columns), from zero or from a
  given accumulator whose buffer becomes the output (`input_output_aliases`: an in-place update).
- `sigmoid_forward`, `sigmoid_backward`: the same grids for Σ_j softplus(−z(S + b)) and its gradient.

Called by `jaxcl.ops.pallas` (which pads, dispatches and defines the custom VJP); see docs/pallas.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxcl.ops import _vma
from jaxcl.ops import tiles as tile_math

_NT = (((1,), (1,)), ((), ()))  # a (m, d) · b (n, d)ᵀ


class _Call:
  """Collects the inputs of a pallas_call with their block specs over the (i, j) grid."""

  def __init__(self, tiles: tile_math.Tiles):
    self.tiles = tiles
    self.inputs: list[jax.Array] = []
    self.specs: list[pl.BlockSpec] = []

  def matrix(self, x: jax.Array, side: str):
    block = self.tiles.block_a if side == "rows" else self.tiles.block_b
    index = (lambda i, j: (i, 0)) if side == "rows" else (lambda i, j: (j, 0))
    self.inputs.append(x)
    self.specs.append(pl.BlockSpec((block, x.shape[1]), index))

  def vector(self, x: jax.Array, side: str):
    """A vector as a lane-dense (1, N) array in (1, block_a) blocks along rows, (1, block_b) along
    columns. A kernel reads a row vector's block with `_column` (an (N, 1) array would take a whole
    (8, 128) tile per 8 values in HBM: 128x the bytes)."""
    self.inputs.append(jnp.reshape(x, (1, -1)))
    if side == "rows":
      self.specs.append(pl.BlockSpec((1, self.tiles.block_a), lambda i, j: (0, i)))
    else:
      self.specs.append(pl.BlockSpec((1, self.tiles.block_b), lambda i, j: (0, j)))

  def accumulator(self, acc: jax.Array | None):
    """The (N_a, D) float32 accumulator a backward kernel adds into, in place (None: start from zero):
    read in the output's row blocks, and its buffer becomes output 0 (`input_output_aliases`)."""
    if acc is None:
      return {}
    self.matrix(acc, "rows")
    return {len(self.inputs) - 1: 0}

  def __call__(self, kernel, name, out_shape, out_specs, *, scratch=(), semantics=("parallel", "arbitrary"),
               cost=None, aliases=None):
    inputs, out_shape = _vma.kernel_io(self.inputs, out_shape)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=self.tiles.grid, in_specs=self.specs, out_specs=out_specs,
            scratch_shapes=list(scratch),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=self.tiles.interpret,
        cost_estimate=cost,
        input_output_aliases=aliases or {},
        name=name,
    )(*inputs)


def _row_out(tiles: tile_math.Tiles, width: int | None = None):
  """A float32 output along rows: a lane-dense (1, N_a) vector (width None, written with `_row`) or an
  (N_a, width) matrix, in blocks of the row block."""
  if width is None:
    return (jax.ShapeDtypeStruct((1, tiles.padded_a), jnp.float32),
            pl.BlockSpec((1, tiles.block_a), lambda i, j: (0, i)))
  shape = jax.ShapeDtypeStruct((tiles.padded_a, width), jnp.float32)
  return shape, pl.BlockSpec((tiles.block_a, width), lambda i, j: (i, 0))


def _column(x):
  """A row vector's (1, block) block as the (block, 1) column that broadcasts along a tile's rows."""
  return jnp.transpose(x)


def _row(x):
  """A (block, 1) column of per-row values as the lane-dense (1, block) block of a row output."""
  return jnp.transpose(x)


def _cost(tiles: tile_math.Tiles, d: int, itemsize: int, matmuls: int, exps: int) -> pl.CostEstimate:
  ni, nj = tiles.grid
  elements = tiles.padded_a * tiles.padded_b
  return pl.CostEstimate(
      flops=2 * matmuls * elements * d,
      transcendentals=exps * elements,
      bytes_accessed=itemsize * d * (tiles.padded_a + ni * tiles.padded_b) + 4 * matmuls * tiles.padded_a * d,
  )


def _scores(a_ref, b_ref, scale_ref, scale_on):
  a, b = a_ref[...], b_ref[...]
  s = jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32,
                          precision=tile_math.dot_precision(b.dtype))
  return s * (_column(scale_ref[...]) if scale_on == "rows" else scale_ref[...])


def _valid(tiles: tile_math.Tiles, kinds, id_refs, shape):
  i, j = pl.program_id(0), pl.program_id(1)
  row_pos = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + i * tiles.block_a
  col_pos = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + j * tiles.block_b
  id_tiles = [(_column(r[...]), c[...]) for r, c in id_refs]
  return tile_math.tile_valid(row_pos, col_pos, tiles, kinds, id_tiles)


# ------------------------------------------------------------------------------------- log-sum-exp
def _lse_fwd_kernel(*refs, tiles, kinds, scale_on, with_cols):
  it = iter(refs)
  a_ref, b_ref, scale_ref = next(it), next(it), next(it)
  id_refs = [(next(it), next(it)) for _ in kinds]
  row_ref = next(it)
  col_ref = next(it) if with_cols else None
  m_ref, l_ref = next(it), next(it)
  i, j = pl.program_id(0), pl.program_id(1)
  ni, nj = tiles.grid

  @pl.when(j == 0)
  def _init_rows():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  s = _scores(a_ref, b_ref, scale_ref, scale_on)
  valid = _valid(tiles, kinds, id_refs, s.shape)
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  m_ref[...], l_ref[...] = tile_math.online_update(m_ref[...], l_ref[...], s, axis=1, keepdims=True)

  @pl.when(j == nj - 1)
  def _store_rows():
    row_ref[...] = _row(tile_math.finalize_lse(m_ref[...], l_ref[...]))

  if with_cols:
    cm_ref, cl_ref = next(it), next(it)

    @pl.when(i == 0)
    def _init_cols():
      cm_ref[j] = jnp.full(cm_ref.shape[1:], -jnp.inf, jnp.float32)
      cl_ref[j] = jnp.zeros(cl_ref.shape[1:], jnp.float32)

    cm_ref[j], cl_ref[j] = tile_math.online_update(cm_ref[j], cl_ref[j], s, axis=0, keepdims=True)

    @pl.when(i == ni - 1)
    def _store_cols():
      col_ref[j] = tile_math.finalize_lse(cm_ref[j], cl_ref[j])


def lse_forward(a, b, scale, ids, *, kinds, scale_on, with_cols, tiles):
  """(row (N_a,), col (N_b,) or None): log-sum-exp over valid entries of S = scale · a bᵀ.

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> row, col = lse_forward(x, x, jnp.ones(16), (), kinds=(), scale_on="rows", with_cols=True, tiles=t)
  >>> [round(float(v), 4) for v in row[:2] + col[:2]]  # 2 log(e + 1)
  [2.6265, 2.6265]
  """
  call = _Call(tiles)
  call.matrix(a, "rows")
  call.matrix(b, "cols")
  call.vector(scale, scale_on)
  for r, c in ids:
    call.vector(r, "rows")
    call.vector(c, "cols")
  row_shape, row_spec = _row_out(tiles)
  out_shape, out_specs = [row_shape], [row_spec]
  scratch = [pltpu.VMEM((tiles.block_a, 1), jnp.float32)] * 2
  nj = tiles.grid[1]
  if with_cols:
    out_shape.append(jax.ShapeDtypeStruct((nj, 1, tiles.block_b), jnp.float32))
    out_specs.append(pl.BlockSpec((nj, 1, tiles.block_b), lambda i, j: (0, 0, 0)))
    scratch += [pltpu.VMEM((nj, 1, tiles.block_b), jnp.float32)] * 2
  kernel = functools.partial(_lse_fwd_kernel, tiles=tiles, kinds=kinds, scale_on=scale_on,
                             with_cols=with_cols)
  outs = call(
      kernel, "jaxcl_lse_fwd", out_shape, out_specs, scratch=scratch,
      semantics=("arbitrary", "arbitrary") if with_cols else ("parallel", "arbitrary"),
      cost=_cost(tiles, a.shape[1], a.dtype.itemsize, 1, 2 if with_cols else 1),
  )
  row = outs[0][0]
  col = jnp.reshape(outs[1], (-1,)) if with_cols else None
  return row, col


def _init_acc(acc_ref, acc_in):
  """A resident output block's start: the accumulator's block (in-place update) or zeros."""
  @pl.when(pl.program_id(1) == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32) if acc_in is None else acc_in[...]


def _lse_bwd_kernel(*refs, tiles, kinds, scale_on, with_rows, with_cols, with_acc):
  it = iter(refs)
  a_ref, b_ref, scale_ref = next(it), next(it), next(it)
  id_refs = [(next(it), next(it)) for _ in kinds]
  row_lse, g_row = (_column(next(it)[...]), _column(next(it)[...])) if with_rows else (None, None)
  col_lse, g_col = (next(it)[...], next(it)[...]) if with_cols else (None, None)
  acc_in = next(it) if with_acc else None
  acc_ref = next(it)
  _init_acc(acc_ref, acc_in)

  s = _scores(a_ref, b_ref, scale_ref, scale_on)
  valid = _valid(tiles, kinds, id_refs, s.shape)
  ds = tile_math.softmax_grad_tile(s, valid, row_lse, g_row, col_lse, g_col)
  if scale_on == "cols":
    ds = ds * scale_ref[...]
  b = b_ref[...]
  acc_ref[...] += jax.lax.dot(ds.astype(b.dtype), b, preferred_element_type=jnp.float32,
                              precision=tile_math.dot_precision(b.dtype))


def lse_backward(a, b, scale, ids, row_lse, g_row, col_lse, g_col, *, kinds, scale_on, tiles, acc=None):
  """acc + Σ_j dS_ij b_j (float32 (N_a, D)) with dS = g_row e^{S − row} + g_col e^{S − col} on valid
  entries; `acc` (float32 (N_a, D), None: zeros) is updated in place (its buffer is the output's).

  With the scale along rows the row factor scale_i is left out (the caller applies it and reuses the
  sum for the scale's gradient); along columns scale_j is inside the sum (the dk orientation).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> lse = jnp.full(16, jnp.log(jnp.e + 1.0))
  >>> out = lse_backward(x, x, jnp.ones(16), (), lse, jnp.ones(16), None, None, kinds=(),
  ...                    scale_on="rows", tiles=t)
  >>> [round(float(v), 4) for v in out[0, :2]]  # softmax of row 0: (e, 1) / (e + 1)
  [0.7311, 0.2689]
  """
  call = _Call(tiles)
  call.matrix(a, "rows")
  call.matrix(b, "cols")
  call.vector(scale, scale_on)
  for r, c in ids:
    call.vector(r, "rows")
    call.vector(c, "cols")
  with_rows, with_cols = g_row is not None, g_col is not None
  if with_rows:
    call.vector(row_lse, "rows")
    call.vector(g_row, "rows")
  if with_cols:
    call.vector(col_lse, "cols")
    call.vector(g_col, "cols")
  aliases = call.accumulator(acc)
  out_shape, out_spec = _row_out(tiles, a.shape[1])
  kernel = functools.partial(
      _lse_bwd_kernel, tiles=tiles, kinds=kinds, scale_on=scale_on, with_rows=with_rows,
      with_cols=with_cols, with_acc=acc is not None,
  )
  return call(kernel, "jaxcl_lse_bwd", out_shape, out_spec,
              cost=_cost(tiles, a.shape[1], a.dtype.itemsize, 2, with_rows + with_cols), aliases=aliases)


# ------------------------------------------------------------------------------------------ sigmoid
def _sig_fwd_kernel(a_ref, b_ref, scale_ref, bias_ref, pr_ref, pc_ref, out_ref, *, tiles):
  @pl.when(pl.program_id(1) == 0)
  def _init():
    out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

  logits = _scores(a_ref, b_ref, scale_ref, "rows") + _column(bias_ref[...])
  valid = _valid(tiles, (), (), logits.shape)
  val = tile_math.sigmoid_value_tile(logits, _column(pr_ref[...]) == pc_ref[...], valid)
  out_ref[...] += _row(jnp.sum(val, axis=1, keepdims=True))


def sigmoid_forward(a, b, scale, bias, positives, *, tiles):
  """Σ_j softplus(−z_ij (S_ij + bias_i)) per row, float32 (N_a,).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> out = sigmoid_forward(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids), tiles=t)
  >>> round(float(out[0]), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  call = _Call(tiles)
  call.matrix(a, "rows")
  call.matrix(b, "cols")
  call.vector(scale, "rows")
  call.vector(bias, "rows")
  call.vector(positives[0], "rows")
  call.vector(positives[1], "cols")
  out_shape, out_spec = _row_out(tiles)
  out = call(functools.partial(_sig_fwd_kernel, tiles=tiles), "jaxcl_sigmoid_fwd", out_shape, out_spec,
             cost=_cost(tiles, a.shape[1], a.dtype.itemsize, 1, 2))
  return out[0]


def _sig_bwd_kernel(*refs, tiles, vec_on, with_acc):
  a_ref, b_ref, scale_ref, bias_ref, g_ref, pr_ref, pc_ref = refs[:7]
  acc_in = refs[7] if with_acc else None
  acc_ref, *sum_ref = refs[7 + with_acc:]
  _init_acc(acc_ref, acc_in)

  @pl.when(pl.program_id(1) == 0)
  def _init():
    for ref in sum_ref:
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  along = _column if vec_on == "rows" else (lambda x: x)
  logits = _scores(a_ref, b_ref, scale_ref, vec_on) + along(bias_ref[...])
  valid = _valid(tiles, (), (), logits.shape)
  ds = tile_math.sigmoid_grad_tile(logits, _column(pr_ref[...]) == pc_ref[...], valid, along(g_ref[...]))
  for ref in sum_ref:
    ref[...] += _row(jnp.sum(ds, axis=1, keepdims=True))
  if vec_on == "cols":
    ds = ds * scale_ref[...]
  b = b_ref[...]
  acc_ref[...] += jax.lax.dot(ds.astype(b.dtype), b, preferred_element_type=jnp.float32,
                              precision=tile_math.dot_precision(b.dtype))


def sigmoid_backward(a, b, scale, bias, positives, g, *, vec_on, tiles, acc=None):
  """(acc + Σ_j dS_ij b_j float32 (N_a, D), Σ_j dS_ij (N_a,) or None) for the sigmoid sum; `acc` as in
  `lse_backward` (updated in place).

  dS_ij = −g z_ij σ(−z_ij (S_ij + bias)); scale, bias and g lie along `vec_on` ("rows": the dq
  orientation, which also returns the row sums for the bias gradient; "cols": the dk orientation).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> acc, total = sigmoid_backward(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids), jnp.ones(16),
  ...                               vec_on="rows", tiles=t)
  >>> round(float(total[0]), 4)  # -σ(-1) + σ(0)
  0.2311
  """
  call = _Call(tiles)
  call.matrix(a, "rows")
  call.matrix(b, "cols")
  for v in (scale, bias, g):
    call.vector(v, vec_on)
  call.vector(positives[0], "rows")
  call.vector(positives[1], "cols")
  aliases = call.accumulator(acc)
  acc_shape, acc_spec = _row_out(tiles, a.shape[1])
  out_shape, out_specs = [acc_shape], [acc_spec]
  if vec_on == "rows":
    sum_shape, sum_spec = _row_out(tiles)
    out_shape.append(sum_shape)
    out_specs.append(sum_spec)
  outs = call(
      functools.partial(_sig_bwd_kernel, tiles=tiles, vec_on=vec_on, with_acc=acc is not None),
      "jaxcl_sigmoid_bwd", out_shape, out_specs, cost=_cost(tiles, a.shape[1], a.dtype.itemsize, 2, 1),
      aliases=aliases,
  )
  return outs[0], (outs[1][0] if vec_on == "rows" else None)
