"""Float64 NumPy references for jaxcl/losses/matryoshka.py: the Matryoshka wrapper.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations






def matryoshka(loss, dims, weights=None):
  """Σ_m c_m · loss(x[:, :m], y[:, :m]) for a two-argument float64 reference `loss`."""
  weights = [1.0] * len(dims) if weights is None else weights

  def nested(x, y):
    return float(sum(c * loss(x[:, :m], y[:, :m]) for m, c in zip(dims, weights)))

  return nested
