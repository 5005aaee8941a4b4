"""Float64 NumPy references for jaxcl/losses/matryoshka_2d.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses import reference
from tests.losses.reference.common import logsumexp




def ref_clip(x, y, scale):
  return reference.clip.clip(x, y, scale)


def ref_layer_kl(shallow, final, t):
  """Float64 (1/N) Σ_i KL(softmax(final_i / t) ‖ softmax(shallow_i / t)) over the rows."""
  d = shallow.shape[-1]
  log_softmax = lambda v: v - logsumexp(v, axis=1)[:, None]
  log_q = log_softmax(shallow.reshape(-1, d) / t)
  log_p = log_softmax(final.reshape(-1, d) / t)
  return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
