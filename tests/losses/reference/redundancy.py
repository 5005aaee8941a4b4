"""Float64 NumPy references for jaxcl/losses/redundancy.py: Barlow Twins and VICReg.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np




def barlow_twins(z1, z2, lambda_=5e-3, eps=1e-5):
  def bn(z):  # BatchNorm1d(affine=False) in training mode: biased variance, eps inside the sqrt
    z = np.asarray(z, np.float64)
    mu = z.mean(0)
    var = ((z - mu) ** 2).mean(0)
    return (z - mu) / np.sqrt(var + eps)

  a, b = bn(z1), bn(z2)
  n, d = a.shape
  loss = 0.0
  for i in range(d):
    for j in range(d):
      c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
      loss += (1.0 - c_ij) ** 2 if i == j else lambda_ * c_ij**2
  return float(loss)


def vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
  """Line by line the authors' PyTorch `VICReg.forward` (facebookresearch/vicreg, main_vicreg.py)."""
  x, y = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  n, d = x.shape
  repr_loss = np.mean((x - y) ** 2)
  x = x - x.mean(0)
  y = y - y.mean(0)
  std_x = np.sqrt(x.var(0, ddof=1) + eps)
  std_y = np.sqrt(y.var(0, ddof=1) + eps)
  std_loss = np.mean(np.maximum(1 - std_x, 0)) / 2 + np.mean(np.maximum(1 - std_y, 0)) / 2
  cov_x = (x.T @ x) / (n - 1)
  cov_y = (y.T @ y) / (n - 1)
  off = ~np.eye(d, dtype=bool)
  cov_loss = (cov_x[off] ** 2).sum() / d + (cov_y[off] ** 2).sum() / d
  return float(sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss)
