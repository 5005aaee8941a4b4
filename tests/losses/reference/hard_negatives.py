"""Float64 NumPy references for jaxcl/losses/hard_negatives.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


# ---------------------------------------------------------------------------- float64 references (loops)
def ref_hn_nce(x, y, tau, alpha, beta):
  x, y = normalize(x), normalize(y)
  s = x @ y.T / tau
  b = len(s)
  total = 0.0
  for m in (s, s.T):  # image→text rows, then text→image
    for i in range(b):
      others = [j for j in range(b) if j != i]
      w_norm = sum(np.exp(beta * m[i, k]) for k in others)
      den = alpha * np.exp(m[i, i]) + sum(
          (b - 1) * np.exp(beta * m[i, j]) / w_norm * np.exp(m[i, j]) for j in others
      )
      total += -(m[i, i] - np.log(den)) / b
  return total / 2


def ref_ce_clip(img, txt, hn, scale, thresholds, valid, w_imc, w_cmr):
  img, txt, hn = normalize(img), normalize(txt), normalize(hn)
  b, h, _ = hn.shape
  negs = [hn[j, t] for j in range(b) for t in range(h) if valid[j, t]]
  i2t = t2i = imc = cmr = 0.0
  for i in range(b):
    pos = scale * img[i] @ txt[i]
    row = [scale * img[i] @ c for c in list(txt) + negs]
    i2t += logsumexp(np.array(row)) - pos
    t2i += logsumexp(np.array([scale * txt[i] @ img[j] for j in range(b)])) - pos
    imc += logsumexp(np.array([pos] + [scale * txt[i] @ c for c in negs])) - pos
    for t in range(h):
      if valid[i, t]:
        cmr += max(0.0, thresholds[t] + scale * img[i] @ hn[i, t] - pos)
  itc = 0.5 * (i2t + t2i) / b
  return itc + w_imc * imc / b + w_cmr * cmr / (b * h)


def ref_ce_thresholds(img, txt, hn, scale, valid, low=0.0, high=10.0):
  img, txt, hn = normalize(img), normalize(txt), normalize(hn)
  pos = scale * np.sum(img * txt, axis=1)
  out = []
  for t in range(hn.shape[1]):
    sims = [scale * img[i] @ hn[i, t] for i in range(len(img)) if valid[i, t]]
    out.append(min(max(np.mean(pos) - np.mean(sims), low), high))  # the authors' clamp after each step
  return np.array(out)


# ------------------------------------------------------------------------------------------ dual-view MoCo
def ref_dual_view_moco(q, k, queue, tau, top_k, dual):
  q, k, n = normalize(q), normalize(k), normalize(queue)

  def direction(a, b):
    total = 0.0
    for i in range(len(a)):
      cos = n @ a[i]
      kept = cos if top_k is None else np.sort(cos)[::-1][:top_k]
      total += logsumexp(np.concatenate([[a[i] @ b[i]], kept]) / tau) - a[i] @ b[i] / tau
    return total / len(a)

  return 0.5 * (direction(q, k) + direction(k, q)) if dual else direction(q, k)
