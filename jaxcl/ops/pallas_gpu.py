"""Triton (GPU) kernels of the `pallas` engine.

One program per row block (grid (n_row_blocks,)): it keeps its (block, D) slice of `a` and its row
vectors in registers/shared memory and walks the column blocks of `b` with a `fori_loop`, loading
(block, D) tiles of the whole `b` (kept in global memory, read through L2) and the matching slices of
the column vectors. Block sizes are powers of two >= 16 (Triton tensor shapes and tensor-core dots) and
D is zero-padded to a power of two; compiler parameters `num_warps` and `num_stages` (software
pipelining of the column loop) come from the engine settings. Dots accumulate in float32; f32 inputs
use IEEE precision (no TF32).

The kernels of the TPU flavour (`jaxcl.ops.pallas_tpu`): `lse_forward` (row log-sum-exp; the column
log-sum-exp is the same kernel with a and b swapped, since programs of a Triton grid cannot share
column accumulators), `lse_backward`, `sigmoid_forward`, `sigmoid_backward`; the backward kernels start
from zero or add into a given accumulator in place (`input_output_aliases`). The fused backward
(`lse_backward_fused`, `sigmoid_backward_fused`) is the dq kernel that also adds each tile's dk
contribution, Σ_i scale_i dS_ij a_i, into a float32 (N_b, D) buffer with `atomic_add`: one
recomputation of S for both, 3 matmuls per tile instead of 4, as in "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning" (Dao, 2023). Its epilogue turns each row
block's complete Σ_j dS_ij b_j into dq (q's dtype) and dscale by `engines.scale_grads`, so no float32
(N_a, D) sum is written out beside the float32 dk. The order in which the programs' atomics land is not
fixed, so float32 dk may differ in its last bits from run to run (the two kernels are deterministic).

Called by `jaxcl.ops.pallas` (which pads, dispatches and defines the custom VJP); see docs/pallas.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxcl.ops import _vma
from jaxcl.ops import engines
from jaxcl.ops import tiles as tile_math

_NT = (((1,), (1,)), ((), ()))  # a (m, d) · b (n, d)ᵀ
_TN = (((0,), (0,)), ((), ()))  # a (m, n)ᵀ · b (m, d)


class _Call:
  """Collects the inputs of a pallas_call over the row-block grid with their block specs."""

  def __init__(self, tiles: tile_math.Tiles):
    self.tiles = tiles
    self.inputs: list[jax.Array] = []
    self.specs: list[pl.BlockSpec] = []

  def add(self, x: jax.Array, side: str):
    """Rows: this program's block of x; columns: all of x (the kernel slices one block per step)."""
    self.inputs.append(x)
    if side == "rows":
      block = (self.tiles.block_a,) + x.shape[1:]
      self.specs.append(pl.BlockSpec(block, lambda i: (i,) + (0,) * (x.ndim - 1)))
    else:
      self.specs.append(pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim))

  def lse_operands(self, a, b, scale, scale_on: str, ids):
    """The operands every log-sum-exp kernel starts with: a (rows), b (columns), the scale along
    `scale_on`, and each id pair (row ids, column ids)."""
    self.add(a, "rows")
    self.add(b, "cols")
    self.add(scale, scale_on)
    for r, c in ids:
      self.add(r, "rows")
      self.add(c, "cols")

  def accumulator(self, acc: jax.Array | None, side: str = "rows", output: int = 0):
    """The float32 accumulator a backward kernel adds into, in place (None: start from zero): (N_a, D)
    read in the output's row blocks, or (N_b, D) whole (side "cols", the fused backward's dk, which the
    programs add into with atomics); its buffer becomes output `output` (`input_output_aliases`)."""
    if acc is None:
      return {}
    self.add(acc, side)
    return {len(self.inputs) - 1: output}

  def __call__(self, kernel, name, out_shape, out_specs, aliases=None):
    t = self.tiles
    num_warps = t.num_warps or (8 if t.block_a * t.block_b >= 128 * 128 else 4)
    inputs, out_shape = _vma.kernel_io(self.inputs, out_shape)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t.grid[0],),
        in_specs=self.specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=t.num_stages),
        interpret=t.interpret,
        input_output_aliases=aliases or {},
        name=name,
    )(*inputs)


def _dk_out(tiles: tile_math.Tiles, width: int):
  """The fused backward's float32 (N_b, D) dk: one whole block that every program adds into."""
  shape = (tiles.padded_b, width)
  return jax.ShapeDtypeStruct(shape, jnp.float32), pl.BlockSpec(shape, lambda i: (0, 0))


def _dk_start(acc, tiles: tile_math.Tiles, width: int):
  """The buffer the fused backward's atomics add dk into: `acc` (float32 (N_b, D)), or zeros."""
  return jnp.zeros((tiles.padded_b, width), jnp.float32) if acc is None else acc


def _row_out(tiles: tile_math.Tiles, width: int | None = None, dtype=jnp.float32):
  shape = (tiles.padded_a,) if width is None else (tiles.padded_a, width)
  block = (tiles.block_a,) if width is None else (tiles.block_a, width)
  index = lambda i: (i,) + (0,) * (len(shape) - 1)
  return jax.ShapeDtypeStruct(shape, dtype), pl.BlockSpec(block, index)


def _fused_outs(tiles: tile_math.Tiles, a: jax.Array, with_sums: bool):
  """(shapes, block specs) of the fused backward's outputs: dq (N_a, D) in a's dtype, dk float32
  (N_b, D), dscale float32 (N_a,), and the row sums of dS float32 (N_a,) if `with_sums`."""
  outs = [_row_out(tiles, a.shape[1], a.dtype), _dk_out(tiles, a.shape[1]), _row_out(tiles)]
  if with_sums:
    outs.append(_row_out(tiles))
  return [shape for shape, _ in outs], [spec for _, spec in outs]


def _store_scale_grads(tile: "_Tile", g: jax.Array, dq_ref, dscale_ref):
  """The fused backward's epilogue, where a row block's g_i = Σ_j dS_ij b_j is complete: dq_i =
  scale_i · g_i (stored in the input dtype) and dscale_i = <a_i, g_i> (float32), by
  `engines.scale_grads`, the formula every engine applies to its g. Padded rows are invalid in every
  tile, so their g, dq and dscale are exact zeros."""
  dq, dscale = engines.scale_grads(tile.a, tile.scale_ref[...], g)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dscale_ref[...] = dscale


class _Tile:
  """Loads what one step of the column loop needs: the b tile, S = a bᵀ · scale and its validity."""

  def __init__(self, tiles, kinds, a_ref, b_ref, scale_ref, scale_on, id_refs):
    self.tiles, self.kinds, self.b_ref = tiles, kinds, b_ref
    self.scale_ref, self.scale_on, self.id_refs = scale_ref, scale_on, id_refs
    self.a = a_ref[...]
    self.row_scale = scale_ref[...][:, None] if scale_on == "rows" else None
    self.row_ids = [r[...][:, None] for r, _ in id_refs]
    self.row_pos = (pl.program_id(0) * tiles.block_a + jnp.arange(tiles.block_a))[:, None]

  def cols(self, j):
    return pl.ds(pl.multiple_of(j * self.tiles.block_b, self.tiles.block_b), self.tiles.block_b)

  def col_vector(self, ref, j):
    return ref[self.cols(j)][None, :]

  def __call__(self, j):
    """(b tile, scores, validity or None) for column block j."""
    b = self.b_ref[self.cols(j), :]
    s = jax.lax.dot_general(self.a, b, _NT, preferred_element_type=jnp.float32,
                            precision=tile_math.dot_precision(b.dtype))
    s = s * (self.row_scale if self.scale_on == "rows" else self.col_vector(self.scale_ref, j))
    col_pos = (j * self.tiles.block_b + jnp.arange(self.tiles.block_b))[None, :]
    id_tiles = [(r, self.col_vector(c, j)) for r, (_, c) in zip(self.row_ids, self.id_refs)]
    return b, s, tile_math.tile_valid(self.row_pos, col_pos, self.tiles, self.kinds, id_tiles)


def _dot(x, y, dims):
  return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32,
                             precision=tile_math.dot_precision(y.dtype))


def _grad_loop(tile: _Tile, ds_of, acc, *, dk_ref=None, row_sums: bool = False):
  """The column loop of a backward program, dS_ij = `ds_of(j, s, valid)` for column block j:

      (acc + Σ_j dS_ij b_j,  Σ_j dS_ij per row if `row_sums` else None)

  with scale_j inside the first sum where the scale lies along columns (the dk orientation) and scale_i
  left out where it lies along rows (the caller applies it). With `dk_ref` (the fused backward, scale
  along rows) each step also adds Σ_i scale_i dS_ij a_i into rows j of dk_ref with float32 atomics:
  one recomputation of the tile for dq and dk. dS is cast to the input dtype for both matmuls."""
  def body(j, carry):
    acc, total = carry
    b, s, valid = tile(j)
    ds = ds_of(j, s, valid)
    if row_sums:
      total = total + jnp.sum(ds, axis=1)
    if dk_ref is not None:
      ds_k = (ds * tile.row_scale).astype(tile.a.dtype)
      plgpu.atomic_add(dk_ref, (tile.cols(j), slice(None)), _dot(ds_k, tile.a, _TN))
    if tile.scale_on == "cols":
      ds = ds * tile.col_vector(tile.scale_ref, j)
    return acc + jax.lax.dot(ds.astype(b.dtype), b, preferred_element_type=jnp.float32,
                             precision=tile_math.dot_precision(b.dtype)), total

  total = jnp.zeros((tile.tiles.block_a,), jnp.float32) if row_sums else None
  return jax.lax.fori_loop(0, tile.tiles.grid[1], body, (acc, total))


# ------------------------------------------------------------------------------------- log-sum-exp
def _lse_fwd_kernel(*refs, tiles, kinds, scale_on):
  a_ref, b_ref, scale_ref, *id_flat, out_ref = refs
  id_refs = list(zip(id_flat[::2], id_flat[1::2]))
  tile = _Tile(tiles, kinds, a_ref, b_ref, scale_ref, scale_on, id_refs)

  def body(j, carry):
    _, s, valid = tile(j)
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    return tile_math.online_update(*carry, s, axis=1, keepdims=False)

  init = (jnp.full((tiles.block_a,), -jnp.inf, jnp.float32), jnp.zeros((tiles.block_a,), jnp.float32))
  m, l = jax.lax.fori_loop(0, tiles.grid[1], body, init)
  out_ref[...] = tile_math.finalize_lse(m, l)


def lse_forward(a, b, scale, ids, *, kinds, scale_on, with_cols, tiles):
  """(row (N_a,), None): log-sum-exp over valid entries of S = scale · a bᵀ along rows.

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> row, _ = lse_forward(x, x, jnp.ones(16), (), kinds=(), scale_on="rows", with_cols=False, tiles=t)
  >>> [round(float(v), 4) for v in row[:2]]  # log(e + 1)
  [1.3133, 1.3133]
  """
  if with_cols:
    raise ValueError("the GPU kernels compute the column log-sum-exp with a second, swapped call.")
  call = _Call(tiles)
  call.lse_operands(a, b, scale, scale_on, ids)
  out_shape, out_spec = _row_out(tiles)
  kernel = functools.partial(_lse_fwd_kernel, tiles=tiles, kinds=kinds, scale_on=scale_on)
  return call(kernel, "jaxcl_lse_fwd", out_shape, out_spec), None


def _acc_start(acc_ref, acc_in):
  """A row block's accumulator start: the accumulator's block (in-place update) or zeros."""
  return jnp.zeros(acc_ref.shape, jnp.float32) if acc_in is None else acc_in[...]


def _lse_bwd_kernel(*refs, tiles, kinds, scale_on, with_rows, with_cols, with_acc, fused):
  it = iter(refs)
  a_ref, b_ref, scale_ref = next(it), next(it), next(it)
  id_refs = [(next(it), next(it)) for _ in kinds]
  row_lse, g_row = (next(it)[...][:, None], next(it)[...][:, None]) if with_rows else (None, None)
  col_refs = (next(it), next(it)) if with_cols else None
  acc_in = next(it) if with_acc else None
  tile = _Tile(tiles, kinds, a_ref, b_ref, scale_ref, scale_on, id_refs)

  def ds_of(j, s, valid):
    col_lse, g_col = (tile.col_vector(r, j) for r in col_refs) if with_cols else (None, None)
    return tile_math.softmax_grad_tile(s, valid, row_lse, g_row, col_lse, g_col)

  if fused:
    next(it)  # dk's starting buffer: the same buffer as dk_ref (input_output_aliases)
    dq_ref, dk_ref, dscale_ref = next(it), next(it), next(it)
    g, _ = _grad_loop(tile, ds_of, jnp.zeros(a_ref.shape, jnp.float32), dk_ref=dk_ref)
    _store_scale_grads(tile, g, dq_ref, dscale_ref)
  else:
    acc_ref = next(it)
    acc_ref[...], _ = _grad_loop(tile, ds_of, _acc_start(acc_ref, acc_in))


def _lse_grad_call(a, b, scale, ids, row_lse, g_row, col_lse, g_col, *, kinds, scale_on, tiles, acc, fused):
  """The pallas_call of `lse_backward` (fused False) or `lse_backward_fused` (True)."""
  call = _Call(tiles)
  call.lse_operands(a, b, scale, scale_on, ids)
  with_rows, with_cols = g_row is not None, g_col is not None
  if with_rows:
    call.add(row_lse, "rows")
    call.add(g_row, "rows")
  if with_cols:
    call.add(col_lse, "cols")
    call.add(g_col, "cols")
  width = a.shape[1]
  if fused:
    aliases = call.accumulator(_dk_start(acc, tiles, width), "cols", 1)
    out_shape, out_spec = _fused_outs(tiles, a, with_sums=False)
  else:
    aliases = call.accumulator(acc)
    out_shape, out_spec = _row_out(tiles, width)
  kernel = functools.partial(
      _lse_bwd_kernel, tiles=tiles, kinds=kinds, scale_on=scale_on, with_rows=with_rows,
      with_cols=with_cols, with_acc=acc is not None and not fused, fused=fused,
  )
  return call(kernel, "jaxcl_lse_bwd_fused" if fused else "jaxcl_lse_bwd", out_shape, out_spec, aliases)


def lse_backward(a, b, scale, ids, row_lse, g_row, col_lse, g_col, *, kinds, scale_on, tiles, acc=None):
  """acc + Σ_j dS_ij b_j (float32 (N_a, D)), dS = g_row e^{S − row} + g_col e^{S − col} on valid
  entries; `acc` (float32 (N_a, D), None: zeros) is updated in place (its buffer is the output's).

  With the scale along rows the factor scale_i is left out (the caller applies it and reuses the sum
  for the scale's gradient); along columns scale_j is inside the sum (the dk orientation).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> lse = jnp.full(16, jnp.log(jnp.e + 1.0))
  >>> out = lse_backward(x, x, jnp.ones(16), (), lse, jnp.ones(16), None, None, kinds=(),
  ...                    scale_on="rows", tiles=t)
  >>> [round(float(v), 4) for v in out[0, :2]]  # softmax of row 0: (e, 1) / (e + 1)
  [0.7311, 0.2689]
  """
  return _lse_grad_call(a, b, scale, ids, row_lse, g_row, col_lse, g_col, kinds=kinds, scale_on=scale_on,
                        tiles=tiles, acc=acc, fused=False)


def lse_backward_fused(a, b, scale, ids, row_lse, g_row, col_lse, g_col, *, kinds, tiles, acc=None):
  """(dq (N_a, D) in a's dtype, acc + Σ_i scale_i dS_ij a_i float32 (N_b, D), dscale float32 (N_a,))
  from ONE recomputation of each tile of S (dS as in `lse_backward`, scale along rows): the dq and dk
  kernels of `lse_backward` in one, 3 matmuls per tile instead of 4; `acc` (None: zeros) is updated in
  place.

  One program per row block walks the column blocks, keeps its rows' g_i = Σ_j dS_ij b_j in registers
  and adds each tile's (block_b, D) dk contribution into the float32 dk buffer with `atomic_add` (the
  programs run concurrently, so the order of the additions, and the last bits of dk, vary from run to
  run). Where its g is complete the program applies `engines.scale_grads` to it:

      dq_i = scale_i · g_i,    dscale_i = <a_i, g_i>

  so no float32 (N_a, D) g is written out (it would be live with the float32 dk).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> lse = jnp.full(16, jnp.log(jnp.e ** 2 + 1.0))  # at scale 2
  >>> dq, dk, dscale = lse_backward_fused(x, x, jnp.full(16, 2.0), (), lse, jnp.ones(16), None, None,
  ...                                     kinds=(), tiles=t)
  >>> [round(float(v), 4) for v in dq[0, :2]]  # 2 · softmax of row 0: 2 (e², 1) / (e² + 1)
  [1.7616, 0.2384]
  >>> [round(float(v), 4) for v in dk[0, :2]]  # 2 · column 0 of the row softmaxes
  [1.7616, 0.2384]
  >>> round(float(dscale[0]), 4)  # <x_0, softmax of row 0>
  0.8808
  """
  dq, dk, dscale = _lse_grad_call(a, b, scale, ids, row_lse, g_row, col_lse, g_col, kinds=kinds,
                                  scale_on="rows", tiles=tiles, acc=acc, fused=True)
  return dq, dk, dscale


# ------------------------------------------------------------------------------------------ sigmoid
def _sig_fwd_kernel(a_ref, b_ref, scale_ref, bias_ref, pr_ref, pc_ref, out_ref, *, tiles):
  tile = _Tile(tiles, (), a_ref, b_ref, scale_ref, "rows", ())
  bias, row_ids = bias_ref[...][:, None], pr_ref[...][:, None]

  def body(j, total):
    _, s, valid = tile(j)
    val = tile_math.sigmoid_value_tile(s + bias, row_ids == tile.col_vector(pc_ref, j), valid)
    return total + jnp.sum(val, axis=1)

  out_ref[...] = jax.lax.fori_loop(0, tiles.grid[1], body, jnp.zeros((tiles.block_a,), jnp.float32))


def sigmoid_forward(a, b, scale, bias, positives, *, tiles):
  """Σ_j softplus(−z_ij (S_ij + bias_i)) per row, float32 (N_a,).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> out = sigmoid_forward(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids), tiles=t)
  >>> round(float(out[0]), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  call = _Call(tiles)
  call.add(a, "rows")
  call.add(b, "cols")
  call.add(scale, "rows")
  call.add(bias, "rows")
  call.add(positives[0], "rows")
  call.add(positives[1], "cols")
  out_shape, out_spec = _row_out(tiles)
  return call(functools.partial(_sig_fwd_kernel, tiles=tiles), "jaxcl_sigmoid_fwd", out_shape, out_spec)


def _sig_bwd_kernel(*refs, tiles, vec_on, with_acc, fused):
  a_ref, b_ref, scale_ref, bias_ref, g_ref, pr_ref, pc_ref = refs[:7]
  acc_in = refs[7] if with_acc else None
  outs = list(refs[7 + with_acc + fused:])  # fused: dk's starting buffer (aliased to dk_ref) skipped
  acc_ref = outs.pop(0)  # fused: dq
  dk_ref, dscale_ref = (outs.pop(0), outs.pop(0)) if fused else (None, None)
  sum_ref = outs.pop(0) if vec_on == "rows" else None
  tile = _Tile(tiles, (), a_ref, b_ref, scale_ref, vec_on, ())
  row_ids = pr_ref[...][:, None]
  if vec_on == "rows":
    bias, g = bias_ref[...][:, None], g_ref[...][:, None]

  def ds_of(j, s, valid):
    if vec_on == "rows":
      bias_j, g_j = bias, g
    else:
      bias_j, g_j = tile.col_vector(bias_ref, j), tile.col_vector(g_ref, j)
    return tile_math.sigmoid_grad_tile(s + bias_j, row_ids == tile.col_vector(pc_ref, j), valid, g_j)

  start = jnp.zeros(a_ref.shape, jnp.float32) if fused else _acc_start(acc_ref, acc_in)
  acc, total = _grad_loop(tile, ds_of, start, dk_ref=dk_ref, row_sums=sum_ref is not None)
  if fused:
    _store_scale_grads(tile, acc, acc_ref, dscale_ref)
  else:
    acc_ref[...] = acc
  if sum_ref is not None:
    sum_ref[...] = total


def _sig_grad_call(a, b, scale, bias, positives, g, *, vec_on, tiles, acc, fused):
  """The pallas_call of `sigmoid_backward` (fused False: Σ_j dS_ij b_j, and Σ_j dS_ij if along rows) or
  `sigmoid_backward_fused` (True: dq, dk, dscale, Σ_j dS_ij)."""
  call = _Call(tiles)
  call.add(a, "rows")
  call.add(b, "cols")
  for v in (scale, bias, g):
    call.add(v, vec_on)
  call.add(positives[0], "rows")
  call.add(positives[1], "cols")
  width = a.shape[1]
  if fused:
    aliases = call.accumulator(_dk_start(acc, tiles, width), "cols", 1)
    out_shape, out_specs = _fused_outs(tiles, a, with_sums=True)
  else:
    aliases = call.accumulator(acc)
    acc_shape, acc_spec = _row_out(tiles, width)
    out_shape, out_specs = [acc_shape], [acc_spec]
    if vec_on == "rows":
      sum_shape, sum_spec = _row_out(tiles)
      out_shape.append(sum_shape)
      out_specs.append(sum_spec)
  kernel = functools.partial(_sig_bwd_kernel, tiles=tiles, vec_on=vec_on, with_acc=acc is not None and not fused,
                             fused=fused)
  return call(kernel, "jaxcl_sigmoid_bwd_fused" if fused else "jaxcl_sigmoid_bwd", out_shape, out_specs,
              aliases)


def sigmoid_backward(a, b, scale, bias, positives, g, *, vec_on, tiles, acc=None):
  """(acc + Σ_j dS_ij b_j float32 (N_a, D), Σ_j dS_ij (N_a,) or None) for the sigmoid sum; `acc` as in
  `lse_backward` (updated in place).

  dS_ij = −g z_ij σ(−z_ij (S_ij + bias)); scale, bias and g lie along `vec_on` ("rows": the dq
  orientation, which also returns the row sums for the bias gradient; "cols": the dk orientation).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> acc, total = sigmoid_backward(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids), jnp.ones(16),
  ...                               vec_on="rows", tiles=t)
  >>> round(float(total[0]), 4)  # -σ(-1) + σ(0)
  0.2311
  """
  outs = _sig_grad_call(a, b, scale, bias, positives, g, vec_on=vec_on, tiles=tiles, acc=acc, fused=False)
  return outs[0], (outs[1] if vec_on == "rows" else None)


def sigmoid_backward_fused(a, b, scale, bias, positives, g, *, tiles, acc=None):
  """(dq (N_a, D) in a's dtype, acc + Σ_i scale_i dS_ij a_i float32 (N_b, D), dscale float32 (N_a,),
  Σ_j dS_ij float32 (N_a,)) from ONE recomputation of each tile (dS as in `sigmoid_backward`, scale,
  bias and g along rows): the two orientations of `sigmoid_backward` in one program per row block, dk
  added with float32 atomics and dq, dscale from the complete g by `engines.scale_grads`, as in
  `lse_backward_fused` (the last bits of dk vary from run to run).

  >>> import jax.numpy as jnp
  >>> from jaxcl.ops.tiles import Tiles
  >>> t = Tiles(16, 16, n_a=2, n_b=2, padded_a=16, padded_b=16, interpret=True, num_warps=None,
  ...           num_stages=2)
  >>> x = jnp.zeros((16, 16)).at[:2, :2].set(jnp.eye(2))  # two padded unit vectors
  >>> ids = jnp.arange(16)
  >>> dq, dk, dscale, total = sigmoid_backward_fused(x, x, jnp.ones(16), jnp.zeros(16), (ids, ids),
  ...                                                jnp.ones(16), tiles=t)
  >>> round(float(total[0]), 4), [round(float(v), 4) for v in dk[0, :2]]  # -σ(-1) + σ(0); (-σ(-1), σ(0))
  (0.2311, [-0.2689, 0.5])
  >>> round(float(dscale[0]), 4)  # <x_0, (-σ(-1), σ(0))>
  -0.2689
  """
  dq, dk, dscale, total = _sig_grad_call(a, b, scale, bias, positives, g, vec_on="rows", tiles=tiles,
                                         acc=acc, fused=True)
  return dq, dk, dscale, total
