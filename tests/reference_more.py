"""Float64 NumPy references for SupCon, MV-InfoNCE, MV-DHEL, CWCL and Symile.

Written from the papers' formulas with explicit loops and full matrices (B×B label masks, the full
similarity matrix, explicit target weights), sharing no code with jaxcl.
"""

from __future__ import annotations

import itertools

import numpy as np

from tests.reference import logsumexp, normalize


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
