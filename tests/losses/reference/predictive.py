"""Float64 NumPy references for jaxcl/losses/predictive.py: negative cosine (BYOL / SimSiam).

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np




def negative_cosine(p, z):
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  cos = [
      p[i] @ z[i] / (max(np.linalg.norm(p[i]), 1e-6) * max(np.linalg.norm(z[i]), 1e-6))
      for i in range(len(p))
  ]
  return -float(np.mean(cos))
