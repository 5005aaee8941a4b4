"""The sharded engines: the similarity reductions over a batch split across devices.

These run inside `jax.shard_map` with the batch axis of q and k split over the mesh axis `axis_name`
(n devices, each holding Bq/n rows and Bk/n columns). Every device gets the reductions of ITS rows and
ITS columns against the whole global batch, with the same numerics as the single-device engines:

    row_i = log Σ_{j ∈ all devices} exp S_ij (masked)      col_j = log Σ_{i ∈ all devices} exp S_ij
    sig_i = Σ_{j ∈ all devices} softplus(−z_ij (S_ij + b))

Ids in the masks (`exclude`, `include`, `positives`) are GLOBAL: a device passes the ids of its own rows
and columns, and the engine brings the column ids along with the columns.

- `allgather`: gather the keys (and their ids) from every device, `lax.all_gather` (its transpose, in the
  backward pass, is a reduce-scatter), and reduce local rows × all columns with a local engine (dense while
  that block is small, blockwise above). Column statistics are partial on each device (its rows only):
  they are combined across devices with a max and a `psum_scatter` of exp(col − max). Per device memory
  O(B·D) for the gathered keys.
- `ring`: the key blocks travel around the ring of devices, one `lax.ppermute` per step inside a
  `lax.fori_loop` (one compiled step, whatever the device count): rows fold each passing block into an
  online log-sum-exp, and each block's column statistics follow the block and arrive home complete
  after the last hop ("Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
  Loss", Inf-CL, 2024; the chunked SigLIP loss of "Sigmoid Loss for Language Image Pre-Training" §3.3).
  The backward pass (a `jax.custom_vjp`) computes each block's gradients from the saved GLOBAL
  row/column results. With the fused kernels, whose dq and dk are separate passes anyway, it is two
  rings: the key blocks travel (with their ids and column results) while each device adds
  g_i = Σ_j dS_ij k_j of its rows into its accumulator (the dq kernel), then the query blocks travel
  (with their scales, ids and row results) while each device adds dk_j = Σ_i scale_i dS_ij q_i of its
  columns (the dk kernel). Each device holds one float32 (B/n, D) accumulator at a time, which the
  kernels update in place, and only the inputs' blocks travel. The blockwise tiles get dq and dk from
  one S tile, so theirs is one ring: each step adds to g locally and to the block's dk, which follows
  the block (float32) and lands home after the last hop. Double buffered: a step sends its block on,
  and the previous step's results one hop on, before it computes, so the transfers overlap the
  compute. Per device memory O(B/n · D), flat in the device count. With the kernels, a device's blocks
  are padded to the kernels' tiles once for the whole ring (and cut back once after it), the true
  counts going to the kernels, which mask the padding (`_Padding`).

Each device reduces its block with a single-device engine, `local_impl`: "auto" runs the fused Pallas
kernels (`jaxcl.ops.pallas`: `lse_block`, `lse_block_grad_q`, `lse_block_grad_k`, `sigmoid_block`,
`sigmoid_block_grad_q`, `sigmoid_block_grad_k`) where the program is compiled for a TPU or a CUDA GPU
and the blockwise tiles (`jaxcl.ops.blockwise`: `lse_block`, `lse_block_grads`, `sigmoid_block`,
`sigmoid_block_grads`) elsewhere; allgather uses the dense engine while its block is small.

Use them through `jaxcl.ops.logsumexp(..., axis_name=...)` / `sigmoid_sum(..., axis_name=...)` or through
any loss's `axis_name=` argument; `impl` is "allgather", "ring" or "auto" (see `resolve`).
"""

from __future__ import annotations

import functools
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcl.ops import _vma
from jaxcl.ops import blockwise
from jaxcl.ops import dense
from jaxcl.ops import engines
from jaxcl.ops import pallas
from jaxcl.ops import tiles as tile_math
from jaxcl.ops.engines import SHARDED_IMPLS
# `impl="auto"` under an axis name: allgather while one device's block of the global similarity matrix,
# (B/n) × B, is small enough for the dense engine AND the gathered keys (B, D) hold at most 2²⁴ values
# (64 MiB of float32, the size of their float32 gradient before the reduce-scatter), else ring.
ALLGATHER_MAX_ELEMENTS = 4096 * 4096
ALLGATHER_MAX_GATHERED = 1 << 24

_F32 = jnp.float32
AxisName = str | tuple[str, ...]


def resolve(impl: str, n_rows_local: int, n_cols_global: int, n_features: int = 0) -> str:
  """The sharded engine for `impl`. "auto": allgather while both

      n_rows_local · n_cols_global <= 4096²   (one device's block of S, dense)
      n_cols_global · n_features <= 2²⁴       (the gathered keys, 64 MiB as float32)

  hold, else ring (per-device memory O(B/n · D), flat in the device count).

  >>> resolve("auto", 1024, 8192, 256), resolve("auto", 1024, 8192, 4096)
  ('allgather', 'ring')
  """
  if impl in SHARDED_IMPLS:
    return impl
  if impl != "auto":
    raise ValueError(
        f"`impl` must be one of {('auto',) + SHARDED_IMPLS} when `axis_name` is given (the sharded "
        f"engines), got {impl!r}."
    )
  small = (n_rows_local * n_cols_global <= ALLGATHER_MAX_ELEMENTS
           and n_cols_global * n_features <= ALLGATHER_MAX_GATHERED)
  return "allgather" if small else "ring"


def axis_size(axis_name: AxisName) -> int:
  """The number of devices along `axis_name`, with a clear error outside `shard_map`."""
  try:
    return lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"`axis_name={axis_name!r}` is not a mesh axis bound here: call the loss inside "
        f"`jax.shard_map` over that axis, or on globally sharded arrays with a mesh (see the loss's "
        f"`mesh` argument)."
    ) from e


def global_ids(n_local: int, axis_name: AxisName) -> jax.Array:
  """Global positions of this device's n_local rows: axis_index · n_local + arange(n_local)."""
  return lax.axis_index(axis_name).astype(jnp.int32) * n_local + jnp.arange(n_local, dtype=jnp.int32)


def varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """x marked as device-varying along `axis_name` (a no-op if it already is). A replicated value (the
  temperature) enters the custom-VJP ring as a varying one so that its cotangent, a per-device partial
  sum, is summed over devices by the transpose of this cast."""
  return _vma.cast_varying(x, axis_name if isinstance(axis_name, tuple) else (axis_name,))


def _row_vector(scale, n_rows: int, axis_name: AxisName) -> jax.Array:
  return varying(jnp.broadcast_to(jnp.asarray(scale, _F32), (n_rows,)), axis_name)


def _gather(x, axis_name):
  return None if x is None else lax.all_gather(x, axis_name, tiled=True)


def _gather_cols(pair, axis_name):
  return None if pair is None else (pair[0], _gather(pair[1], axis_name))


def combine_logsumexp(partial: jax.Array, axis_name: AxisName, *, scatter: bool) -> jax.Array:
  """log Σ_devices exp(partial), elementwise; `scatter=True` returns only this device's slice of the
  (n · m,) result (a reduce-scatter instead of an all-reduce). -inf where every device has -inf."""
  shift = lax.pmax(lax.stop_gradient(partial), axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  e = jnp.exp(partial - shift)
  if not scatter:
    return tile_math.log_sum(lax.psum(e, axis_name), shift)
  m = partial.shape[0] // axis_size(axis_name)
  mine = lax.dynamic_slice_in_dim(shift, lax.axis_index(axis_name) * m, m)
  return tile_math.log_sum(lax.psum_scatter(e, axis_name, scatter_dimension=0, tiled=True), mine)


def _local_engine(n_rows: int, n_cols: int, local_impl: str, tile: int | None, reduction: str):
  """The single-device `reduction` ("logsumexp" / "sigmoid_sum") for one device's gathered block:
  dense while (n_rows · n_cols <= 4096²), else `local_impl` ("auto": the fused kernels where the
  program is compiled for a TPU or CUDA GPU, the blockwise tiles elsewhere)."""
  if n_rows * n_cols <= ALLGATHER_MAX_ELEMENTS and local_impl == "auto":
    return getattr(dense, reduction)
  blockwise_fn = functools.partial(getattr(blockwise, reduction), tile=tile)
  if local_impl == "blockwise":
    return blockwise_fn
  if engines.name_of(local_impl, "local_impl") == "pallas":  # "pallas" or its settings
    return engines.engine(local_impl, reduction)
  kernels = getattr(pallas, reduction)

  def run(*args, **kwargs):
    return engines.by_platform(lambda: kernels(*args, **kwargs), lambda: blockwise_fn(*args, **kwargs))

  return run


# ---------------------------------------------------------------------------------------- allgather
def _allgather_logsumexp(q, k, *, scale, rows, cols, exclude, include, axis_name, local_impl, tile):
  k_all = _gather(k, axis_name)
  engine = _local_engine(q.shape[0], k_all.shape[0], local_impl, tile, "logsumexp")
  row, col = engine(
      q, k_all, scale=scale, rows=rows, cols=cols,
      exclude=_gather_cols(exclude, axis_name), include=_gather_cols(include, axis_name),
  )
  if cols:
    col = combine_logsumexp(col, axis_name, scatter=True)
  return row, col


def _allgather_sigmoid_sum(q, k, *, scale, bias, positives, axis_name, local_impl, tile):
  k_all = _gather(k, axis_name)
  engine = _local_engine(q.shape[0], k_all.shape[0], local_impl, tile, "sigmoid_sum")
  return engine(q, k_all, scale=scale, bias=bias, positives=_gather_cols(positives, axis_name))


# --------------------------------------------------------------------------------------------- ring
def _ring_perm(n: int):
  """Device i sends to i + 1: at step s device d holds the block that started on device d − s."""
  return [(i, (i + 1) % n) for i in range(n)]


def _ring(axis_name, n, step, block, local, *, results=(), combine=None):
  """Runs `step(block, local) -> (result, local)` on each of the n blocks as they pass by.

  `block` (a pytree: the block and what travels with it) moves one device on per step; `result` is this
  device's contribution to the block's results (a pytree like `results`, the identity of `combine`),
  which follow the block one hop behind and are folded together with `combine` on the way: after the
  n-th step one last hop brings each block's complete results to the device the block started on.
  Returns (home results, local).

  Double buffering: each step first sends the block it holds to the next device, and the results of
  the previous step one hop on, and only then computes; neither transfer depends on this step's
  compute, so the compiler overlaps them with it (asynchronous collective-permutes around the step).
  """
  perm = _ring_perm(n)
  shift = lambda tree: jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)

  def visit(block, pending, local):
    arrived = shift(pending)  # the results so far of the block this device holds now
    result, local = step(block, local)
    return jax.tree.map(combine, arrived, result), local

  def body(_, carry):
    block, pending, local = carry
    following = shift(block)
    pending, local = visit(block, pending, local)
    return following, pending, local

  carry = jax.tree.map(lambda x: varying(x, axis_name), (block, results, local))  # loop carries must vary
  block, pending, local = lax.fori_loop(0, n - 1, body, carry)
  pending, local = visit(block, pending, local)
  return shift(pending), local


def _cols_of(pair):
  return None if pair is None else pair[1]


def _with_cols(pair, cols):
  return None if pair is None else (pair[0], cols)


def _rows_of(pair):
  return None if pair is None else pair[0]


def _ids(rows, cols):
  """An id pair of one block (None: that mask is not given)."""
  return None if rows is None else (rows, cols)


def _neg_inf(n):
  return jnp.full((n,), -jnp.inf, _F32)


def _grad_rings(axis_name, grad_q, grad_k, rows, cols, acc_q, acc_k):
  """The backward of a ring whose hop has separate dq and dk kernels (the fused kernels): two rings,
  each device keeping one float32 accumulator and sending only its inputs' blocks on:

      ring 1, the column blocks c (keys, their ids, column results) travel:  acc_q ← grad_q(rows, c, acc_q)
      ring 2, the row blocks r (queries, ids, scales, row results) travel:   acc_k ← grad_k(r, cols, acc_k)

  `rows` / `cols` are this device's own blocks; each `grad` adds its block's share into the accumulator
  (in place for the kernels). Returns (acc_q, acc_k) summed over all n blocks.
  """
  n = axis_size(axis_name)
  _, acc_q = _ring(axis_name, n, lambda c, acc: ((), grad_q(rows, c, acc)), cols, acc_q)
  _, acc_k = _ring(axis_name, n, lambda r, acc: ((), grad_k(r, cols, acc)), rows, acc_k)
  return acc_q, acc_k


def _grad_ring(axis_name, grads, rows, cols, acc_q, acc_k):
  """The backward of a ring whose hop computes dq and dk from one S tile (the blockwise tiles): one
  ring of the column blocks c, `grads(rows, c, acc_q) -> (dk of c, acc_q)`; each block's dk follows it
  one hop behind and lands home after the last hop (`_ring`'s results). Returns (acc_q, acc_k)."""
  dk, acc_q = _ring(axis_name, axis_size(axis_name), lambda c, acc: grads(rows, c, acc), cols, acc_q,
                    results=acc_k, combine=jnp.add)
  return acc_q, dk


def _is_kernel_hop(hop) -> bool:
  """Whether a ring hop runs `pallas`'s fused kernels ("pallas" or pallas settings)."""
  return engines.name_of(hop, "local_impl") == "pallas"


def _hop(cfg):
  """The block functions each ring step runs: `blockwise`'s tiles, or `pallas`'s fused kernels (with
  the settings `cfg.hop` carries, if any; their backward block functions are the separate dq and dk
  kernels: `_grad_rings`)."""
  hop, tile = cfg.hop, cfg.tile
  if hop == "pallas":
    return pallas
  if _is_kernel_hop(hop):  # pallas settings
    names = ("lse_block", "lse_block_grad_q", "lse_block_grad_k", "sigmoid_block", "sigmoid_block_grad_q",
             "sigmoid_block_grad_k")
    module, options = pallas, {"settings": hop, "valid": cfg.valid}
  else:
    names = ("lse_block", "lse_block_grads", "sigmoid_block", "sigmoid_block_grads")
    module, options = blockwise, {"tile": tile}
  return types.SimpleNamespace(**{name: functools.partial(getattr(module, name), **options) for name in names})


class _Padding(NamedTuple):
  """A device's blocks padded ONCE for a whole ring: q-like blocks (rows) to (rows, d), k-like blocks
  (cols) to (cols, d), their vectors and ids with zeros; `cut` brings results back to the true counts
  (n_rows, n_cols, n_d). The kernels mask the padding by the true counts (`pallas.padded_shape`,
  `valid=`); for the blockwise tiles nothing is padded."""
  n_rows: int
  n_cols: int
  n_d: int
  rows: int
  cols: int
  d: int

  def q(self, x):
    return tile_math.pad_to(x, (self.rows, self.d))

  def k(self, x):
    return tile_math.pad_to(x, (self.cols, self.d))

  def row(self, v):
    return tile_math.pad_to(v, (self.rows,))

  def col(self, v):
    return tile_math.pad_to(v, (self.cols,))

  def ids(self, pair):
    return None if pair is None else (self.row(pair[0]), self.col(pair[1]))

  def cut_rows(self, x):
    return x[: self.n_rows, : self.n_d] if x.ndim == 2 else x[: self.n_rows]

  def cut_cols(self, x):
    return x[: self.n_cols, : self.n_d] if x.ndim == 2 else x[: self.n_cols]


def _input_grads(pad, q, k, rows, acc_q, acc_k):
  """(dq, dk, dscale) of the inputs q, k from a ring's (padded) accumulators (`engines.scale_grads` on
  the padded q and scale, `rows[:2]`), cast to the inputs' dtypes before being cut back (the cut copies
  the narrow dtype)."""
  dq, dscale = engines.scale_grads(rows[0], rows[1], acc_q)
  return pad.cut_rows(dq.astype(q.dtype)), pad.cut_cols(acc_k.astype(k.dtype)), pad.cut_rows(dscale)


def _by_hop(cfg, q, k, ring):
  """`ring(cfg, padding)` with the per-step engine of `cfg.hop`; "auto": the fused kernels where the
  program is lowered for a TPU or a CUDA GPU, the blockwise tiles elsewhere (`engines.by_platform`).
  For the kernels, once per pallas variant (`pallas.per_variant`), with the `_Padding` of its tiles
  and `cfg.valid` the true counts, so no hop pads (and each accumulator is updated in place)."""
  if cfg.hop == "auto":
    return engines.by_platform(lambda: _by_hop(cfg._replace(hop="pallas"), q, k, ring),
                               lambda: _by_hop(cfg._replace(hop="blockwise"), q, k, ring))
  (n_q, d), n_k = q.shape, k.shape[0]
  if not _is_kernel_hop(cfg.hop):
    return ring(cfg, _Padding(n_q, n_k, d, n_q, n_k, d))

  def padded(settings):
    return ring(cfg._replace(hop=settings, valid=(n_q, n_k)),
                _Padding(n_q, n_k, d, *pallas.padded_shape(settings, n_q, n_k, d)))

  return pallas.per_variant(padded, None if cfg.hop == "pallas" else cfg.hop)


class _RingConfig(NamedTuple):
  axis_name: AxisName
  hop: str
  tile: int | None
  rows: bool = True
  cols: bool = False
  valid: tuple[int, int] | None = None  # the kernels' true counts (n_q, n_k) of padded blocks


def _ring_lse_forward(cfg, q, k, scale, exclude, include):
  def ring(cfg, pad):
    hop = _hop(cfg)
    q_p, scale_p, ex, inc = pad.q(q), pad.row(scale), pad.ids(exclude), pad.ids(include)

    def step(block, row):
      k_b, ex_c, in_c = block
      r, c = hop.lse_block(q_p, k_b, scale_p, _with_cols(ex, ex_c), _with_cols(inc, in_c),
                           rows=cfg.rows, cols=cfg.cols)
      return (c if cfg.cols else ()), (jnp.logaddexp(row, r) if cfg.rows else row)

    col0 = _neg_inf(pad.cols) if cfg.cols else ()
    row0 = _neg_inf(pad.rows if cfg.rows else 0)
    col, row = _ring(cfg.axis_name, axis_size(cfg.axis_name), step,
                     (pad.k(k), _cols_of(ex), _cols_of(inc)), row0, results=col0, combine=jnp.logaddexp)
    return (pad.cut_rows(row) if cfg.rows else None), (pad.cut_cols(col) if cfg.cols else None)

  return _by_hop(cfg, q, k, ring)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_lse(cfg, q, k, scale, exclude, include):
  return _ring_lse_forward(cfg, q, k, scale, exclude, include)


def _ring_lse_fwd(cfg, q, k, scale, exclude, include):
  row, col = _ring_lse_forward(cfg, q, k, scale, exclude, include)
  return (row, col), (q, k, scale, exclude, include, row, col)


def _ring_lse_bwd(cfg, res, g):
  q, k, scale, exclude, include, row, col = res
  g_row, g_col = g

  def args(rows, cols):
    """The arguments (q, k, scale, exclude, include, row, g_row, col, g_col) of a block function."""
    q, scale, ex_r, in_r, row, g_row = rows
    k, ex_c, in_c, col, g_col = cols
    return q, k, scale, _ids(ex_r, ex_c), _ids(in_r, in_c), row, g_row, col, g_col

  def ring(cfg, pad):
    hop = _hop(cfg)
    ex, inc = pad.ids(exclude), pad.ids(include)
    rows = (pad.q(q), pad.row(scale), _rows_of(ex), _rows_of(inc), pad.row(row), pad.row(g_row))
    cols = (pad.k(k), _cols_of(ex), _cols_of(inc), pad.col(col), pad.col(g_col))
    acc_q, acc_k = jnp.zeros((pad.rows, pad.d), _F32), jnp.zeros((pad.cols, pad.d), _F32)
    if _is_kernel_hop(cfg.hop):
      acc_q, acc_k = _grad_rings(cfg.axis_name, lambda r, c, acc: hop.lse_block_grad_q(*args(r, c), acc),
                                 lambda r, c, acc: hop.lse_block_grad_k(*args(r, c), acc), rows, cols,
                                 acc_q, acc_k)
    else:
      def grads(rows, cols, acc):
        g_s, dk_s = hop.lse_block_grads(*args(rows, cols))
        return dk_s, acc + g_s

      acc_q, acc_k = _grad_ring(cfg.axis_name, grads, rows, cols, acc_q, acc_k)
    return _input_grads(pad, q, k, rows, acc_q, acc_k)

  dq, dk, dscale = _by_hop(cfg, q, k, ring)
  none = lambda pair: None if pair is None else (None, None)
  return dq, dk, dscale, none(exclude), none(include)


_ring_lse.defvjp(_ring_lse_fwd, _ring_lse_bwd)


def _ring_sig_forward(cfg, q, k, scale, bias, positives):
  def ring(cfg, pad):
    hop = _hop(cfg)
    q_p, scale_p, (pos_r, pos_c) = pad.q(q), pad.row(scale), pad.ids(positives)

    def step(block, out):
      k_b, pos_b = block
      return (), out + hop.sigmoid_block(q_p, k_b, scale_p, bias, (pos_r, pos_b))

    _, out = _ring(cfg.axis_name, axis_size(cfg.axis_name), step, (pad.k(k), pos_c),
                   jnp.zeros((pad.rows,), _F32))
    return pad.cut_rows(out)

  return _by_hop(cfg, q, k, ring)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_sig(cfg, q, k, scale, bias, positives):
  return _ring_sig_forward(cfg, q, k, scale, bias, positives)


def _ring_sig_fwd(cfg, q, k, scale, bias, positives):
  return _ring_sig_forward(cfg, q, k, scale, bias, positives), (q, k, scale, bias, positives)


def _ring_sig_bwd(cfg, res, g):
  q, k, scale, bias, positives = res

  def args(rows, cols):
    """The arguments (q, k, scale, bias, positives, g) of a block function."""
    q, scale, g, pos_r = rows
    k, pos_c = cols
    return q, k, scale, bias, (pos_r, pos_c), g

  def ring(cfg, pad):
    hop = _hop(cfg)
    pos_r, pos_c = pad.ids(positives)
    rows, cols = (pad.q(q), pad.row(scale), pad.row(g), pos_r), (pad.k(k), pos_c)
    acc_q = (jnp.zeros((pad.rows, pad.d), _F32), jnp.zeros((), _F32))
    acc_k = jnp.zeros((pad.cols, pad.d), _F32)
    if _is_kernel_hop(cfg.hop):
      def grad_q(rows, cols, acc):
        g_q, dbias = hop.sigmoid_block_grad_q(*args(rows, cols), acc[0])
        return g_q, acc[1] + dbias

      (acc_q, dbias), acc_k = _grad_rings(
          cfg.axis_name, grad_q, lambda r, c, acc: hop.sigmoid_block_grad_k(*args(r, c), acc), rows, cols,
          acc_q, acc_k)
    else:
      def grads(rows, cols, acc):
        g_s, dk_s, dbias_s = hop.sigmoid_block_grads(*args(rows, cols))
        return dk_s, (acc[0] + g_s, acc[1] + dbias_s)

      (acc_q, dbias), acc_k = _grad_ring(cfg.axis_name, grads, rows, cols, acc_q, acc_k)
    return _input_grads(pad, q, k, rows, acc_q, acc_k), dbias

  (dq, dk, dscale), dbias = _by_hop(cfg, q, k, ring)
  return dq, dk, dscale, dbias, (None, None)


_ring_sig.defvjp(_ring_sig_fwd, _ring_sig_bwd)


# ------------------------------------------------------------------------------------- entry points
LOCAL_IMPLS = ("auto", "pallas", "blockwise")


def _check_local(local_impl):
  """`local_impl`: one of `LOCAL_IMPLS`, or `jaxcl.ops.pallas.Settings` (the pallas engine with them)."""
  if engines.name_of(local_impl, "local_impl") not in LOCAL_IMPLS:
    raise ValueError(f"`local_impl` must be one of {LOCAL_IMPLS} or a jaxcl.ops.pallas.Settings, got "
                     f"{local_impl!r}.")
  return local_impl


def logsumexp(q, k, *, scale, rows, cols, exclude, include, axis_name, impl="auto", tile=None,
              local_impl="auto"):
  r"""Row and/or column log-sum-exp of the masked S = scale · q kᵀ over the GLOBAL batch.

  Called inside `shard_map` with this device's rows `q` (Bq/n, D), columns `k` (Bk/n, D) and global
  ids; returns this device's rows (Bq/n,) and columns (Bk/n,) of the global reductions (see the module
  docstring for the engines). `local_impl` is the engine each device runs on its block (allgather: on
  the gathered keys, dense while small; ring: at every hop): "auto" (the fused kernels where the
  program is compiled for a TPU or a CUDA GPU, the blockwise tiles elsewhere), "pallas", a
  `jaxcl.ops.pallas.Settings` (the pallas engine with those settings) or "blockwise"; `tile` is the
  blockwise engine's.
  """
  _check_local(local_impl)
  n = axis_size(axis_name)
  impl = resolve(impl, q.shape[0], n * k.shape[0], k.shape[1])
  scale = _row_vector(scale, q.shape[0], axis_name)
  if impl == "allgather":
    return _allgather_logsumexp(
        q, k, scale=scale, rows=rows, cols=cols, exclude=exclude, include=include, axis_name=axis_name,
        local_impl=local_impl, tile=tile,
    )
  cfg = _RingConfig(axis_name, local_impl, tile, bool(rows), bool(cols))
  return _ring_lse(cfg, q, k, scale, exclude, include)


def sigmoid_sum(q, k, *, scale, bias, positives, axis_name, impl="auto", tile=None, local_impl="auto"):
  r"""Per local row Σ_j softplus(−z_ij (S_ij + bias)) over the GLOBAL columns; positives=None is the
  global diagonal (which needs as many local rows as local columns). `local_impl` and `tile` as in
  `logsumexp`."""
  _check_local(local_impl)
  n = axis_size(axis_name)
  impl = resolve(impl, q.shape[0], n * k.shape[0], k.shape[1])
  if positives is None:
    positives = (global_ids(q.shape[0], axis_name), global_ids(k.shape[0], axis_name))
  scale = _row_vector(scale, q.shape[0], axis_name)
  bias = varying(jnp.asarray(bias, _F32), axis_name)
  if impl == "allgather":
    return _allgather_sigmoid_sum(q, k, scale=scale, bias=bias, positives=positives, axis_name=axis_name,
                                  local_impl=local_impl, tile=tile)
  return _ring_sig(_RingConfig(axis_name, local_impl, tile), q, k, scale, bias, positives)


# ------------------------------------------------------------------------------ matched (segment) sum
def _matched_block(ids, ids_b, x_b):
  """Σ_j [ids_i == ids_b_j] x_b_j for one block, one column tile at a time (no (n, n_b) mask in memory
  beyond a tile)."""
  n_b = x_b.shape[0]
  tile = blockwise.tile_size(None, n_b, max(64, x_b.shape[1]))
  n_tiles = -(-n_b // tile)

  def body(t, acc):
    start, fresh = blockwise.tile_window(t, tile, n_b)
    ids_t = lax.dynamic_slice_in_dim(ids_b, start, tile)
    hit = ids[:, None] == ids_t[None, :]
    if fresh is not None:
      hit = hit & fresh[None, :]
    x_t = lax.dynamic_slice_in_dim(x_b, start, tile)
    return acc + jnp.dot(hit.astype(x_b.dtype), x_t, preferred_element_type=_F32)

  init = _vma.like(jnp.zeros((ids.shape[0], x_b.shape[1]), _F32), ids, ids_b, x_b)
  return lax.fori_loop(0, n_tiles, body, init)


def _ring_matched_forward(axis_name, ids, x):
  def step(block, acc):
    ids_b, x_b = block
    return (), acc + _matched_block(ids, ids_b, x_b)

  _, out = _ring(axis_name, axis_size(axis_name), step, (ids, x), jnp.zeros(x.shape, _F32))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_matched(axis_name, ids, x):
  return _ring_matched_forward(axis_name, ids, x)


def _ring_matched_fwd(axis_name, ids, x):
  return _ring_matched_forward(axis_name, ids, x), ids


def _ring_matched_bwd(axis_name, ids, g):
  # The map x -> M x with M_ij = [ids_i == ids_j] is linear and M is symmetric: its transpose is itself.
  return None, _ring_matched_forward(axis_name, ids, g.astype(_F32))


_ring_matched.defvjp(_ring_matched_fwd, _ring_matched_bwd)


def matched_sum(ids: jax.Array, x: jax.Array, *, axis_name: AxisName, impl: str = "auto") -> jax.Array:
  r"""out_i = Σ_{j ∈ global batch} [ids_i == ids_j] · x_j, float32 (n_local, F): a segment sum by id over
  all devices, for terms linear in S (SupCon's Σ_{p: y_p = y_a} <z_a, z_p> = <z_a, out_a>).

  allgather: the ids and x of every device are gathered; ring: they travel around the ring (memory
  O(n_local · F)); differentiable in x.
  """
  n = axis_size(axis_name)
  impl = resolve(impl, ids.shape[0], n * ids.shape[0], x.shape[1])
  ids = ids.astype(jnp.int32)
  if impl == "allgather":
    return _matched_block(ids, _gather(ids, axis_name), _gather(x, axis_name))
  return _ring_matched(axis_name, ids, x)


# ------------------------------------------------------------------------------------ top-1 retrieval
def top1_scores(q, k, *, positives, include, axis_name: AxisName, impl: str = "auto", tile=None):
  """`jaxcl.ops.dense.top1_scores` over the GLOBAL batch: this device's rows against every column and
  its columns against every row (ids global). allgather: the keys are gathered and the columns' partial
  maxima combined with a `pmax`; ring: each block's column maxima travel with it and come home."""
  n = axis_size(axis_name)
  impl = resolve(impl, q.shape[0], n * k.shape[0], k.shape[1])
  if impl == "allgather":
    k_all = _gather(k, axis_name)
    engine = dense if q.shape[0] * k_all.shape[0] <= ALLGATHER_MAX_ELEMENTS else blockwise
    row_pos, row_neg, col_pos, col_neg = engine.top1_scores(
        q, k_all, positives=_gather_cols(positives, axis_name), include=_gather_cols(include, axis_name))
    m = k.shape[0]
    mine = lambda col: lax.dynamic_slice_in_dim(lax.pmax(col, axis_name), lax.axis_index(axis_name) * m, m)
    return row_pos, row_neg, mine(col_pos), mine(col_neg)

  def step(block, rows):
    k_b, pos_c, in_c = block
    r_pos, r_neg, c_pos, c_neg = blockwise.top1_scores(
        q, k_b, positives=(positives[0], pos_c), include=_with_cols(include, in_c), tile=tile)
    return (c_pos, c_neg), (jnp.maximum(rows[0], r_pos), jnp.maximum(rows[1], r_neg))

  block = (lax.stop_gradient(k), positives[1], _cols_of(include))
  rows = (_neg_inf(q.shape[0]), _neg_inf(q.shape[0]))
  (col_pos, col_neg), (row_pos, row_neg) = _ring(
      axis_name, n, step, block, rows, results=(_neg_inf(k.shape[0]),) * 2, combine=jnp.maximum)
  return row_pos, row_neg, col_pos, col_neg
