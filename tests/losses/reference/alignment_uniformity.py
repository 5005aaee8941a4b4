"""Float64 NumPy references for jaxcl/losses/alignment_uniformity.py: alignment and uniformity.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import maybe_normalize


def alignment(x, y, alpha=2.0, normalize_=True):
  a, b = maybe_normalize(x, normalize_), maybe_normalize(y, normalize_)
  return float(np.mean([np.linalg.norm(a[i] - b[i]) ** alpha for i in range(len(a))]))


def uniformity(x, t=2.0, normalize_=True):
  z = maybe_normalize(x, normalize_)
  b = len(z)
  pots = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(b) for j in range(b) if i != j]
  return float(np.log(np.mean(pots)))
