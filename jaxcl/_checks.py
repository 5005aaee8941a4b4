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


FLOAT32 = np.finfo(np.float32)
INT32 = np.iinfo(np.int32)


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
  if floating and x.ndim >= 2 and x.shape[-1] == 0:
    raise ValueError(f"`{name}` must have a non-empty feature (last) axis, got shape {x.shape}.")
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


def check_int32(name: str, ids: Any) -> None:
  """Raises if concrete integer `ids` hold a value outside int32.

  Checked on the value as given (NumPy, a list): without x64, `jnp.asarray` wraps such values modulo
  2³² (5 + 2³² becomes 5), which would silently merge different labels.
  """
  if ids is None or isinstance(ids, jax.core.Tracer):
    return
  dtype = getattr(ids, "dtype", None)
  if dtype is not None and (np.dtype(dtype).kind not in "iuO" or np.can_cast(dtype, np.int32)):
    return  # not integers, or every value fits (and a device array is not copied to the host)
  try:
    v = np.asarray(ids)
  except Exception:  # pylint: disable=broad-except  (not array-like: the caller's checks report it)
    return
  if v.dtype.kind == "O" and all(isinstance(e, (int, np.integer)) for e in v.flat):
    outside = [int(e) for e in v.flat if not INT32.min <= int(e) <= INT32.max]  # Python ints beyond int64
  elif v.dtype.kind in "iu":
    outside = v[(v < INT32.min) | (v > INT32.max)].tolist()
  else:
    return
  if outside:
    raise ValueError(
        f"`{name}` must fit in int32 ([{INT32.min}, {INT32.max}]), got the value {outside[0]}; map the "
        "labels to small integers first (e.g. with np.unique(..., return_inverse=True))."
    )


def check_labels(name: str, labels: Any, n: int) -> jax.Array:
  """Integer labels of shape (n,), every concrete value within int32."""
  if labels is None:
    raise TypeError(f"`{name}` must be an integer array of shape ({n},), got None.")
  check_int32(name, labels)
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"`{name}` must have shape ({n},), got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"`{name}` must have an integer dtype, got {labels.dtype}.")
  return labels


def concrete_value(x: Any) -> np.ndarray | None:
  """The value of `x` as NumPy if it is known at trace time, else None (bfloat16 and other JAX float
  types, which NumPy does not know as numbers, come back as float64)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    v = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if v.dtype.kind == "V" and jnp.issubdtype(v.dtype, jnp.floating):
    v = v.astype(np.float64)
  return v


def _shown(v: np.ndarray):
  return v.item() if v.size == 1 else v


def check_positive(name: str, value: Any) -> None:
  """Raises unless every entry of a concrete `value` is a positive, finite float32 number: in
  [2⁻¹²⁶, float32 max] = [1.18e-38, 3.4e38] (below, float32 holds it as a subnormal or 0, which
  accelerators flush to 0; above, it is inf)."""
  v = concrete_value(value)
  if v is None:
    return
  if v.dtype.kind not in "fiu":
    raise TypeError(f"`{name}` must be a number, got dtype {v.dtype}.")
  if not np.all(np.isfinite(v)) or np.any(v <= 0):
    raise ValueError(f"`{name}` must be positive and finite, got {_shown(v)}.")
  if np.any(v < FLOAT32.tiny) or np.any(v > FLOAT32.max):
    raise ValueError(
        f"`{name}` must be a positive float32 number in [{FLOAT32.tiny:.4g}, {FLOAT32.max:.4g}] (the math "
        f"runs in float32), got {_shown(v)}."
    )


def check_scalar(name: str, value: Any) -> jax.Array:
  """A scalar parameter as a float32 array of shape (); shape (1,) is accepted too (big_vision keeps
  its logit scale and bias as (1,) parameters)."""
  if np.ndim(value) not in (0, 1) or np.size(value) != 1:
    raise ValueError(f"`{name}` must be a scalar (shape () or (1,)), got shape {np.shape(value)}.")
  v = concrete_value(value)
  if v is not None and v.dtype.kind not in "fiu":
    raise TypeError(f"`{name}` must be a number, got dtype {v.dtype}.")
  return jnp.reshape(jnp.asarray(value, jnp.float32), ())


# The largest multiplier of a cosine (1/temperature, a logit scale) a loss accepts: 2¹⁰⁰ ≈ 1.3e30. The
# logits, their log-sum-exps and the gradients are then at most a few times the multiplier, and the sums
# over a batch (up to B² terms, e.g. SigLIP) stay below float32's maximum 2¹²⁸ for B up to 2¹³.
MAX_SCALE = 2.0**100


def check_scale(name: str, value: Any) -> None:
  """Raises unless a concrete scalar multiplier of cosines is positive and at most `MAX_SCALE`."""
  check_positive(name, value)
  _refuse_outside(name, value, lambda v: v > MAX_SCALE,
                  f"at most 2**100 = {MAX_SCALE:.4g} (a larger multiplier overflows float32 in the loss or "
                  "its gradient)")


def check_bias(name: str, value: Any) -> None:
  """Raises unless a concrete additive logit bias is finite with |bias| at most `MAX_SCALE`."""
  check_finite(name, value)
  _refuse_outside(name, value, lambda v: np.abs(v) > MAX_SCALE,
                  f"at most 2**100 = {MAX_SCALE:.4g} in absolute value (a larger bias overflows float32 in "
                  "the loss or its gradient)")


def check_temperature(name: str, value: Any) -> None:
  """Raises unless a concrete temperature is positive with 1/temperature at most `MAX_SCALE`."""
  check_positive(name, value)
  _refuse_outside(name, value, lambda v: v < 1.0 / MAX_SCALE,
                  f"at least 2**-100 = {1.0 / MAX_SCALE:.4g} (1/temperature multiplies the cosines; a larger "
                  "multiplier overflows float32 in the loss or its gradient)")


def _refuse_outside(name: str, value: Any, outside, requirement: str) -> None:
  """Raises "`name` must be <requirement>, got <value>" if a concrete numeric `value` has an entry
  where `outside` holds (traced values pass)."""
  v = concrete_value(value)
  if v is not None and v.dtype.kind in "fiu" and np.any(outside(v)):
    raise ValueError(f"`{name}` must be {requirement}, got {_shown(v)}.")


def check_finite(name: str, value: Any) -> None:
  v = concrete_value(value)
  if v is not None and v.dtype.kind == "f" and not np.all(np.abs(v) <= FLOAT32.max):
    raise ValueError(f"`{name}` must be finite in float32 (|value| <= {FLOAT32.max:.4g}), got {_shown(v)}.")


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
