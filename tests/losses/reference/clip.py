"""Float64 NumPy references for jaxcl/losses/clip.py: CLIP (with label smoothing), grouped ITC and SigLIP.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize, softplus


def clip(image, text, logit_scale):
  s = logit_scale * normalize(image) @ normalize(text).T
  diag = np.diag(s)
  return 0.5 * (np.mean(logsumexp(s, 1) - diag) + np.mean(logsumexp(s, 0) - diag))


def clip_label_smoothing(image, text, logit_scale, eps):
  """CLIP with torch's CrossEntropyLoss(label_smoothing=eps) targets (1 − eps) I + eps / B in both
  directions, written with the full target matrix."""
  s = logit_scale * normalize(image) @ normalize(text).T
  b = s.shape[0]
  target = (1 - eps) * np.eye(b) + eps / b
  rows = -np.sum(target * (s - logsumexp(s, 1)[:, None]), axis=1)
  cols = -np.sum(target * (s - logsumexp(s, 0)[None, :]), axis=0)
  return 0.5 * (np.mean(rows) + np.mean(cols))


def siglip(image, text, logit_scale, logit_bias):
  s = logit_scale * normalize(image) @ normalize(text).T + logit_bias
  z = 2 * np.eye(s.shape[0]) - 1
  return np.mean(np.sum(softplus(-z * s), axis=1))


def grouped_itc(image, text, group_ids, logit_scale):
  """M2-Encoder's grouped ITC with explicit loops: each anchor's softmax over its own group only."""
  s = logit_scale * normalize(image) @ normalize(text).T
  g = np.asarray(group_ids)
  b = s.shape[0]
  rows = [logsumexp(s[i, g == g[i]], 0) - s[i, i] for i in range(b)]
  cols = [logsumexp(s[g == g[j], j], 0) - s[j, j] for j in range(b)]
  return 0.5 * (np.mean(rows) + np.mean(cols))
