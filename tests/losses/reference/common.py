"""Shared float64 NumPy primitives of the references: normalisation, log-sum-exp, softplus, distances
and a central-difference gradient.
"""

from __future__ import annotations

import numpy as np


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def logsumexp(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softplus(x):
  return np.logaddexp(0.0, x)


def numerical_grad(f, x, eps=1e-6):
  """Central differences of a scalar float64 function at x."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    old = x[idx]
    x[idx] = old + eps
    up = f(x)
    x[idx] = old - eps
    down = f(x)
    x[idx] = old
    g[idx] = (up - down) / (2 * eps)
  return g


def maybe_normalize(x, do):
  return normalize(x) if do else np.asarray(x, np.float64)


def dist(a, b, squared):
  sq = float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
  return sq if squared else np.sqrt(sq)
