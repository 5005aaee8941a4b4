"""The similarity engines: their registry, and the engine `impl="auto"` picks.

An engine computes the reductions of `jaxcl.ops.reductions` for one device: "dense" (`jaxcl.ops.dense`),
"blockwise" (`jaxcl.ops.blockwise`) and "pallas" (`jaxcl.ops.pallas`) register here when imported; the
sharded engines ("allgather", "ring", `jaxcl.ops.sharded`) run one of them on each device's block.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.ops import dense

# Engine registry: name -> module-level functions `logsumexp(...)` and `sigmoid_sum(...)`.
_ENGINES: dict[str, dict[str, Callable]] = {
    "dense": {"logsumexp": dense.logsumexp, "sigmoid_sum": dense.sigmoid_sum},
}
# Engines with settings: settings type -> engine name (an instance as `impl=` is that engine with them).
_SETTINGS_TYPES: dict[type, str] = {}


def register_engine(name: str, *, logsumexp: Callable, sigmoid_sum: Callable,
                    settings: type | None = None) -> None:
  """Makes an engine available as `impl=name` to every loss; with `settings` (a hashable type), an
  instance of it as `impl=` means this engine with those settings, passed to its functions as the
  keyword `settings=`."""
  _ENGINES[name] = {"logsumexp": logsumexp, "sigmoid_sum": sigmoid_sum}
  if settings is not None:
    _SETTINGS_TYPES[settings] = name


def available_impls() -> tuple[str, ...]:
  """Engine names accepted by `impl=` (plus "auto", and the settings of an engine that has them)."""
  return tuple(_ENGINES)


def name_of(impl, argument: str = "impl") -> str:
  """The engine name of an `impl=` value: a name as given, or the engine whose settings `impl` is (an
  instance of a type registered with `register_engine(..., settings=)`, e.g. `jaxcl.ops.pallas.Settings`
  for "pallas"). Anything else is an error naming `argument`. The one place `impl` values are told apart.

  >>> from jaxcl.ops import pallas
  >>> name_of("blockwise"), name_of(pallas.Settings(flavour="tpu"))
  ('blockwise', 'pallas')
  """
  if isinstance(impl, str):
    return impl
  for cls, name in _SETTINGS_TYPES.items():
    if isinstance(impl, cls):
      return name
  kinds = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in _SETTINGS_TYPES)
  raise TypeError(f"`{argument}` must be an engine name or engine settings ({kinds}), got {impl!r}.")


def settings_of(impl):
  """The engine settings an `impl=` value carries, or None for a name."""
  return None if isinstance(impl, str) else impl


def resolve_impl(impl, n_rows: int, n_cols: int):
  """The engine `impl="auto"` picks for an (n_rows, n_cols) similarity matrix; any other `impl` (an
  engine name, or engine settings such as `jaxcl.ops.pallas.Settings`) is checked and returned as is.

  Rule: the dense engine while the matrix is small (n_rows·n_cols <= 4096², 64 MiB of float32); above
  that `BY_PLATFORM`, "pallas|blockwise": the fused `pallas` engine where the program is lowered for a
  TPU or a CUDA GPU, `blockwise` elsewhere. The platform is the one the program is COMPILED for, not
  the default backend of this process (`jax.lax.platform_dependent`): a program compiled here for a TPU
  (`jaxcl.targets`) gets the TPU kernels, one run on CPU the blockwise tile loop. The same holds inside
  `shard_map` (the kernels' outputs carry the device-varying type check_vma asks for).

  >>> resolve_impl("auto", 8, 8), resolve_impl("auto", 8192, 8192)
  ('dense', 'pallas|blockwise')
  """
  if impl != "auto":
    _checks.check_choice("impl", name_of(impl), ("auto",) + available_impls())
    return impl
  if n_rows * n_cols <= DENSE_MAX_ELEMENTS:
    return "dense"
  if "pallas" in _ENGINES and "blockwise" in _ENGINES:
    return BY_PLATFORM
  if "blockwise" in _ENGINES:
    return "blockwise"
  return "dense"


def is_dense(impl, n_rows: int, n_cols: int) -> bool:
  """Whether `impl` resolves to the dense engine for an (n_rows, n_cols) similarity matrix: the rule
  losses with their own tiled fallback (`jaxcl.losses._tiled`, `_soft_targets`) follow.

  >>> is_dense("auto", 8, 8), is_dense("auto", 8192, 8192), is_dense("blockwise", 8, 8)
  (True, False, False)
  """
  return name_of(resolve_impl(impl, n_rows, n_cols)) == "dense"


def twice_differentiable(impl, n_rows: int, n_cols: int, what: str):
  """The engine for a term whose gradient differentiates an engine's backward pass (dense or
  blockwise; the fused kernels have no second derivative). `impl="auto"` that would pick the kernels
  takes `blockwise`; `impl="pallas"` (or pallas settings) is an error naming `what`.

  >>> twice_differentiable("auto", 8192, 8192, "a term")
  'blockwise'
  """
  resolved = resolve_impl(impl, n_rows, n_cols)
  if name_of(resolved) == "pallas":
    raise ValueError(
        f"`impl={impl!r}` (the pallas engine) cannot compute {what}: its gradient differentiates the "
        "engine's backward pass, which the fused kernels do not support; use impl='dense', 'blockwise' or "
        "'auto'."
    )
  if resolved == BY_PLATFORM:
    return "blockwise" if "blockwise" in _ENGINES else "dense"
  return resolved


DENSE_MAX_ELEMENTS = 4096 * 4096
SHARDED_IMPLS = ("allgather", "ring")
BY_PLATFORM = "pallas|blockwise"
# The platforms (`jax.lax.platform_dependent` names) on which `BY_PLATFORM` runs the fused kernels.
KERNEL_PLATFORMS = ("tpu", "cuda")


def by_platform(kernels: Callable, other: Callable):
  """`kernels()` where the program is lowered for a platform of `KERNEL_PLATFORMS`, else `other()`.

  Both are traced; only the chosen one is lowered and compiled (`jax.lax.platform_dependent`).
  """
  return jax.lax.platform_dependent(default=other, **{p: kernels for p in KERNEL_PLATFORMS})


def engine(impl, reduction: str) -> Callable:
  """The function `reduction` ("logsumexp" / "sigmoid_sum") of engine `impl`: a registered engine's
  name, its settings (the function with `settings=impl` bound) or `BY_PLATFORM`."""
  if impl == BY_PLATFORM:
    kernels, other = _ENGINES["pallas"][reduction], _ENGINES["blockwise"][reduction]

    def run(*args, **kwargs):
      return by_platform(lambda: kernels(*args, **kwargs), lambda: other(*args, **kwargs))

    return run
  fn = _ENGINES[name_of(impl)][reduction]
  settings = settings_of(impl)
  return fn if settings is None else functools.partial(fn, settings=settings)


def scale_grads(q: jax.Array, scale: jax.Array, g: jax.Array, *, columns: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """(dq, dscale), float32, from g_i = Σ_j dS_ij k_j (float32 (Bq, D)), the one matmul every engine's
  backward pass accumulates for S_ij = scale_i <q_i, k_j>:

      dq_i = scale_i · g_i,    dscale_i = Σ_j dS_ij <q_i, k_j> = <q_i, g_i>   (no pass over S)

  `scale` (Bq,) gives dscale (Bq,); with `columns`, scale is a (Bq, 1) column and so is dscale (the
  layout of a TPU kernel's per-row values). Elementwise products and a row sum only, so that a kernel
  runs it too: the fused Pallas backward (`pallas_gpu.lse_backward_fused`, `pallas_tpu.lse_backward_fused`
  and their sigmoid twins) calls it on each row block's complete g in its epilogue.

  >>> import jax.numpy as jnp
  >>> dq, dscale = scale_grads(jnp.ones((1, 2)), jnp.full((1,), 3.0), jnp.array([[1.0, 2.0]]))
  >>> dq.tolist(), dscale.tolist()
  ([[3.0, 6.0]], [3.0])
  """
  return (scale if columns else scale[:, None]) * g, jnp.sum(q.astype(jnp.float32) * g, axis=1,
                                                             keepdims=columns)
