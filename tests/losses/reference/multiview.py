"""Float64 NumPy references for jaxcl/losses/multiview.py: MV-InfoNCE and MV-DHEL.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import itertools

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def multiview_infonce(views, temperature=0.1, normalize_=True):
  """Koromilas et al. (2025) MV-InfoNCE: one log-ratio per instance over all its views."""
  u = np.asarray(views, np.float64)
  u = normalize(u) if normalize_ else u
  v, b, _ = u.shape
  total = 0.0
  for i in range(b):
    num = [u[l, i] @ u[m, i] / temperature for l in range(v) for m in range(v) if m != l]
    den = [
        u[l, i] @ u[m, j] / temperature
        for l in range(v) for j in range(b) for m in range(v) if (j, m) != (i, l)
    ]
    total += logsumexp(np.array(den)) - logsumexp(np.array(num))
  return total / b


def mv_dhel(views, temperature=0.1, normalize_=True):
  """Koromilas et al. (2025) MV-DHEL: log Σ_{l≠m} e^{s_il,im} − Σ_l log Σ_{j≠i} e^{s_il,jl}, negated."""
  u = np.asarray(views, np.float64)
  u = normalize(u) if normalize_ else u
  v, b, _ = u.shape
  total = 0.0
  for i in range(b):
    num = [u[l, i] @ u[m, i] / temperature for l, m in itertools.permutations(range(v), 2)]
    uniformity = sum(
        logsumexp(np.array([u[l, i] @ u[l, j] / temperature for j in range(b) if j != i]))
        for l in range(v)
    )
    total += uniformity - logsumexp(np.array(num))
  return total / b


def nt_xent_pieces(z1, z2, temperature):
  """Per instance (p_i, a_i, b_i): the positive logit and each view's NT-Xent log-denominator."""
  z = normalize(np.concatenate([z1, z2]))
  b = len(z1)
  s = z @ z.T / temperature
  lse = np.array([logsumexp(np.delete(s[r], r)) for r in range(2 * b)])
  return np.array([s[i, i + b] for i in range(b)]), lse[:b], lse[b:]
