"""Float64 NumPy references for jaxcl/losses/crossmodal.py: CWCL and Symile.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def cwcl_weights(frozen):
  fh = normalize(frozen)
  return 0.5 + 0.5 * fh @ fh.T


def cwcl(frozen, trained, temperature=0.1, weights=None, normalize_=True):
  """Srinivasa et al. (2023): soft-target cross-entropy in both directions, averaged."""
  f = normalize(frozen) if normalize_ else np.asarray(frozen, np.float64)
  t = normalize(trained) if normalize_ else np.asarray(trained, np.float64)
  w = cwcl_weights(frozen) if weights is None else np.asarray(weights, np.float64)
  s = f @ t.T / temperature
  b = len(f)
  f_to_t = t_to_f = 0.0
  for i in range(b):
    log_p_row = s[i] - logsumexp(s[i])  # f_i against every t_j
    log_p_col = s[:, i] - logsumexp(s[:, i])  # t_i against every f_j
    f_to_t += -np.sum(w[i] * log_p_row) / np.sum(w[i])
    t_to_f += -np.sum(w[i] * log_p_col) / np.sum(w[i])
  return 0.5 * (f_to_t + t_to_f) / b


def symile(*modalities, logit_scale, normalize_=True):
  """Saporta et al. (2024): per target modality, cross-entropy over MIP logits, averaged over targets."""
  xs = [normalize(x) if normalize_ else np.asarray(x, np.float64) for x in modalities]
  n = len(xs[0])
  total = 0.0
  for m in range(len(xs)):
    for i in range(n):
      logits = []
      for j in range(n):
        rows = [xs[k][j] if k == m else xs[k][i] for k in range(len(xs))]
        logits.append(logit_scale * np.sum(np.prod(rows, axis=0)))
      logits = np.array(logits)
      total += logsumexp(logits) - logits[i]
  return total / (n * len(xs))
