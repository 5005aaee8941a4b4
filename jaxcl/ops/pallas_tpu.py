"""Mosaic (TPU) kernels of the `pallas` engine.

Every kernel runs over a grid (row blocks i × column blocks j), j innermost and "arbitrary" (it carries
accumulators), i "parallel" (split across TensorCores on megacore chips) unless the column log-sum-exp
is fused into the same pass; the fused backward runs (column blocks j × row blocks i), both
"arbitrary". Block shapes follow the Mosaic (8, 128) rule: the q/k blocks are
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
- `lse_backward_fused`: both from one recomputation of each tile (3 matmuls per tile instead of 4): a
  (column blocks × row blocks) grid, both "arbitrary", dk_j in its resident output block and the rows'
  Σ_j dS_ij b_j in a float32 VMEM scratch, turned into dq (a's dtype) and dscale by
  `engines.scale_grads` at the last j; the rows split into calls of one kernel (`fused_layout`).
- `sigmoid_forward`, `sigmoid_backward`, `sigmoid_backward_fused`: the same grids for
  Σ_j softplus(−z(S + b)) and its gradient.

Called by `jaxcl.ops.pallas` (which pads, dispatches and defines the custom VJP); see docs/pallas.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxcl.ops import _vma
from jaxcl.ops import engines
from jaxcl.ops import tiles as tile_math

_NT = (((1,), (1,)), ((), ()))  # a (m, d) · b (n, d)ᵀ


@dataclasses.dataclass(frozen=True)
class _Order:
  """How a call's grid walks the blocks of S: rows outer, (i, j), over all rows (the default), or
  columns outer, (j, i), over `row_blocks` row blocks from a first row block that is the call's scalar
  argument (`PrefetchScalarGridSpec`): then one compiled kernel serves every slice of the rows (the
  fused backward's calls). Row blocks past the last one map to it (the kernel skips those steps)."""

  cols_outer: bool = False
  row_blocks: int | None = None

  @property
  def scalars(self) -> int:
    return 1 if self.cols_outer else 0

  def grid(self, tiles: tile_math.Tiles) -> tuple[int, int]:
    ni, nj = tiles.grid
    ni = ni if self.row_blocks is None else self.row_blocks
    return (nj, ni) if self.cols_outer else (ni, nj)

  def blocks(self, g0, g1, first=None):
    """(i, j): the global row and column block of grid position (g0, g1); `first`: the first row
    block (the scalar argument, with `cols_outer`)."""
    return (g1 + first, g0) if self.cols_outer else (g0, g1)

  def index(self, tiles: tile_math.Tiles, f):
    """An index map over this grid from `f(i, j)` of the global blocks (i at most the last block)."""
    if not self.cols_outer:
      return f
    return lambda g0, g1, first_ref: f(jnp.minimum(g1 + first_ref[0], tiles.grid[0] - 1), g0)


_ROWS_OUTER = _Order()


class _Call:
  """Collects the inputs of a pallas_call with their block specs over the grid of `order`."""

  def __init__(self, tiles: tile_math.Tiles, order: _Order = _ROWS_OUTER):
    self.tiles = tiles
    self.order = order
    self.inputs: list[jax.Array] = []
    self.specs: list[pl.BlockSpec] = []

  def index(self, f):
    """An index map of this call's grid from f(i, j) of the global row and column block."""
    return self.order.index(self.tiles, f)

  def matrix(self, x: jax.Array, side: str, buffers: int | None = None):
    """x in (block, D) blocks along `side`; `buffers`: VMEM buffers of its blocks (None: 2, the next
    block is fetched while this one is used)."""
    block = self.tiles.block_a if side == "rows" else self.tiles.block_b
    index = (lambda i, j: (i, 0)) if side == "rows" else (lambda i, j: (j, 0))
    self.inputs.append(x)
    mode = None if buffers is None else pl.Buffered(buffers)
    self.specs.append(pl.BlockSpec((block, x.shape[1]), self.index(index), pipeline_mode=mode))

  def vector(self, x: jax.Array, side: str):
    """A vector as a lane-dense (1, N) array in (1, block_a) blocks along rows, (1, block_b) along
    columns. A kernel reads a row vector's block with `_column` (an (N, 1) array would take a whole
    (8, 128) tile per 8 values in HBM: 128x the bytes)."""
    self.inputs.append(jnp.reshape(x, (1, -1)))
    if side == "rows":
      self.specs.append(pl.BlockSpec((1, self.tiles.block_a), self.index(lambda i, j: (0, i))))
    else:
      self.specs.append(pl.BlockSpec((1, self.tiles.block_b), self.index(lambda i, j: (0, j))))

  def lse_operands(self, a, b, scale, scale_on: str, ids):
    """The operands every log-sum-exp kernel starts with: a (rows), b (columns), the scale along
    `scale_on`, and each id pair (row ids, column ids)."""
    self.matrix(a, "rows")
    self.matrix(b, "cols")
    self.vector(scale, scale_on)
    for r, c in ids:
      self.vector(r, "rows")
      self.vector(c, "cols")

  def accumulator(self, acc: jax.Array | None, side: str = "rows", output: int = 0,
                  buffers: int | None = None):
    """The float32 (N, D) accumulator along `side` a backward kernel adds into, in place (None: start
    from zero): read in the output's blocks (`buffers` as in `matrix`), and its buffer becomes output
    `output` (`input_output_aliases`)."""
    if acc is None:
      return {}
    self.matrix(acc, side, buffers)
    return {len(self.inputs) - 1: output}

  def in_place(self, x: jax.Array | None, output: int):
    """`x` (None: nothing) passed unread (left in HBM) as the buffer of output `output`: the kernel
    writes some of its blocks, the others keep their values."""
    if x is None:
      return {}
    self.inputs.append(x)
    self.specs.append(pl.BlockSpec(memory_space=pl.ANY))
    return {len(self.inputs) - 1: output}

  def __call__(self, kernel, name, out_shape, out_specs, *, scratch=(), semantics=("parallel", "arbitrary"),
               cost=None, aliases=None, vmem_limit=None, scalars=()):
    """The call's outputs; `scalars`: the `order.scalars` int32 values of the scalar argument
    (`_Order`); `aliases`: {input index in `inputs`: output index}."""
    inputs, out_shape = _vma.kernel_io(self.inputs, out_shape)
    if len(scalars) != self.order.scalars:
      raise ValueError(f"this grid takes {self.order.scalars} scalars, got {scalars!r}")
    prefix = [jnp.asarray(scalars, jnp.int32)] if scalars else []
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefix), grid=self.order.grid(self.tiles), in_specs=self.specs,
            out_specs=out_specs, scratch_shapes=list(scratch),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit),
        interpret=self.tiles.interpret,
        cost_estimate=cost,
        input_output_aliases={len(prefix) + n: out for n, out in (aliases or {}).items()},
        name=name,
    )(*prefix, *inputs)


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


def _cost(tiles: tile_math.Tiles, d: int, itemsize: int, matmuls: int, exps: int,
          rows: int | None = None) -> pl.CostEstimate:
  """The cost of one call over `rows` rows (None: all) and all columns: `matmuls` tile matmuls and
  `exps` exponentials per entry; bytes: a once, b once per row block, `matmuls` float32 (rows, D)."""
  rows = tiles.padded_a if rows is None else rows
  elements = rows * tiles.padded_b
  return pl.CostEstimate(
      flops=2 * matmuls * elements * d,
      transcendentals=exps * elements,
      bytes_accessed=itemsize * d * (rows + rows // tiles.block_a * tiles.padded_b) + 4 * matmuls * rows * d,
  )


def _scores(a_ref, b_ref, scale_ref, scale_on):
  a, b = a_ref[...], b_ref[...]
  s = jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32,
                          precision=tile_math.dot_precision(b.dtype))
  return s * (_column(scale_ref[...]) if scale_on == "rows" else scale_ref[...])


def _valid(tiles: tile_math.Tiles, kinds, id_refs, shape, ij=None):
  """The tile's validity (`tile_math.tile_valid`) at global block `ij` (None: the grid position)."""
  i, j = (pl.program_id(0), pl.program_id(1)) if ij is None else ij
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
  call.lse_operands(a, b, scale, scale_on, ids)
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


def _dot(x, b, dims=(((1,), (0,)), ((), ()))):
  """x · b (dims: a dot_general's dimension numbers) with x cast to b's dtype, float32 accumulation:
  a backward kernel's dS · b (or dSᵀ · b)."""
  return jax.lax.dot_general(x.astype(b.dtype), b, dims, preferred_element_type=jnp.float32,
                             precision=tile_math.dot_precision(b.dtype))


_TN = (((0,), (0,)), ((), ()))  # xᵀ · b


def _lse_grad_inputs(call: _Call, *, a, b, scale, ids, row_lse, g_row, col_lse, g_col, scale_on):
  """Adds the inputs of a log-sum-exp backward kernel to `call`: a, b, the scale, the id pairs, and
  the row / column log-sum-exps with their cotangents (where given)."""
  call.lse_operands(a, b, scale, scale_on, ids)
  if g_row is not None:
    call.vector(row_lse, "rows")
    call.vector(g_row, "rows")
  if g_col is not None:
    call.vector(col_lse, "cols")
    call.vector(g_col, "cols")


def _lse_grad_tile(it, *, tiles, kinds, scale_on, with_rows, with_cols, ij=None):
  """(a_ref, b_ref, scale_ref, dS): reads the refs `_lse_grad_inputs` added from the iterator `it` and
  recomputes this grid step's tile of dS = g_row e^{S − row} + g_col e^{S − col} on valid entries."""
  a_ref, b_ref, scale_ref = next(it), next(it), next(it)
  id_refs = [(next(it), next(it)) for _ in kinds]
  row_lse, g_row = (_column(next(it)[...]), _column(next(it)[...])) if with_rows else (None, None)
  col_lse, g_col = (next(it)[...], next(it)[...]) if with_cols else (None, None)
  s = _scores(a_ref, b_ref, scale_ref, scale_on)
  valid = _valid(tiles, kinds, id_refs, s.shape, ij)
  return a_ref, b_ref, scale_ref, tile_math.softmax_grad_tile(s, valid, row_lse, g_row, col_lse, g_col)


def _lse_bwd_kernel(*refs, with_acc, **tile):
  it = iter(refs)
  _, b_ref, scale_ref, ds = _lse_grad_tile(it, **tile)
  acc_in = next(it) if with_acc else None
  acc_ref = next(it)
  _init_acc(acc_ref, acc_in)
  if tile["scale_on"] == "cols":
    ds = ds * scale_ref[...]
  acc_ref[...] += _dot(ds, b_ref[...])


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
  _lse_grad_inputs(call, a=a, b=b, scale=scale, ids=ids, row_lse=row_lse, g_row=g_row, col_lse=col_lse,
                   g_col=g_col, scale_on=scale_on)
  with_rows, with_cols = g_row is not None, g_col is not None
  aliases = call.accumulator(acc)
  out_shape, out_spec = _row_out(tiles, a.shape[1])
  kernel = functools.partial(
      _lse_bwd_kernel, tiles=tiles, kinds=kinds, scale_on=scale_on, with_rows=with_rows,
      with_cols=with_cols, with_acc=acc is not None,
  )
  return call(kernel, "jaxcl_lse_bwd", out_shape, out_spec,
              cost=_cost(tiles, a.shape[1], a.dtype.itemsize, 2, with_rows + with_cols), aliases=aliases)


def _fused_bwd_kernel(first_ref, *refs, tiles, grad_tile, row_sums):
  """One step of a fused backward: `grad_tile(refs iterator, ij)` gives (a_ref, b_ref, scale_ref, dS) of
  the tile; refs end with dk in, the in-place dq and dscale (and row sums), dk out, dq out, dscale out
  (row sums out), the g scratch (row sums scratch). At the last column block a row block's
  g_i = Σ_j dS_ij b_j is complete and the epilogue stores dq_i = scale_i · g_i (a's dtype) and
  dscale_i = <a_i, g_i> by `engines.scale_grads`."""
  n = 4 if row_sums else 3
  tail = refs[len(refs) - (3 * n - 2):]
  dk_in, (dk_ref, dq_ref, dscale_ref, *s_ref), (g_acc, *s_acc) = tail[0], tail[n:2 * n], tail[2 * n:]
  j, i = pl.program_id(0), pl.program_id(1)  # i: the row block within this call's rows
  ij = (i + first_ref[0], j)
  _init_acc(dk_ref, dk_in)  # at i == 0, from the dk of the earlier calls: resident while i runs

  @pl.when(ij[0] < tiles.grid[0])  # past the last row block: nothing (the last call's overhang)
  def _step():
    a_ref, b_ref, scale_ref, ds = grad_tile(iter(refs), ij=ij)
    last = j == pl.num_programs(0) - 1
    rows = pl.ds(pl.multiple_of(i * tiles.block_a, tiles.block_a), tiles.block_a)
    g_acc[rows] = jnp.where(j == 0, 0.0, g_acc[rows]) + _dot(ds, b_ref[...])
    for acc in s_acc:
      acc[i] = jnp.where(j == 0, 0.0, acc[i]) + _row(jnp.sum(ds, axis=1, keepdims=True))
    dk_ref[...] += _dot(ds * _column(scale_ref[...]), a_ref[...], _TN)

    @pl.when(last)
    def _store():
      dq, dscale = engines.scale_grads(a_ref[...], _column(scale_ref[...]), g_acc[rows], columns=True)
      dq_ref[...] = dq.astype(dq_ref.dtype)
      dscale_ref[...] = _row(dscale)
      for acc, out in zip(s_acc, s_ref):
        out[...] = acc[i]


def fused_layout(tiles: tile_math.Tiles, d: int, itemsize: int, vmem: int) -> tuple[int, int, int]:
  """(column block, rows per call, VMEM bytes) of the fused backward within about `vmem` bytes of VMEM.

  The blocks take 2 · block_a · D · (itemsize + 4) (a, and dq out counted at float32) + block_b · D · (2 · itemsize + 12)
  (b, dk in, dk out) + t · block_a · block_b bytes (float32 tile temporaries and spills: t = 40 for
  float32 inputs, 16 for bf16, as compiled); the column block is halved (while a multiple of 256) until
  they leave room for the float32 (rows, D) sum of 1024 rows (or of all rows, if fewer), and the rows
  per call fill the rest: a multiple of the row block, at least one, at most all rows.

  >>> t = tile_math.Tiles(256, 512, n_a=9000, n_b=9000, padded_a=9216, padded_b=9216, interpret=False,
  ...                     num_warps=None, num_stages=2)
  >>> [fused_layout(t, d, size, 14 << 20)[:2] for d, size in ((768, 4), (768, 2), (128, 2))]
  [(256, 1536), (512, 1280), (512, 9216)]
  """
  ba, bb = tiles.block_a, tiles.block_b
  blocks = lambda bb: (2 * ba * d * (itemsize + 4) + bb * d * (2 * itemsize + 12)
                       + (40 if itemsize == 4 else 16) * ba * bb)
  least = 4 * d * min(1024, tiles.padded_a)
  while blocks(bb) + least > vmem and bb % 256 == 0:
    bb //= 2
  rows = min(max(ba, (vmem - blocks(bb)) // (4 * d) // ba * ba), tiles.padded_a)
  return bb, rows, blocks(bb) + 4 * rows * d


def lse_backward_fused(a, b, scale, ids, row_lse, g_row, col_lse, g_col, *, kinds, tiles, vmem, acc=None):
  """(dq (N_a, D) in a's dtype, acc + Σ_i scale_i dS_ij a_i float32 (N_b, D), dscale float32 (N_a,))
  from ONE recomputation of each tile of S (dS as in `lse_backward`, scale along rows): the dq and dk
  kernels of `lse_backward` in one pass, 3 matmuls per tile instead of 4; `acc` (None: zeros) is
  updated in place.

  The grid runs over column blocks j (outer) and row blocks i (inner), both "arbitrary": dk_j stays in
  its resident output block while i runs, and g_i = Σ_j dS_ij b_j of the call's rows in a float32 VMEM
  scratch; at the last j the epilogue applies `engines.scale_grads` to it (dq_i = scale_i · g_i,
  dscale_i = <a_i, g_i>), so no float32 (N_a, D) g reaches HBM. That scratch bounds the rows of one
  call: within about `vmem` bytes of VMEM (`fused_layout`, which may also halve the column block), the
  rows are split into calls of one kernel whose first row block is a scalar argument, run by a
  `fori_loop` where there are several; the calls update dk, dq and dscale in place.

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> lse = jnp.full(16, jnp.log(jnp.e ** 2 + 1.0))  # at scale 2
  >>> dq, dk, dscale = lse_backward_fused(x, x, jnp.full(16, 2.0), (), lse, jnp.ones(16), None, None,
  ...                                     kinds=(), tiles=t, vmem=1 << 20)
  >>> [round(float(v), 4) for v in dq[0, :2]]  # 2 · softmax of row 0: 2 (e², 1) / (e² + 1)
  [1.7616, 0.2384]
  >>> [round(float(v), 4) for v in dk[0, :2]]  # 2 · column 0 of the row softmaxes
  [1.7616, 0.2384]
  >>> round(float(dscale[0]), 4)  # <x_0, softmax of row 0>
  0.8808
  """
  with_rows, with_cols = g_row is not None, g_col is not None
  add_inputs = functools.partial(_lse_grad_inputs, a=a, b=b, scale=scale, ids=ids, row_lse=row_lse,
                                 g_row=g_row, col_lse=col_lse, g_col=g_col, scale_on="rows")
  grad_tile = functools.partial(_lse_grad_tile, kinds=kinds, scale_on="rows", with_rows=with_rows,
                                with_cols=with_cols)
  return _fused_backward("jaxcl_lse_bwd_fused", tiles, a, add_inputs, grad_tile, row_sums=False, vmem=vmem,
                         acc=acc, exps=with_rows + with_cols)


def _fused_backward(name, tiles, a, add_inputs, grad_tile, *, row_sums, vmem, acc, exps):
  """(dq, dk, dscale) or (dq, dk, dscale, row sums) of a fused backward: `add_inputs(call)` adds the
  kernel's inputs, `grad_tile` reads them (`_fused_bwd_kernel`); the rows in calls of one kernel
  (`fused_layout`)."""
  ba, d = tiles.block_a, a.shape[1]
  block_b, rows, need = fused_layout(tiles, d, a.dtype.itemsize, vmem)
  tiles = dataclasses.replace(tiles, block_b=block_b)
  grad_tile = functools.partial(grad_tile, tiles=tiles)
  (n_blocks, nj), per_call = tiles.grid, rows // ba
  order = _Order(cols_outer=True, row_blocks=per_call)
  # dk_j resident while i runs; the blocks of dq, dscale (and the row sums) stay at the call's first row
  # block until the last column block, where they follow i: each is written back once, after it was
  # stored.
  written = lambda j, i, first_ref: jnp.minimum(jnp.where(j == nj - 1, i, 0) + first_ref[0], n_blocks - 1)
  row_vector = (jax.ShapeDtypeStruct((1, tiles.padded_a), jnp.float32),
                pl.BlockSpec((1, ba), lambda *g: (0, written(*g))))
  outs = [(jax.ShapeDtypeStruct((tiles.padded_b, d), jnp.float32),
           pl.BlockSpec((tiles.block_b, d), order.index(tiles, lambda i, j: (j, 0)))),
          (jax.ShapeDtypeStruct((tiles.padded_a, d), a.dtype), pl.BlockSpec((ba, d), lambda *g: (written(*g), 0))),
          row_vector] + [row_vector] * row_sums
  out_shape, out_specs = [shape for shape, _ in outs], [spec for _, spec in outs]
  scratch = [pltpu.VMEM((per_call * ba, d), jnp.float32)]
  if row_sums:
    scratch.append(pltpu.VMEM((per_call, 1, ba), jnp.float32))
  kernel = functools.partial(_fused_bwd_kernel, tiles=tiles, grad_tile=grad_tile, row_sums=row_sums)

  def step(c, carry):
    """Call c: the rows from block c · per_call, adding into dk and writing their dq, dscale, in place."""
    call = _Call(tiles, order)
    add_inputs(call)
    aliases = call.accumulator(carry[0], "cols", output=0, buffers=1)  # read at i == 0 only
    for n, x in enumerate(carry[1:], 1):
      aliases.update(call.in_place(x, output=n))
    return tuple(call(
        kernel, name, out_shape, out_specs, scalars=(c * per_call,), scratch=scratch,
        semantics=("arbitrary", "arbitrary"), cost=_cost(tiles, d, a.dtype.itemsize, 3, exps, rows=per_call * ba),
        aliases=aliases, vmem_limit=max(need, vmem) + (4 << 20),
    ))

  dk = jnp.zeros((tiles.padded_b, d), jnp.float32) if acc is None else acc
  carry = _vma.like((dk, *(jnp.zeros(s.shape, s.dtype) for s in out_shape[1:])), a)
  calls = -(-n_blocks // per_call)
  dk, dq, *vectors = step(0, carry) if calls == 1 else jax.lax.fori_loop(0, calls, step, carry)
  return (dq, dk, *(v[0] for v in vectors))


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


def _sig_grad_inputs(call: _Call, *, a, b, scale, bias, positives, g, vec_on):
  """Adds the inputs of a sigmoid backward kernel to `call`: a, b, scale / bias / g along `vec_on`, the
  positive ids."""
  call.matrix(a, "rows")
  call.matrix(b, "cols")
  for v in (scale, bias, g):
    call.vector(v, vec_on)
  call.vector(positives[0], "rows")
  call.vector(positives[1], "cols")


def _sig_grad_tile(it, *, tiles, vec_on, ij=None):
  """(a_ref, b_ref, scale_ref, dS): reads the refs `_sig_grad_inputs` added from `it` and recomputes
  this grid step's tile of dS = −g z σ(−z (S + bias)) on valid entries."""
  a_ref, b_ref, scale_ref, bias_ref, g_ref, pr_ref, pc_ref = (next(it) for _ in range(7))
  along = _column if vec_on == "rows" else (lambda x: x)
  logits = _scores(a_ref, b_ref, scale_ref, vec_on) + along(bias_ref[...])
  valid = _valid(tiles, (), (), logits.shape, ij)
  ds = tile_math.sigmoid_grad_tile(logits, _column(pr_ref[...]) == pc_ref[...], valid, along(g_ref[...]))
  return a_ref, b_ref, scale_ref, ds


def _sig_bwd_kernel(*refs, tiles, vec_on, with_acc):
  it = iter(refs)
  _, b_ref, scale_ref, ds = _sig_grad_tile(it, tiles=tiles, vec_on=vec_on)
  acc_in = next(it) if with_acc else None
  acc_ref, *sum_ref = it
  _init_acc(acc_ref, acc_in)

  @pl.when(pl.program_id(1) == 0)
  def _init():
    for ref in sum_ref:
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  for ref in sum_ref:
    ref[...] += _row(jnp.sum(ds, axis=1, keepdims=True))
  if vec_on == "cols":
    ds = ds * scale_ref[...]
  acc_ref[...] += _dot(ds, b_ref[...])


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
  _sig_grad_inputs(call, a=a, b=b, scale=scale, bias=bias, positives=positives, g=g, vec_on=vec_on)
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


def sigmoid_backward_fused(a, b, scale, bias, positives, g, *, tiles, vmem, acc=None):
  """(dq (N_a, D) in a's dtype, acc + Σ_i scale_i dS_ij a_i float32 (N_b, D), dscale float32 (N_a,),
  Σ_j dS_ij float32 (N_a,)) from ONE recomputation of each tile (dS as in `sigmoid_backward`, scale,
  bias and g along rows): the two orientations of `sigmoid_backward` in one pass, dq and dscale by
  `engines.scale_grads` in the epilogue, as `lse_backward_fused` does for log-sum-exp.

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 128)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> dq, dk, dscale, total = sigmoid_backward_fused(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids),
  ...                                                jnp.ones(16), tiles=t, vmem=1 << 20)
  >>> round(float(total[0]), 4), [round(float(v), 4) for v in dk[0, :2]]  # -σ(-1) + σ(0); (-σ(-1), σ(0))
  (0.2311, [-0.2689, 0.5])
  >>> round(float(dscale[0]), 4)  # <x_0, (-σ(-1), σ(0))>
  -0.2689
  """
  add_inputs = functools.partial(_sig_grad_inputs, a=a, b=b, scale=scale, bias=bias, positives=positives,
                                 g=g, vec_on="rows")
  grad_tile = functools.partial(_sig_grad_tile, vec_on="rows")
  return _fused_backward("jaxcl_sigmoid_bwd_fused", tiles, a, add_inputs, grad_tile, row_sums=True, vmem=vmem,
                         acc=acc, exps=1)
