"""Float64 NumPy references for jaxcl/losses/hyperbolic.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp




def ref_lift(v, c):
  """Tangent vector at the origin -> full hyperboloid point (time, space...) in float64."""
  v = np.asarray(v, np.float64)
  r = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  space = np.sinh(r) / r * v
  time = np.sqrt(1.0 / c + np.sum(space**2, -1, keepdims=True))
  return np.concatenate([time, space], -1)


def ref_lorentz_inner(x, y):
  return -x[0] * y[0] + x[1:] @ y[1:]


def ref_meru(image, text, c=1.0, scale=1 / 0.07, weight=0.2, k=0.1):
  x, y = ref_lift(image, c), ref_lift(text, c)
  b = x.shape[0]
  d = np.array([[np.arccosh(max(-c * ref_lorentz_inner(x[i], y[j]), 1 + 1e-6)) / np.sqrt(c)
                 for j in range(b)] for i in range(b)])
  s = -scale * d
  cont = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  entail = 0.0
  for i in range(b):
    g, sp = y[i], x[i]  # text is the general concept, the image the specific one
    aperture = np.arcsin(min(2 * k / (np.sqrt(c) * np.linalg.norm(g[1:])), 1 - 1e-6))
    cxy = c * ref_lorentz_inner(g, sp)
    angle = np.arccos((sp[0] + cxy * g[0]) / (np.linalg.norm(g[1:]) * np.sqrt(cxy**2 - 1)))
    entail += max(angle - aperture, 0.0) / b
  return cont + weight * entail
