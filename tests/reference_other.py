"""Float64 NumPy references for the non-softmax losses, written from the papers with explicit loops.

Shares no code with jaxcl. Each function takes float64 arrays and returns a Python float.
"""

from __future__ import annotations

import numpy as np

from tests.reference import normalize


def _maybe_normalize(x, do):
  return normalize(x) if do else np.asarray(x, np.float64)


def _dist(a, b, squared):
  sq = float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
  return sq if squared else np.sqrt(sq)


def triplet(anchor, positive, negative, margin=0.2, squared=False, normalize_=True):
  a, p, n = (_maybe_normalize(x, normalize_) for x in (anchor, positive, negative))
  terms = [max(_dist(a[i], p[i], squared) - _dist(a[i], n[i], squared) + margin, 0.0) for i in range(len(a))]
  return float(np.mean(terms))


def batch_hard_triplet(embeddings, labels, margin=0.2, squared=False, normalize_=True):
  x = _maybe_normalize(embeddings, normalize_)
  labels = np.asarray(labels)
  b = len(x)
  terms = []
  for i in range(b):
    pos = [_dist(x[i], x[j], squared) for j in range(b) if j != i and labels[j] == labels[i]]
    neg = [_dist(x[i], x[k], squared) for k in range(b) if labels[k] != labels[i]]
    if pos and neg:
      terms.append(max(max(pos) - min(neg) + margin, 0.0))
  return float(np.mean(terms)) if terms else 0.0


def alignment(x, y, alpha=2.0, normalize_=True):
  a, b = _maybe_normalize(x, normalize_), _maybe_normalize(y, normalize_)
  return float(np.mean([np.linalg.norm(a[i] - b[i]) ** alpha for i in range(len(a))]))


def uniformity(x, t=2.0, normalize_=True):
  z = _maybe_normalize(x, normalize_)
  b = len(z)
  pots = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(b) for j in range(b) if i != j]
  return float(np.log(np.mean(pots)))


def negative_cosine(p, z):
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  cos = [
      p[i] @ z[i] / (max(np.linalg.norm(p[i]), 1e-6) * max(np.linalg.norm(z[i]), 1e-6))
      for i in range(len(p))
  ]
  return -float(np.mean(cos))


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


def matryoshka(loss, dims, weights=None):
  """Σ_m c_m · loss(x[:, :m], y[:, :m]) for a two-argument float64 reference `loss`."""
  weights = [1.0] * len(dims) if weights is None else weights

  def nested(x, y):
    return float(sum(c * loss(x[:, :m], y[:, :m]) for m, c in zip(dims, weights)))

  return nested
