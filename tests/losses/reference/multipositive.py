"""Float64 NumPy references for jaxcl/losses/multipositive.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def ref_one_to_k(image, texts, scale):
  """Nie et al. (2024) with loops: every (image, language) text pair in one softmax per image."""
  v, t = normalize(image), normalize(texts)
  k, b, _ = t.shape
  i2t = t2i = 0.0
  for i in range(b):
    logits = np.array([scale * v[i] @ t[kk, j] for kk in range(k) for j in range(b)])
    for kk in range(k):
      i2t += -(scale * v[i] @ t[kk, i] - logsumexp(logits)) / (k * b)
      col = np.array([scale * t[kk, i] @ v[j] for j in range(b)])
      t2i += -(scale * t[kk, i] @ v[i] - logsumexp(col)) / (k * b)
  return 0.5 * (i2t + t2i / k)  # the authors' code (CCRK) divides the whole loss by K


def ref_poly_view(views, critic, tau):
  """Shidani et al. (2024), the pseudo-code with loops: for each anchor (i, α) and positive β ≠ α one
  softmax over the candidates (i, β) and every view of every other sample; the M − 1 cross-entropies
  are aggregated by the geometric mean (mean of the losses) or the arithmetic mean of the likelihoods."""
  x = normalize(views)
  m, b, _ = x.shape
  total = 0.0
  for a in range(m):
    for i in range(b):
      losses = []
      for be in range(m):
        if be == a:
          continue
        candidates = [(i, be)] + [(j, g) for j in range(b) if j != i for g in range(m)]
        logits = np.array([x[a, i] @ x[g, j] / tau for j, g in candidates])
        losses.append(logsumexp(logits) - logits[0])
      losses = np.array(losses)
      if critic == "geometric":
        total += np.mean(losses) / (m * b)
      else:
        total += -np.log(np.mean(np.exp(-losses))) / (m * b)
  return total
