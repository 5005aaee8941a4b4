"""The `pallas` engine: fused similarity kernels for TPU (Mosaic) and GPU (Triton), forward and backward.

With S_ij = scale_i · <q_i, k_j> and a validity mask V given by ids (`jaxcl.ops.masks`), the kernels
compute the reductions of `jaxcl.ops.reductions` without ever holding S in memory:

    row_i = log Σ_{j: V_ij} exp S_ij        col_j = log Σ_{i: V_ij} exp S_ij
    sig_i = Σ_j softplus(−z_ij (S_ij + b))

Forward: a grid of (row blocks × column blocks); each step computes one tile of S on the MXU / tensor
cores and folds it into online (max, sum-exp) accumulators, as in "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness" (Dao et al., 2022); only the log-sum-exp vectors
are saved. Backward: a dq kernel (grid over row blocks, loop over column blocks) and a dk kernel (the
same kernel with the roles of q and k swapped) recompute each tile, or one fused kernel recomputes it
once for both (`Settings.fused_backward`; on GPU dk is summed with float32 atomics), and use

    dS_ij = V_ij · ( g_row_i · exp(S_ij − row_i) + g_col_j · exp(S_ij − col_j) )    (softmax family)
    dS_ij = −g_i z_ij σ(−z_ij (S_ij + b))                                              (sigmoid family)

    dq_i = scale_i Σ_j dS_ij k_j,   dk_j = Σ_i scale_i dS_ij q_i,   dscale_i = <q_i, Σ_j dS_ij k_j>,
    db = Σ_ij dS_ij

so memory is O(B·D) and the gradient of the (per-row) scale costs no extra matmul. This is the tiling
of "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss" (Cheng et al.,
2024) on a single device; `docs/pallas.md` describes the kernels, the block-shape rules and the matmul
count.

How the kernels run (flavour, interpret mode, block sizes, Triton parameters) is a `Settings`, a frozen
(hashable) value that travels as a static argument: every function here takes `settings=` (None: the
default), and `impl=Settings(...)` anywhere an engine name is accepted (`jaxcl.ops.logsumexp`, the
losses, `jaxcl.ops.sharded`'s `local_impl=`) means "the pallas engine with these settings". There is
no process-wide state: two programs traced with different settings in one process are two different
programs. The default, `DEFAULT`, is read ONCE, when this module is imported, from the environment
variables JAXCL_PALLAS_FLAVOUR ("auto" | "tpu" | "gpu"), JAXCL_PALLAS_INTERPRET ("auto" | "0" | "1" |
"tpu"), JAXCL_PALLAS_BLOCK_ROWS and JAXCL_PALLAS_BLOCK_COLS (`Settings.from_env`). "auto" runs the
Mosaic kernels where the program is compiled for a TPU, the Triton kernels where it is compiled for a
CUDA GPU and the Mosaic kernels in Pallas interpret mode elsewhere (CPU); the platform is the lowering
platform (`jax.lax.platform_dependent`), not this process's default backend, so a program compiled here
for a TPU (`jaxcl.targets`) gets the Mosaic kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxcl.ops import engines
from jaxcl.ops.tiles import Tiles, pad_to

FLAVOURS = ("auto", "tpu", "gpu")
INTERPRET_MODES = ("auto", True, False, "tpu")


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings:
  """How the `pallas` engine runs: a frozen, hashable value passed as `settings=` to the functions of
  this module, or as `impl=` wherever an engine name is accepted (the pallas engine with these settings).

  >>> Settings(flavour="tpu", block_rows=256) == Settings(flavour="tpu", block_rows=256)
  True

  Attributes:
    flavour: "auto" (by the platform the program is compiled for: Mosaic on TPU, Triton on CUDA GPUs,
      Mosaic in interpret mode elsewhere), "tpu" (Mosaic kernels) or "gpu" (Triton kernels). With
      "auto" both flavours are traced, so block sizes must suit both (or name the flavour).
    interpret: "auto" (interpret when the program is compiled for a platform that is not the flavour's
      hardware), True (Pallas interpret mode), False (compile for the hardware) or "tpu" (TPU interpret
      mode, `pltpu.InterpretParams()`: checks TPU semantics on CPU, about 100x slower).
    block_rows, block_cols: tile sizes along q and k (None: per-flavour defaults). TPU: multiples of 128
      or at least the batch; GPU: powers of two >= 16.
    num_warps, num_stages: Triton compiler parameters (None: 4 warps, 8 for tiles >= 128×128).
    max_fused_cols: TPU only; row and column log-sum-exp share one pass over S while the padded column
      count is at most this (the column accumulators live in VMEM: 64 bytes per column), else the column
      pass is a second call with q and k swapped.
    fused_backward: the backward (log-sum-exp and sigmoid) recomputes each tile of S once for dq and dk
      (one kernel, 3 matmuls per tile) instead of in a dq and a dk kernel (4 matmuls). TPU: both grid
      axes of the fused kernel run sequentially, where the dq and dk kernels split their row axis across
      the two TensorCores of a megacore chip (v4, v5p). GPU: one program per row block adds its dk
      contributions into a float32 (Bk, D) buffer with atomics, whose order varies, so dk may differ
      in its last bits from run to run; False (the two kernels) is deterministic. Both flavours write
      dq (in q's dtype) and dscale from each row block's complete float32 sum in the kernel's epilogue
      (`engines.scale_grads`): no float32 (Bq, D) sum is live beside the float32 dk.
    fused_backward_vmem: TPU only; about the VMEM bytes one fused backward call may take (default
      14 MiB: v4 has 16): its blocks (the column block halved while they leave no room for 1024 rows)
      and the float32 (rows, D) sum of its rows (`pallas_tpu.fused_layout`); the rows are split into as
      many calls as that needs (one kernel in a loop), each reading all of k and dk once more.
  """

  flavour: str = "auto"
  interpret: bool | str = "auto"
  block_rows: int | None = None
  block_cols: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  max_fused_cols: int = 32768
  fused_backward: bool = True
  fused_backward_vmem: int = 14 << 20

  def __post_init__(self):
    for field in dataclasses.fields(self):
      _check_field(field.name, field.name, getattr(self, field.name))

  @classmethod
  def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
    """The settings the JAXCL_PALLAS_* variables of `env` (None: `os.environ`) give, defaults elsewhere.

    >>> Settings.from_env({"JAXCL_PALLAS_FLAVOUR": "tpu", "JAXCL_PALLAS_BLOCK_ROWS": "256"}).block_rows
    256
    """
    env = os.environ if env is None else env
    interpret = env.get("JAXCL_PALLAS_INTERPRET", "auto").strip().lower()
    interpret = {"1": True, "true": True, "0": False, "false": False}.get(interpret, interpret)
    blocks = {}
    for name in ("block_rows", "block_cols"):
      value = env.get(f"JAXCL_PALLAS_{name.upper()}")
      if value:
        try:
          blocks[name] = int(value)
        except ValueError:
          raise ValueError(f"JAXCL_PALLAS_{name.upper()} must be an integer, got {value!r}.") from None
    return cls(flavour=env.get("JAXCL_PALLAS_FLAVOUR", "auto").strip().lower(), interpret=interpret,
               **blocks)

  def replace(self, *, where: str = "", **changes: Any) -> "Settings":
    """These settings with `changes`; a bad field or value is an error naming `where` + the field
    (`where="config.loss.pallas."` names a config key).

    >>> DEFAULT.replace(block_rows=256).block_rows
    256
    >>> DEFAULT.replace(where="config.loss.pallas.", block_rows=0)
    Traceback (most recent call last):
    ...
    ValueError: `config.loss.pallas.block_rows` must be a positive integer or None, got 0.
    """
    names = tuple(f.name for f in dataclasses.fields(self))
    for name, value in changes.items():
      if name not in names:
        raise ValueError(f"Unknown pallas setting `{where}{name}`; expected one of {names}.")
      _check_field(where + name, name, value)
    return dataclasses.replace(self, **changes)


def _check_field(label: str, name: str, value: Any) -> None:
  """Raises if `value` is not a legal value of the `Settings` field `name`; the error names `label`."""
  if name == "flavour" and value not in FLAVOURS:
    raise ValueError(f"`{label}` must be one of {FLAVOURS}, got {value!r}.")
  if name == "interpret" and not (value is True or value is False or value in ("auto", "tpu")):
    raise ValueError(f"`{label}` must be one of {INTERPRET_MODES}, got {value!r}.")
  if name in ("block_rows", "block_cols", "num_warps") and value is not None and (
      not isinstance(value, int) or isinstance(value, bool) or value <= 0):
    raise ValueError(f"`{label}` must be a positive integer or None, got {value!r}.")
  if name == "fused_backward" and not isinstance(value, bool):
    raise ValueError(f"`{label}` must be True or False, got {value!r}.")
  if name == "fused_backward_vmem" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
    raise ValueError(f"`{label}` must be a positive integer (bytes), got {value!r}.")
  if name in ("num_stages", "max_fused_cols") and (
      not isinstance(value, int) or isinstance(value, bool) or value < 0):
    raise ValueError(f"`{label}` must be a non-negative integer, got {value!r}.")


# The settings of `settings=None`, read from the environment once, when this module is imported.
DEFAULT = Settings.from_env()


def checked(settings: Settings | None, name: str = "settings") -> Settings:
  """`settings`, or `DEFAULT` for None; anything else is an error naming `name`.

  >>> checked(None) is DEFAULT
  True
  """
  if settings is None:
    return DEFAULT
  if not isinstance(settings, Settings):
    raise TypeError(f"`{name}` must be a jaxcl.ops.pallas.Settings or None, got {settings!r}.")
  return settings


# ------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class _Plan:
  flavour: str
  tiles: Tiles
  padded_d: int
  kinds: tuple[str, ...] = ()
  rows: bool = True
  cols: bool = False
  fuse_cols: bool = False
  fused: tuple[tuple[str, Any], ...] | None = None  # keywords of the fused backward; None: dq + dk kernels


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _tpu_block(name: str, n: int, requested: int | None, default: int) -> int:
  """A Mosaic block along a batch axis: the whole (16-padded) axis, or a multiple of 128.

  Either role must be legal: as rows (sublane dim, multiple of 8, 16 for bf16) and as columns of the
  (1, N) id/scale vectors (lane dim, multiple of 128 unless the block is the whole array).
  """
  whole = _round_up(n, 16)
  block = default if requested is None else requested
  if block >= whole:
    return whole
  if block % 128:
    raise ValueError(
        f"`{name}` must be a multiple of 128 for the TPU kernels (or at least the batch size {n}), "
        f"got {block}."
    )
  return block


def _gpu_block(name: str, n: int, requested: int | None, default: int) -> int:
  """A Triton block: a power of two >= 16 (tensor-core dots), at most the next power of two of n."""
  block = default if requested is None else requested
  if block < 16 or block & (block - 1):
    raise ValueError(f"`{name}` must be a power of two >= 16 for the GPU kernels, got {block}.")
  return min(block, max(16, _next_pow2(n)))


# `jax.lax.platform_dependent` platform names of each flavour's hardware.
FLAVOUR_PLATFORMS = {"tpu": ("tpu",), "gpu": ("cuda",)}


def _variants(s: Settings) -> tuple[tuple[tuple[str, ...] | None, str, Any], ...]:
  """The kernels to run per platform: ((platforms, flavour, interpret), ...), platforms None = any other.

  The platform is the one the program is lowered (compiled) for, chosen by `jax.lax.platform_dependent`
  (all variants are traced, one is compiled). flavour "auto": the Mosaic kernels on TPU, the Triton
  kernels on CUDA GPUs, the Mosaic kernels elsewhere; interpret "auto": compiled on the flavour's
  hardware, interpret mode elsewhere. interpret="tpu" (TPU interpret mode) means the Mosaic kernels.

  >>> [(p, f, i) for p, f, i in _variants(Settings(flavour="gpu"))]
  [(('cuda',), 'gpu', False), (None, 'gpu', True)]
  """
  if s.interpret == "tpu":
    if s.flavour == "gpu":
      raise ValueError(
          f"`interpret='tpu'` emulates TPU kernels; it needs `flavour='tpu'`, got {s.flavour!r}."
      )
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    return ((None, "tpu", pltpu.InterpretParams()),)
  on = ("tpu", "gpu") if s.flavour == "auto" else (s.flavour,)
  elsewhere = "tpu" if s.flavour == "auto" else s.flavour
  if s.interpret == "auto":
    return tuple((FLAVOUR_PLATFORMS[f], f, False) for f in on) + ((None, elsewhere, True),)
  if s.flavour == "auto":
    return tuple((FLAVOUR_PLATFORMS[f], f, s.interpret) for f in on) + ((None, elsewhere, s.interpret),)
  return ((None, s.flavour, s.interpret),)


def _per_platform(run, settings: Settings):
  """`run(flavour, interpret)` for the variant of `settings` of the platform the program is lowered for."""
  variants = _variants(settings)
  if len(variants) == 1:
    return run(*variants[0][1:])
  branches = {}
  default = None
  for platforms, flavour, interpret in variants:
    branch = functools.partial(run, flavour, interpret)
    if platforms is None:
      default = branch
    else:
      branches.update({p: branch for p in platforms})
  return jax.lax.platform_dependent(default=default, **branches)


def _make_plan(s: Settings, flavour: str, interpret: Any, n_q: int, n_k: int, d: int, padded=None,
               **flags) -> _Plan:
  """The plan of an (n_q, d) × (n_k, d) call; `padded` (rows, cols): the padded lengths, multiples of
  the blocks at least the counts (None: each count rounded up to its block)."""
  if flavour == "tpu":
    bq = _tpu_block("block_rows", n_q, s.block_rows, 256)
    bk = _tpu_block("block_cols", n_k, s.block_cols, 512)
    padded_d = _round_up(d, 128)
  else:
    padded_d = max(16, _next_pow2(d))
    default = 64 if padded_d <= 128 else 32 if padded_d <= 512 else 16
    bq = _gpu_block("block_rows", n_q, s.block_rows, default)
    bk = _gpu_block("block_cols", n_k, s.block_cols, default)
  padded_a, padded_b = (_round_up(n_q, bq), _round_up(n_k, bk)) if padded is None else padded
  tiles = Tiles(
      block_a=bq, block_b=bk, n_a=n_q, n_b=n_k, padded_a=padded_a,
      padded_b=padded_b, interpret=interpret, num_warps=s.num_warps,
      num_stages=s.num_stages,
  )
  fuse_cols = (
      flavour == "tpu" and flags.get("rows", False) and flags.get("cols", False)
      and tiles.padded_b <= s.max_fused_cols
  )
  fused = None
  if s.fused_backward:  # TPU: the VMEM one call plans for (`pallas_tpu.fused_layout`)
    fused = (("vmem", s.fused_backward_vmem),) if flavour == "tpu" else ()
  return _Plan(flavour=flavour, tiles=tiles, padded_d=padded_d, fuse_cols=fuse_cols, fused=fused, **flags)


def _kernels(flavour: str):
  if flavour == "tpu":
    from jaxcl.ops import pallas_tpu  # pylint: disable=g-import-not-at-top

    return pallas_tpu
  from jaxcl.ops import pallas_gpu  # pylint: disable=g-import-not-at-top

  return pallas_gpu


# ---------------------------------------------------------------------------------- log-sum-exp
def _lse_forward(plan: _Plan, q, k, scale, ids):
  kernels = _kernels(plan.flavour)
  tiles = plan.tiles
  row = col = None
  if plan.rows:
    row, col = kernels.lse_forward(
        q, k, scale, ids, kinds=plan.kinds, scale_on="rows", with_cols=plan.fuse_cols, tiles=tiles
    )
  if plan.cols and col is None:
    col, _ = kernels.lse_forward(
        k, q, scale, _swap(ids), kinds=plan.kinds, scale_on="cols", with_cols=False,
        tiles=tiles.swapped(),
    )
  return row, col


def _swap(ids):
  return tuple((c, r) for r, c in ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lse(plan: _Plan, q, k, scale, ids):
  row, col = _lse_forward(plan, q, k, scale, ids)
  return tuple(x for x in (row, col) if x is not None)


def _lse_fwd(plan, q, k, scale, ids):
  row, col = _lse_forward(plan, q, k, scale, ids)
  return tuple(x for x in (row, col) if x is not None), (q, k, scale, ids, row, col)


def _lse_grad_q(plan, q, k, scale, ids, row, g_row, col, g_col, acc=None):
  """acc + g, float32 (padded), g_i = Σ_j dS_ij k_j by the dq kernel, from the final (padded) row /
  column log-sum-exp (None where not wanted); dq and dscale follow by `engines.scale_grads`. `acc`
  (None: zeros) is updated in place."""
  return _kernels(plan.flavour).lse_backward(
      q, k, scale, ids, row, g_row, col, g_col, kinds=plan.kinds, scale_on="rows", tiles=plan.tiles,
      acc=acc,
  )


def _lse_grad_k(plan, q, k, scale, ids, row, g_row, col, g_col, acc=None):
  """acc + dk, float32 (padded), dk_j = Σ_i scale_i dS_ij q_i by the dk kernel (the dq kernel with q
  and k swapped); arguments as in `_lse_grad_q`."""
  return _kernels(plan.flavour).lse_backward(
      k, q, scale, _swap(ids), col, g_col, row, g_row, kinds=plan.kinds, scale_on="cols",
      tiles=plan.tiles.swapped(), acc=acc,
  )


def _lse_grads(plan, q, k, scale, ids, row, g_row, col, g_col):
  """(dq in q's dtype, dk float32, dscale float32) of Σ g_row·row + Σ g_col·col: by the fused backward
  (one recomputation of S for both, `Settings.fused_backward`), whose epilogue applies
  `engines.scale_grads` to each row block's g, or by the dq and dk kernels (`_lse_grad_q`, `_lse_grad_k`)
  and `engines.scale_grads` on the float32 g."""
  if plan.fused is not None:
    return _kernels(plan.flavour).lse_backward_fused(
        q, k, scale, ids, row, g_row, col, g_col, kinds=plan.kinds, tiles=plan.tiles, **dict(plan.fused),
    )
  args = (plan, q, k, scale, ids, row, g_row, col, g_col)
  dq, dscale = engines.scale_grads(q, scale, _lse_grad_q(*args))
  return dq.astype(q.dtype), _lse_grad_k(*args), dscale


def _lse_bwd(plan, res, g):
  q, k, scale, ids, row, col = res
  g = list(g)
  g_row = g.pop(0) if plan.rows else None
  g_col = g.pop(0) if plan.cols else None
  row = row if plan.rows else None
  col = col if plan.cols else None
  dq, dk, dscale = _lse_grads(plan, q, k, scale, ids, row, g_row, col, g_col)
  return dq, dk.astype(k.dtype), dscale, jax.tree.map(lambda _: None, ids)


_lse.defvjp(_lse_fwd, _lse_bwd)


def _prepare(q, k, scale, plan: _Plan):
  dtype = jnp.result_type(q.dtype, k.dtype)
  t = plan.tiles
  qp = pad_to(q.astype(dtype), (t.padded_a, plan.padded_d))
  kp = pad_to(k.astype(dtype), (t.padded_b, plan.padded_d))
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (q.shape[0],))
  return qp, kp, pad_to(scale, (t.padded_a,))


def _id_kinds(exclude, include):
  """("exclude" / "include" for each mask given, their id pairs)."""
  given = [(kind, pair) for kind, pair in (("exclude", exclude), ("include", include)) if pair is not None]
  return tuple(kind for kind, _ in given), [pair for _, pair in given]


def _valid_plan(settings, flavour, interpret, q, k, valid, **flags) -> _Plan:
  """The plan of a (Bq, D) × (Bk, D) block; `valid` (n_q, n_k): q and k are already padded to the
  tiles (`padded_shape`) and only their first n_q / n_k rows are valid (the kernels mask the rest)."""
  if valid is None:
    return _make_plan(settings, flavour, interpret, q.shape[0], k.shape[0], q.shape[1], **flags)
  rows, cols, d = _padded_shape(settings, flavour, interpret, *valid, q.shape[1])
  if (q.shape, k.shape) != ((rows, d), (cols, d)):
    raise ValueError(f"With `valid`={valid}, q and k must be padded to the tiles, shapes {(rows, d)} and "
                     f"{(cols, d)}; got {q.shape} and {k.shape}.")
  return _make_plan(settings, flavour, interpret, *valid, d, padded=(rows, cols), **flags)


def _padded_shape(settings, flavour, interpret, n_q: int, n_k: int, d: int) -> tuple[int, int, int]:
  """(rows, cols, D) padded to the tiles; rows and cols both the larger where that is a multiple of both
  blocks (then row- and column-shaped buffers, e.g. the ring's two accumulators, can share memory)."""
  t = (plan := _make_plan(settings, flavour, interpret, n_q, n_k, d)).tiles
  common = max(t.padded_a, t.padded_b)
  if common % t.block_a == 0 and common % t.block_b == 0:
    return common, common, plan.padded_d
  return t.padded_a, t.padded_b, plan.padded_d


def padded_shape(settings: Settings | None, n_q: int, n_k: int, d: int) -> tuple[int, int, int]:
  """(rows, cols, features) the kernels pad an (n_q, d) × (n_k, d) block to, for settings of ONE
  flavour and interpret mode (as `per_variant` gives): a caller that pads its blocks to this shape once
  passes `valid=(n_q, n_k)` to the block functions, which then neither pad nor cut.

  >>> padded_shape(Settings(flavour="tpu", interpret=True), 16000, 16000, 256)
  (16384, 16384, 256)
  """
  variants = _variants(checked(settings))
  if len(variants) != 1:
    raise ValueError(f"`settings` must name one flavour and interpret mode (see `per_variant`), got "
                     f"{settings!r}.")
  (_, flavour, interpret), = variants
  return _padded_shape(checked(settings), flavour, interpret, n_q, n_k, d)


def per_variant(run, settings: Settings | None):
  """`run(one)` for the variant of `settings` of the platform the program is lowered for, `one` being
  `settings` narrowed to that variant's flavour and interpret mode (for `padded_shape`); `run`'s
  results must have the same shapes for every variant."""
  s = checked(settings)

  def narrowed(flavour, interpret):
    mode = interpret if isinstance(interpret, bool) else "tpu"
    return run(s.replace(flavour=flavour, interpret=mode))

  return _per_platform(narrowed, s)


def _lse_operands(settings, flavour, interpret, q, k, scale, exclude, include, *, rows: bool, cols: bool,
                  valid=None):
  """(plan, q, k, scale, ids) of a log-sum-exp kernel call: the inputs padded to the plan's tiles and
  the id pairs of the masks given (`valid`: see `_valid_plan`)."""
  kinds, pairs = _id_kinds(exclude, include)
  plan = _valid_plan(settings, flavour, interpret, q, k, valid, kinds=kinds, rows=rows, cols=cols)
  return (plan, *_prepare(q, k, scale, plan), tuple(_pad_ids(p, plan) for p in pairs))


def _sig_operands(settings, flavour, interpret, q, k, scale, bias, positives, valid=None):
  """(plan, q, k, scale, bias (padded rows,), positives) of a sigmoid kernel call, padded to the tiles;
  `bias` a scalar or one value per row (`valid`: see `_valid_plan`)."""
  plan = _valid_plan(settings, flavour, interpret, q, k, valid)
  bias = pad_to(jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (q.shape[0],)), (plan.tiles.padded_a,))
  return (plan, *_prepare(q, k, scale, plan), bias, _pad_ids(positives, plan))


def _pad_ids(pair, plan: _Plan):
  r, c = pair
  t = plan.tiles
  return pad_to(r.astype(jnp.int32), (t.padded_a,)), pad_to(c.astype(jnp.int32), (t.padded_b,))


def logsumexp(q, k, *, scale, rows, cols, exclude, include, settings: Settings | None = None):
  """Row and/or column log-sum-exp of the masked S = scale · q kᵀ by fused Pallas kernels.

      row_i = log Σ_{j: V_ij} exp S_ij,   col_j = log Σ_{i: V_ij} exp S_ij,   −inf if nothing is valid

  The engine behind `impl="pallas"` (see `jaxcl.ops.logsumexp`): float32 results, float32 accumulation
  for bf16 inputs, differentiable in q, k and scale (scalar or (Bq,)) by backward kernels. The online
  (max, sum-exp) recurrence is the one of "FlashAttention: Fast and Memory-Efficient Exact Attention
  with IO-Awareness" (Dao et al., 2022). `settings`: how the kernels run (`Settings`; None: `DEFAULT`),
  as in every function of this module.

  >>> import jax.numpy as jnp
  >>> row, col = logsumexp(jnp.eye(2), jnp.eye(2), scale=jnp.ones(()), rows=True, cols=True,
  ...                      exclude=None, include=None)
  >>> [round(float(v), 4) for v in col]  # log(e + 1)
  [1.3133, 1.3133]
  """
  s = checked(settings)
  def run(flavour, interpret):
    operands = _lse_operands(s, flavour, interpret, q, k, scale, exclude, include, rows=bool(rows),
                             cols=bool(cols))
    outs = list(_lse(*operands))
    row = outs.pop(0)[: q.shape[0]] if rows else None
    col = outs.pop(0)[: k.shape[0]] if cols else None
    return row, col

  return _per_platform(run, s)


# ------------------------------------------------------------------------------------------ sigmoid
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sig(plan: _Plan, q, k, scale, bias, positives):
  return _kernels(plan.flavour).sigmoid_forward(q, k, scale, bias, positives, tiles=plan.tiles)


def _sig_fwd(plan, q, k, scale, bias, positives):
  out = _kernels(plan.flavour).sigmoid_forward(q, k, scale, bias, positives, tiles=plan.tiles)
  return out, (q, k, scale, bias, positives)


def _sig_grad_q(plan, q, k, scale, bias, positives, g, acc=None):
  """(acc + g, dbias (Bq,)), float32, of Σ_i g_i sig_i by the dq kernel (g as in `_lse_grad_q`,
  dbias_i = Σ_j dS_ij); `acc` (None: zeros) is updated in place."""
  return _kernels(plan.flavour).sigmoid_backward(
      q, k, scale, bias, positives, g, vec_on="rows", tiles=plan.tiles, acc=acc
  )


def _sig_grad_k(plan, q, k, scale, bias, positives, g, acc=None):
  """acc + dk, float32, of Σ_i g_i sig_i by the dk kernel (the dq kernel with q and k swapped)."""
  dk, _ = _kernels(plan.flavour).sigmoid_backward(
      k, q, scale, bias, _swap((positives,))[0], g, vec_on="cols", tiles=plan.tiles.swapped(), acc=acc
  )
  return dk


def _sig_grads(plan, q, k, scale, bias, positives, g):
  """(dq in q's dtype, dk float32, dscale float32, dbias float32 (Bq,)) of Σ_i g_i sig_i: by the fused
  backward (`Settings.fused_backward`, `engines.scale_grads` in its epilogue) or by the dq and dk
  kernels (then `engines.scale_grads` here), as `_lse_grads`."""
  if plan.fused is not None:
    return _kernels(plan.flavour).sigmoid_backward_fused(
        q, k, scale, bias, positives, g, tiles=plan.tiles, **dict(plan.fused))
  g_q, dbias = _sig_grad_q(plan, q, k, scale, bias, positives, g)
  dq, dscale = engines.scale_grads(q, scale, g_q)
  return dq.astype(q.dtype), _sig_grad_k(plan, q, k, scale, bias, positives, g), dscale, dbias


def _sig_bwd(plan, res, g):
  q, k, scale, bias, positives = res
  dq, dk, dscale, dbias = _sig_grads(plan, q, k, scale, bias, positives, g)
  return dq, dk.astype(k.dtype), dscale, dbias, (None, None)


_sig.defvjp(_sig_fwd, _sig_bwd)


def sigmoid_sum(q, k, *, scale, bias, positives, settings: Settings | None = None):
  """Per row Σ_j softplus(−z_ij (S_ij + b)) by fused Pallas kernels, float32 (Bq,).

  The engine behind `impl="pallas"` (see `jaxcl.ops.sigmoid_sum`) for "Sigmoid Loss for Language Image
  Pre-Training" (Zhai et al., 2023): z_ij = +1 where the `positives` ids agree (None: the diagonal),
  −1 elsewhere. Differentiable in q, k, scale and bias.

  >>> import jax.numpy as jnp
  >>> out = sigmoid_sum(jnp.eye(2), jnp.eye(2), scale=jnp.ones(()), bias=jnp.zeros(()), positives=None)
  >>> round(float(out[0]), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  if positives is None:
    positives = (jnp.arange(q.shape[0], dtype=jnp.int32), jnp.arange(k.shape[0], dtype=jnp.int32))
  s = checked(settings)
  def run(flavour, interpret):
    return _sig(*_sig_operands(s, flavour, interpret, q, k, scale, bias, positives))[: q.shape[0]]

  return _per_platform(run, s)


engines.register_engine("pallas", logsumexp=logsumexp, sigmoid_sum=sigmoid_sum, settings=Settings)


# ------------------------------------------------------------------------- one block, no custom VJP
# The sharded ring (`jaxcl.ops.sharded`) reduces one block of S per hop and differentiates by its own
# backward rings: it needs a block's partial results forward, and a block's gradients from the GLOBAL
# results backward. These are the kernels above with that split; backward, the dq and the dk kernel
# are separate functions that add into an accumulator in place (the ring runs one ring of key blocks
# for g and one of query blocks for dk, each device holding one float32 accumulator). Every output is
# float32 and unpadded. `valid=(n_q, n_k)`: q, k, their scales / ids / vectors and the accumulator come
# already padded to the tiles (`padded_shape`; padded ids and vectors 0), of which the first n_q rows
# and n_k columns are valid; the outputs then stay padded, and the accumulator is always updated in
# place (the ring pads once for all its hops).
def _vector(x, n: int):
  return None if x is None else pad_to(x.astype(jnp.float32), (n,))


def _lse_vectors(plan: _Plan, row, g_row, col, g_col):
  """The final row / column log-sum-exps and their cotangents, float32, padded to the tiles."""
  na, nb = plan.tiles.padded_a, plan.tiles.padded_b
  return _vector(row, na), _vector(g_row, na), _vector(col, nb), _vector(g_col, nb)


def _kernel_acc(acc, padded_rows: int, plan: _Plan):
  """The accumulator a kernel adds into in place: `acc` itself (float32) where it has the tiles' shape,
  (padded_rows, padded D); else None, and `_added` adds the kernel's fresh output to it (padding acc,
  then cutting the result back, would copy it twice per call: more memory than a fresh output)."""
  return acc.astype(jnp.float32) if acc.shape == (padded_rows, plan.padded_d) else None


def _added(out, acc, kernel_acc):
  """acc + a kernel's contribution: `out` itself where the kernel added into `kernel_acc` in place."""
  return out if kernel_acc is not None else acc + out[: acc.shape[0], : acc.shape[1]]


def lse_block(q, k, scale, exclude, include, *, rows: bool, cols: bool, settings: Settings | None = None,
              valid=None):
  """(row (Bq,) or None, col (Bk,) or None): one block's log-sum-exp by the forward kernels.

  >>> import jax.numpy as jnp
  >>> row, col = lse_block(jnp.eye(2), jnp.eye(2), jnp.ones(2), None, None, rows=True, cols=True)
  >>> [round(float(v), 4) for v in row]  # log(e + 1)
  [1.3133, 1.3133]
  """
  s = checked(settings)
  def run(flavour, interpret):
    row, col = _lse_forward(*_lse_operands(s, flavour, interpret, q, k, scale, exclude, include, rows=rows,
                                           cols=cols, valid=valid))
    return (row[: q.shape[0]] if rows else None), (col[: k.shape[0]] if cols else None)

  return _per_platform(run, s)


def _lse_block_grad(kernel_grad, side: str, q, k, scale, exclude, include, row, g_row, col, g_col, acc,
                    settings, valid):
  """acc + `kernel_grad` (`_lse_grad_q` or `_lse_grad_k`) of one block, `acc` along `side` ("rows":
  (Bq, D), "cols": (Bk, D)): the body of `lse_block_grad_q` / `_k`."""
  s = checked(settings)
  def run(flavour, interpret):
    plan, *operands = _lse_operands(s, flavour, interpret, q, k, scale, exclude, include,
                                    rows=row is not None, cols=col is not None, valid=valid)
    padded = plan.tiles.padded_a if side == "rows" else plan.tiles.padded_b
    into = _kernel_acc(acc, padded, plan)
    return _added(kernel_grad(plan, *operands, *_lse_vectors(plan, row, g_row, col, g_col), into), acc, into)

  return _per_platform(run, s)


def lse_block_grad_q(q, k, scale, exclude, include, row, g_row, col, g_col, acc, *,
                     settings: Settings | None = None, valid=None):
  """acc + g (Bq, D), float32, for one block of Σ_i g_row_i row_i + Σ_j g_col_j col_j, where `row` /
  `col` are the FINAL log-sum-exps (over every block; None where not wanted):

      dS_ij = V_ij (g_row_i e^{S_ij − row_i} + g_col_j e^{S_ij − col_j}),   g_i = Σ_j dS_ij k_j

  by the dq kernel alone, added into `acc` (Bq, D): in place where Bq and D need no padding to the
  kernel's tiles. dq and dscale follow from the g summed over blocks (`engines.scale_grads`).

  >>> import jax.numpy as jnp
  >>> lse = jnp.full(2, jnp.log(jnp.e + 1.0))
  >>> g = lse_block_grad_q(jnp.eye(2), jnp.eye(2), jnp.ones(2), None, None, lse, jnp.ones(2), None, None,
  ...                      jnp.zeros((2, 2)))
  >>> [round(float(v), 4) for v in g[0]]  # softmax of row 0: (e, 1) / (e + 1)
  [0.7311, 0.2689]
  """
  return _lse_block_grad(_lse_grad_q, "rows", q, k, scale, exclude, include, row, g_row, col, g_col, acc,
                         settings, valid)


def lse_block_grad_k(q, k, scale, exclude, include, row, g_row, col, g_col, acc, *,
                     settings: Settings | None = None, valid=None):
  """acc + dk (Bk, D), float32, dk_j = Σ_i scale_i dS_ij q_i for one block (dS as in
  `lse_block_grad_q`), by the dk kernel alone, added into `acc` (Bk, D) as there.

  >>> import jax.numpy as jnp
  >>> lse = jnp.full(2, jnp.log(jnp.e + 1.0))
  >>> dk = lse_block_grad_k(jnp.eye(2), jnp.eye(2), jnp.ones(2), None, None, lse, jnp.ones(2), None,
  ...                       None, jnp.ones((2, 2)))
  >>> [round(float(v), 4) for v in dk[0]]  # 1 + column 0 of the row softmax: 1 + (e, 1) / (e + 1)
  [1.7311, 1.2689]
  """
  return _lse_block_grad(_lse_grad_k, "cols", q, k, scale, exclude, include, row, g_row, col, g_col, acc,
                         settings, valid)


def sigmoid_block(q, k, scale, bias, positives, *, settings: Settings | None = None, valid=None):
  """One block's Σ_j softplus(−z_ij (S_ij + bias)) per row by the forward kernel, float32 (Bq,);
  `positives` an id pair, `bias` a scalar.

  >>> import jax.numpy as jnp
  >>> ids = jnp.arange(2)
  >>> round(float(sigmoid_block(jnp.eye(2), jnp.eye(2), jnp.ones(2), 0.0, (ids, ids))[0]), 4)
  1.0064
  """
  s = checked(settings)
  def run(flavour, interpret):
    plan, *operands = _sig_operands(s, flavour, interpret, q, k, scale, bias, positives, valid)
    return _kernels(flavour).sigmoid_forward(*operands, tiles=plan.tiles)[: q.shape[0]]

  return _per_platform(run, s)


def sigmoid_block_grad_q(q, k, scale, bias, positives, g, acc, *, settings: Settings | None = None,
                         valid=None):
  """(acc + g (Bq, D), dbias scalar), float32, for one block of Σ_i g_i sig_i (`sigmoid_block`):

      dS_ij = −g_i z_ij σ(−z_ij (S_ij + bias)),   g_i = Σ_j dS_ij k_j,   dbias = Σ_ij dS_ij

  by the dq kernel alone, added into `acc` (Bq, D) as in `lse_block_grad_q`.

  >>> import jax.numpy as jnp
  >>> ids = jnp.arange(2)
  >>> _, dbias = sigmoid_block_grad_q(jnp.eye(2), jnp.eye(2), jnp.ones(2), 0.0, (ids, ids), jnp.ones(2),
  ...                                 jnp.zeros((2, 2)))
  >>> round(float(dbias), 4)  # 2 (-σ(-1) + σ(0))
  0.4621
  """
  s = checked(settings)
  def run(flavour, interpret):
    plan, *operands = _sig_operands(s, flavour, interpret, q, k, scale, bias, positives, valid)
    into = _kernel_acc(acc, plan.tiles.padded_a, plan)
    g_q, dbias = _sig_grad_q(plan, *operands, _vector(g, plan.tiles.padded_a), into)
    return _added(g_q, acc, into), jnp.sum(dbias)

  return _per_platform(run, s)


def sigmoid_block_grad_k(q, k, scale, bias, positives, g, acc, *, settings: Settings | None = None,
                         valid=None):
  """acc + dk (Bk, D), float32, dk_j = Σ_i scale_i dS_ij q_i for one block (dS as in
  `sigmoid_block_grad_q`), by the dk kernel alone, added into `acc` (Bk, D) as in `lse_block_grad_q`.

  >>> import jax.numpy as jnp
  >>> ids = jnp.arange(2)
  >>> dk = sigmoid_block_grad_k(jnp.eye(2), jnp.eye(2), jnp.ones(2), 0.0, (ids, ids), jnp.ones(2),
  ...                           jnp.zeros((2, 2)))
  >>> [round(float(v), 4) for v in dk[0]]  # (-σ(-1), σ(0))
  [-0.2689, 0.5]
  """
  s = checked(settings)
  def run(flavour, interpret):
    plan, *operands = _sig_operands(s, flavour, interpret, q, k, scale, bias, positives, valid)
    into = _kernel_acc(acc, plan.tiles.padded_b, plan)
    return _added(_sig_grad_k(plan, *operands, _vector(g, plan.tiles.padded_a), into), acc, into)

  return _per_platform(run, s)
