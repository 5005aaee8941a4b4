"""Float64 NumPy references for jaxcl/losses/false_negatives.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def ref_decoupled(q, k, tau, positive_mask):
  q, k = normalize(q), normalize(k)
  s = q @ k.T / tau
  total = 0.0
  for i in range(len(s)):
    negs = [s[i, j] for j in range(len(s)) if not positive_mask[i, j] and j != i]
    total += logsumexp(np.array([s[i, i]] + negs)) - s[i, i]
  return total / len(s)


def ref_positive_aware(q, k, hn, tau, threshold, margin, top_k, in_batch):
  qn, kn = normalize(q), normalize(k)
  total = 0.0
  b = len(q)
  for i in range(b):
    pos = qn[i] @ kn[i]
    cands = []
    if in_batch:
      cands += [kn[j] for j in range(b) if j != i]
    if hn is not None:
      cands += list(normalize(hn[i]))
    cos = [qn[i] @ c for c in cands]
    bound = margin * pos if threshold == "relative" else pos + margin
    kept = [c for c in cos if c < bound]
    if top_k is not None:
      kept = sorted(kept, reverse=True)[:top_k]
    total += logsumexp(np.array([pos] + kept) / tau) - pos / tau
  return total / b
