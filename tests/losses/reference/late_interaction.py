"""Float64 NumPy references for jaxcl/losses/late_interaction.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def ref_scores(image, text, image_mask=None, text_mask=None):
  x, y = normalize(image), normalize(text)
  b1, b2 = x.shape[0], y.shape[0]
  xm = np.ones(x.shape[:2], bool) if image_mask is None else image_mask
  ym = np.ones(y.shape[:2], bool) if text_mask is None else text_mask
  i2t, t2i = np.zeros((b1, b2)), np.zeros((b1, b2))
  for i in range(b1):
    for j in range(b2):
      xi, yj = x[i][xm[i]], y[j][ym[j]]
      s = xi @ yj.T  # valid image tokens × valid text tokens
      i2t[i, j] = np.mean(np.max(s, axis=1))
      t2i[i, j] = np.mean(np.max(s, axis=0))
  return i2t, t2i


def ref_filip(image, text, scale, image_mask=None, text_mask=None):
  i2t, t2i = ref_scores(image, text, image_mask, text_mask)
  li = np.mean(logsumexp(scale * i2t, 1) - scale * np.diag(i2t))
  lt = np.mean(logsumexp(scale * t2i, 0) - scale * np.diag(t2i))
  return 0.5 * (li + lt)
