"""Matryoshka Representation Learning: one loss applied to nested prefixes of the embedding."""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl.losses import _common


def _check_dims(dims: Any) -> tuple[int, ...]:
  if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence | np.ndarray):
    raise TypeError(f"`dims` must be a sequence of positive increasing ints, got {dims!r}.")
  out = []
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
      raise TypeError(f"`dims` must hold Python ints, got {d!r} in {list(dims)}.")
    out.append(int(d))
  if not out:
    raise ValueError("`dims` must name at least one feature size, got an empty sequence.")
  if out[0] <= 0 or any(b <= a for a, b in zip(out, out[1:])):
    raise ValueError(f"`dims` must be positive and strictly increasing, got {out}.")
  return tuple(out)


def _check_weights(weights: Any, n: int) -> tuple[Any, ...]:
  if weights is None:
    return (1.0,) * n
  if (
      getattr(weights, "ndim", 1) != 1
      or isinstance(weights, (str, bytes))
      or not (hasattr(weights, "ndim") or isinstance(weights, Sequence))
  ):
    raise ValueError(f"`weights` must be a sequence of {n} numbers (one per dim), got {weights!r}.")
  if len(weights) != n:
    raise ValueError(f"`weights` must have one entry per dim ({n}), got {len(weights)}.")
  v = _checks.concrete_value(weights)
  if v is not None and (v.dtype.kind not in "fiu" or not np.all(np.isfinite(v)) or np.any(v < 0)):
    raise ValueError(f"`weights` must be finite numbers >= 0, got {list(np.ravel(v))}.")
  return tuple(weights[i] for i in range(n))


def _is_feature_array(x: Any) -> bool:
  return (
      hasattr(x, "ndim") and hasattr(x, "dtype") and x.ndim >= 2
      and jnp.issubdtype(x.dtype, jnp.floating)
  )


def _argument_names(loss_fn: Callable, args: tuple) -> list[str]:
  """Names for the positional arguments (by the signature when it can be read)."""
  try:
    names = list(inspect.signature(loss_fn).bind_partial(*args).arguments)
    if len(names) == len(args):
      return names
  except (TypeError, ValueError):
    pass
  return [f"argument {i}" for i in range(len(args))]


@_common.keyword_only
def matryoshka(
    loss_fn: Callable[..., jax.Array],
    dims: Sequence[int],
    weights: Sequence[float] | jax.Array | None = None,
) -> Callable[..., jax.Array]:
  r"""Wraps a loss into its Matryoshka form: the weighted sum over nested feature prefixes.

  "Matryoshka Representation Learning" (Kusupati et al., NeurIPS 2022). For dims m ∈ M (e.g.
  8, 16, ..., 2048) and importance weights c_m (all 1 in the paper):

      L_MRL(x, y, ...) = Σ_{m ∈ M} c_m · loss_fn(x[..., :m], y[..., :m], ...)

  The returned function has `loss_fn`'s signature. Every floating array argument of rank >= 2
  (positional or keyword) is sliced to its first m features; everything else (labels, temperatures,
  a learnable logit scale) is passed through unchanged. Each prefix goes through `loss_fn` on its
  own, so a loss that L2-normalises renormalises each prefix, as MRL does. `reduction=` and `mask=`
  pass through to `loss_fn`: with `reduction="none"` the result is Σ_m c_m · (per-anchor losses of m).

  Args:
    loss_fn: any jaxcl loss (or a `functools.partial` of one) returning a scalar.
    dims: strictly increasing positive ints; the largest may not exceed the feature size of any
      sliced argument (checked when the returned function is called).
    weights: c_m >= 0, one per dim; None means all 1.
  Returns:
    A function with `loss_fn`'s arguments returning the float32 scalar Σ_m c_m · loss_m.

  >>> import jax.numpy as jnp
  >>> f = matryoshka(lambda a, b: jnp.sum(a * b), dims=(1, 2))
  >>> float(f(jnp.ones((2, 2)), jnp.ones((2, 2))))  # 2 (first feature) + 4 (both)
  6.0
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
  dims = _check_dims(dims)
  weights = _check_weights(weights, len(dims))

  @functools.wraps(loss_fn)
  def nested_loss(*args, **kwargs):
    names = _argument_names(loss_fn, args)
    sliced = [(n, a) for n, a in zip(names, args) if _is_feature_array(a)]
    sliced += [(n, a) for n, a in kwargs.items() if _is_feature_array(a)]
    if not sliced:
      raise ValueError(
          "matryoshka found no floating array argument of rank >= 2 to slice; got argument shapes "
          f"{[jnp.shape(a) for a in args]} and keywords {sorted(kwargs)}."
      )
    for name, a in sliced:
      if a.shape[-1] < dims[-1]:
        raise ValueError(
            f"`dims` asks for {dims[-1]} features but `{name}` has only {a.shape[-1]} (shape {a.shape})."
        )
    cut = lambda x, d: x[..., :d] if _is_feature_array(x) else x
    total = jnp.zeros((), jnp.float32)
    for d, c in zip(dims, weights):
      value = loss_fn(*[cut(a, d) for a in args], **{k: cut(v, d) for k, v in kwargs.items()})
      total = total + jnp.asarray(c, jnp.float32) * jnp.asarray(value, jnp.float32)
    return total

  return nested_loss
