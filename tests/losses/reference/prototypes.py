"""Float64 NumPy references of jaxcl/losses/prototypes.py, following the loops of the SwAV authors'
`distributed_sinkhorn` and `train` (main_swav.py) in the exp domain, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np


def sinkhorn_knopp(scores, epsilon=0.05, iterations=3):
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # (K, B) as in the paper
  k, b = q.shape
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def _log_softmax(x):
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def swav(scores, temperature=0.1, epsilon=0.05, iterations=3, assign_views=(0, 1), codes_of=None,
         queue_scores=None):
  """The SwAV loss of `scores` (B, V, K); the codes come from `codes_of` (default: `scores`) so that a
  finite difference in `scores` holds them fixed, as the stop-gradient does."""
  scores = np.asarray(scores, np.float64)
  codes_of = scores if codes_of is None else np.asarray(codes_of, np.float64)
  b, v, _ = scores.shape
  loss = 0.0
  for j, a in enumerate(assign_views):
    rows = codes_of[:, a]
    if queue_scores is not None:
      rows = np.concatenate([np.asarray(queue_scores, np.float64)[:, j], rows])
    q = sinkhorn_knopp(rows, epsilon, iterations)[-b:]
    sub = 0.0
    for w in range(v):
      if w != a:
        sub -= np.mean(np.sum(q * _log_softmax(scores[:, w] / temperature), axis=1))
    loss += sub / (v - 1)
  return loss / len(assign_views)
