"""Float64 NumPy references for jaxcl/losses/triplet.py: triplet and batch-hard triplet.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import dist, maybe_normalize


def triplet(anchor, positive, negative, margin=0.2, squared=False, normalize_=True):
  a, p, n = (maybe_normalize(x, normalize_) for x in (anchor, positive, negative))
  terms = [max(dist(a[i], p[i], squared) - dist(a[i], n[i], squared) + margin, 0.0) for i in range(len(a))]
  return float(np.mean(terms))


def batch_hard_triplet(embeddings, labels, margin=0.2, squared=False, normalize_=True):
  x = maybe_normalize(embeddings, normalize_)
  labels = np.asarray(labels)
  b = len(x)
  terms = []
  for i in range(b):
    pos = [dist(x[i], x[j], squared) for j in range(b) if j != i and labels[j] == labels[i]]
    neg = [dist(x[i], x[k], squared) for k in range(b) if labels[k] != labels[i]]
    if pos and neg:
      terms.append(max(max(pos) - min(neg) + margin, 0.0))
  return float(np.mean(terms)) if terms else 0.0
