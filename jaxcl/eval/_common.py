"""Validation and chunking shared by the evaluation functions."""

from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcl import _checks


def check_positive_int(name: str, value: Any) -> int:
  """A Python int >= 1 (a static argument: the shapes depend on it)."""
  try:
    v = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be a positive integer, got {value!r}.") from None
  if v < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {v}.")
  return v


def check_embeddings(name: str, x: Any, *, min_rows: int = 1) -> jax.Array:
  """A (N, D) floating-point embedding matrix with N >= `min_rows` and D >= 1."""
  x = _checks.check_array(name, x, ndim=2)
  if x.shape[1] < 1:
    raise ValueError(f"`{name}` must have at least one feature, got shape {x.shape}.")
  _checks.check_min_batch(name, x, min_rows)
  return x


def check_same_dim(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same feature size, got shapes {a.shape} and {b.shape}."
    )


def check_class_labels(name: str, labels: Any, n: int, num_classes: int) -> jax.Array:
  """Integer labels of shape (n,), each in [0, num_classes) when the values are known at trace time."""
  labels = _checks.check_labels(name, labels, n)
  v = _checks.concrete_value(labels)
  if v is not None and v.size:
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= num_classes:
      bad = lo if lo < 0 else hi
      raise ValueError(
          f"`{name}` must lie in [0, {num_classes}) for num_classes={num_classes}, got a label {bad}."
      )
  return labels.astype(jnp.int32)


def map_chunks(fn: Callable[..., Any], rows: Any, chunk: int) -> Any:
  """fn applied to consecutive row chunks of the pytree `rows`, outputs concatenated along axis 0.

  Every leaf of `rows` shares the leading size n; `fn` sees chunks of min(chunk, n) rows (the last one
  zero-padded) and must return row-wise outputs. Runs as one `lax.map`, so peak memory is that of a
  single chunk.
  """
  leaves = jax.tree.leaves(rows)
  n = leaves[0].shape[0]
  c = min(chunk, n)
  if c == n:
    return fn(rows)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((n_chunks, c) + a.shape[1:])

  out = jax.lax.map(fn, jax.tree.map(split, rows))
  return jax.tree.map(lambda a: a.reshape((n_chunks * c,) + a.shape[2:])[:n], out)
