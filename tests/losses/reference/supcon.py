"""Float64 NumPy references for jaxcl/losses/supcon.py: SupCon and focal SupCon.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def supcon(features, labels, temperature=0.1, base_temperature=None, normalize_=True):
  """Khosla et al. eq. (2), anchors without positives left out of the mean."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    f = f[:, None, :]
  n, v, _ = f.shape
  z = np.concatenate([f[:, k] for k in range(v)])
  z = normalize(z) if normalize_ else z
  y = np.tile(np.asarray(labels), v)
  s = z @ z.T / temperature
  base = temperature if base_temperature is None else base_temperature
  losses = []
  for a in range(len(z)):
    positives = [p for p in range(len(z)) if p != a and y[p] == y[a]]
    if not positives:
      continue
    others = np.array([s[a, b] for b in range(len(z)) if b != a])
    log_prob = [s[a, p] - logsumexp(others) for p in positives]
    losses.append(-(temperature / base) * np.mean(log_prob))
  return float(np.mean(losses))


norm = normalize


# ------------------------------------------------------------------------------ float64 references
def _rows(features, labels, *others):
  """(N, V, D) -> view-major (N·V, D) rows with labels (and other per-sample ids) tiled."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    return (f, np.asarray(labels)) + tuple(np.asarray(o) for o in others)
  v = f.shape[1]
  z = np.concatenate([f[:, i] for i in range(v)])
  return (z, np.tile(labels, v)) + tuple(np.tile(o, v) for o in others)


def ref_focal_supcon(features, labels, tau, gamma, average="batch"):
  z, y = _rows(features, labels)
  z = norm(z)
  m = len(y)
  per_anchor = []
  for a in range(m):
    pos = [p for p in range(m) if p != a and y[p] == y[a]]
    if not pos:
      continue
    lse = logsumexp(np.array([z[a] @ z[b] for b in range(m) if b != a]) / tau)
    terms = []
    for p in pos:
      log_p = z[a] @ z[p] / tau - lse
      terms.append(-((1 - np.exp(log_p)) ** gamma) * log_p)
    per_anchor.append(np.sum(terms) / (m if average == "batch" else len(pos)))
  return np.mean(per_anchor)
