"""Float64 NumPy references for jaxcl/losses/geometric.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize






def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# ----------------------------------------------------------------------------------------------- CACR
def ref_cacr(views, alpha=1.0, beta=1.0, t_pos=1.0, t_neg=1.0, normalize_=True):
  z = normalize(views) if normalize_ else np.asarray(views, np.float64)
  v, b = z.shape[:2]
  attraction = 0.0
  for x in range(v):
    for i in range(b):
      others = [u for u in range(v) if u != x]
      cost = np.array([np.sum((z[x, i] - z[u, i]) ** 2) for u in others])
      attraction += np.sum(softmax(t_pos * cost) * alpha * cost) / b
  attraction /= v
  repulsion, pairs = 0.0, 0
  for x in range(v):
    for y in range(x + 1, v):
      for i in range(b):
        cost = np.array([np.sum((z[x, i] - z[y, j]) ** 2) for j in range(b) if j != i])
        repulsion += np.sum(softmax(-t_neg * cost) * -beta * cost) / b
      pairs += 1
  return attraction + repulsion / pairs


# ------------------------------------------------------------------------------------ contrastive gap
def ref_uniformity(x, y, t):
  b = x.shape[0]
  vals = [np.exp(-t * np.sum((x[i] - y[j]) ** 2)) for i in range(b) for j in range(b) if i != j]
  return np.log(np.mean(vals))


def ref_contrastive_gap(image, text, scale, cross, wa=1.0, wu=1.0, t=2.0):
  x, y = normalize(image), normalize(text)
  s = scale * x @ y.T
  clip_loss = 0.5 * (np.mean(logsumexp(s, 1) - np.diag(s)) + np.mean(logsumexp(s, 0) - np.diag(s)))
  align = np.mean(np.sum((x - y) ** 2, 1))
  unif = 0.5 * (ref_uniformity(x, x, t) + ref_uniformity(y, y, t))
  if cross:
    unif += ref_uniformity(x, y, t)
  return clip_loss + wa * align + wu * unif


def ref_gram(temperature, anchor, *others, eps=0.1):
  """Float64 GRAM: the symmetric cross-entropy of −Vol/τ with targets (1 − eps) I + eps / B (the
  authors' label_smoothing=0.1)."""
  a = normalize(anchor)
  xs = [normalize(x) for x in others]
  b = a.shape[0]
  vol = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      mat = np.stack([a[i]] + [x[j] for x in xs], axis=1)  # D × k
      vol[i, j] = np.sqrt(max(abs(np.linalg.det(mat.T @ mat)), 1e-12))
  s = -vol / temperature
  targets = (1 - eps) * np.eye(b) + eps / b
  rows = np.mean([logsumexp(s[i]) - targets[i] @ s[i] for i in range(b)])
  cols = np.mean([logsumexp(s[:, j]) - targets[:, j] @ s[:, j] for j in range(b)])
  return 0.5 * (rows + cols)


def ref_gram_negative_probabilities(temperature, anchor, *others, mask=None, floor=1e-4):
  """Float64 (P_data, P_anchor), (B, B) each: the probabilities of GRAM's hard-negative draws, row i of
  P_data over the data samples j of anchor i, row j of P_anchor over the anchors i of data sample j:
  softmax over the valid samples (the row's own included) of −Vol/τ, + floor, the own entry and the
  padding set to 0, normalised."""
  a = normalize(anchor)
  xs = [normalize(x) for x in others]
  b = a.shape[0]
  valid = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
  vol = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      mat = np.stack([a[i]] + [x[j] for x in xs], axis=1)  # D × k
      vol[i, j] = np.sqrt(max(abs(np.linalg.det(mat.T @ mat)), 1e-12))

  def probabilities(s):  # s[r, c]: row r's logit of candidate c
    out = np.zeros((b, b))
    for r in range(b):
      p = np.zeros(b)
      p[valid] = softmax(s[r, valid])
      w = np.where(valid, p + floor, 0.0)
      w[r] = 0.0
      out[r] = w / w.sum()
    return out

  return probabilities(-vol / temperature), probabilities(-vol.T / temperature)
