"""Float64 NumPy references of jaxcl/losses/nearest_neighbour.py, written from the paper's formula with
explicit loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference import common


def nearest(q, k):
  """(index, score) of each row's largest <q_i, k_j>, the smallest j on ties."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  index = np.zeros(len(q), np.int64)
  score = np.full(len(q), -np.inf)
  for i in range(len(q)):
    for j in range(len(k)):
      s = q[i] @ k[j]
      if s > score[i]:
        index[i], score[i] = j, s
  return index, score


def nnclr(z, p, support, temperature=0.1, normalize=True):
  """mean_i −log exp(<NN(z_i), p_i>/τ) / Σ_k exp(<NN(z_i), p_k>/τ), NN(z_i) the support row nearest z_i."""
  if normalize:
    z, p, support = common.normalize(z), common.normalize(p), common.normalize(support)
  index, _ = nearest(z, support)
  total = 0.0
  for i in range(len(z)):
    anchor = support[index[i]]
    logits = np.array([anchor @ p[k] for k in range(len(p))]) / temperature
    m = logits.max()
    total += -logits[i] + m + np.log(np.sum(np.exp(logits - m)))
  return total / len(z)
