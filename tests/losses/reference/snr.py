"""Float64 NumPy references for jaxcl/losses/snr.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import softplus


# ------------------------------------------------------------------------------ float64 references
def ref_snr(a, o):
  return np.array([np.var(o[i] - a[i]) / np.var(a[i]) for i in range(a.shape[0])])


def ref_snr_triplet(a, p, n, margin, reg):
  hinge = np.mean(np.maximum(ref_snr(a, p) - ref_snr(a, n) + margin, 0.0))
  sums = [abs(np.sum(row)) for x in (a, p, n) for row in x]
  return hinge + reg * np.mean(sums)


def ref_z_loss(logits, labels, a, b, eps=1e-8):
  total = 0.0
  for o, y in zip(np.asarray(logits, np.float64), labels):
    z = (o[y] - o.mean()) / np.sqrt(o.var() + eps)
    total += softplus(a * (b - z)) / a
  return total / len(labels)
