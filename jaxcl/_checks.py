"""Input validation shared by every public function.

Every check runs at trace time on static shapes and dtypes, and on values only when they are concrete
(a Python number or a non-traced array), so the checks cost nothing inside `jax.jit`. Each error names
the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_array(name: str, x: Any, *, ndim: int | tuple[int, ...], floating: bool = True) -> jax.Array:
  """Returns `x` as a jax array after checking its rank (and that it is floating point)."""
  if x is None:
    raise TypeError(f"`{name}` must be an array, got None.")
  x = jnp.asarray(x)
  ndims = (ndim,) if isinstance(ndim, int) else ndim
  if x.ndim not in ndims:
    expected = " or ".join(f"rank {n}" for n in ndims)
    raise ValueError(f"`{name}` must have {expected}, got shape {x.shape} (rank {x.ndim}).")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`{name}` must be a floating-point array, got dtype {x.dtype}.")
  return x


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape, got {a.shape} and {b.shape}."
    )


def check_min_batch(name: str, x: jax.Array, minimum: int = 2, axis: int = 0, why: str = "") -> None:
  n = x.shape[axis]
  if n < minimum:
    reason = f" ({why})" if why else ""
    raise ValueError(
        f"`{name}` needs at least {minimum} examples along axis {axis}{reason}, got shape {x.shape}."
    )


def check_labels(name: str, labels: Any, n: int) -> jax.Array:
  """Integer labels of shape (n,)."""
  if labels is None:
    raise TypeError(f"`{name}` must be an integer array of shape ({n},), got None.")
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"`{name}` must have shape ({n},), got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"`{name}` must have an integer dtype, got {labels.dtype}.")
  return labels


def concrete_value(x: Any) -> np.ndarray | None:
  """The value of `x` as NumPy if it is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None


def check_positive(name: str, value: Any) -> None:
  """Raises if a concrete `value` (scalar or array) has an entry <= 0 or a non-finite entry."""
  v = concrete_value(value)
  if v is None:
    return
  if v.dtype.kind not in "fiu":
    raise TypeError(f"`{name}` must be a number, got dtype {v.dtype}.")
  if not np.all(np.isfinite(v)) or np.any(v <= 0):
    shown = v.item() if v.size == 1 else v
    raise ValueError(f"`{name}` must be positive and finite, got {shown}.")


def check_finite(name: str, value: Any) -> None:
  v = concrete_value(value)
  if v is not None and not np.all(np.isfinite(v)):
    shown = v.item() if v.size == 1 else v
    raise ValueError(f"`{name}` must be finite, got {shown}.")


def check_scalar_or_vector(name: str, value: Any, n: int) -> jax.Array:
  """A per-row parameter: a scalar, or a vector of shape (n,)."""
  value = jnp.asarray(value)
  if value.shape not in ((), (n,)):
    raise ValueError(f"`{name}` must be a scalar or have shape ({n},), got shape {value.shape}.")
  return value


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raises if a concrete `value` is negative or not finite (traced values pass)."""
  check_finite(name, value)
  v = concrete_value(value)
  if v is not None and v.dtype.kind in "fiu" and v.size and v.min() < 0:
    shown = v.item() if v.size == 1 else v
    raise ValueError(f"`{name}` must be >= 0, got {shown}.")
