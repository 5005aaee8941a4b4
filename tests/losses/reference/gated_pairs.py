"""Float64 NumPy references for jaxcl/losses/gated_pairs.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


norm = normalize


def ref_gated(q, k, g, tau):
  q, k = norm(q), norm(k)
  g = np.broadcast_to(g, q.shape)
  total = 0.0
  for i in range(q.shape[0]):
    logits = np.array([(g[i] * q[i]) @ (g[i] * k[j]) for j in range(k.shape[0])]) / tau
    total += logsumexp(logits) - logits[i]
  return total / q.shape[0]


def ref_gated_labels(q, k, g, y1, y2, yk, tau):
  """The authors' class-level objective (erow/FastSSL model/simlap.py, `multipos_ce_loss`)."""
  q, k = norm(q), norm(k)
  g = np.broadcast_to(g, q.shape)
  terms = []
  for i in range(q.shape[0]):
    logits = np.array([(g[i] * q[i]) @ (g[i] * k[j]) for j in range(k.shape[0])]) / tau
    negatives = [logits[j] for j in range(k.shape[0]) if yk[j] != y1[i] and yk[j] != y2[i]]
    for p in range(k.shape[0]):
      if yk[p] == y2[i]:
        terms.append(logsumexp(np.array([logits[p]] + negatives)) - logits[p])
  return np.mean(terms)
