"""Float64 NumPy references for jaxcl/losses/spatial.py: PatchNCE (CUT), CPC and PixPro.

Written from the papers' formulas (and the authors' code where named) with explicit loops, sharing no
code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def patch_nce(feat_q, feat_k, temperature=0.07, negatives="image", mask=None):
  """CUT's PatchNCELoss per layer, averaged over layers. feat_q / feat_k: one (B, P, D) array or a list."""
  layers_q = feat_q if isinstance(feat_q, (list, tuple)) else [feat_q]
  layers_k = feat_k if isinstance(feat_k, (list, tuple)) else [feat_k]
  layer_losses = []
  for q, k in zip(layers_q, layers_k):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, p = q.shape[0], q.shape[1]
    q, k = normalize(q.reshape(b, p, -1)), normalize(k.reshape(b, p, -1))
    keep = np.ones(b, bool) if mask is None else np.asarray(mask)
    losses = []
    for i in range(b):
      if not keep[i]:
        continue
      for a in range(p):
        if negatives == "image":
          logits = [q[i, a] @ k[i, c] for c in range(p)]
        else:
          logits = [q[i, a] @ k[j, c] for j in range(b) if keep[j] for c in range(p)]
        losses.append(-(q[i, a] @ k[i, a]) / temperature + logsumexp(np.array(logits) / temperature))
    layer_losses.append(np.mean(losses))
  return float(np.mean(layer_losses))


def cpc(predictions, targets, offsets, temperature=1.0, mask=None):
  """Σ_k mean over anchors with a target of the InfoNCE of the prediction against every valid target.
  predictions (K, B, T, [W,] D), targets (B, T, [W,] D); the offsets run along T."""
  z = np.asarray(targets, np.float64)
  p = np.asarray(predictions, np.float64)
  if z.ndim == 3:
    z, p = z[:, :, None], p[:, :, :, None]
  b, t_len, w = z.shape[:3]
  keep = np.ones(b, bool) if mask is None else np.asarray(mask)
  everything = [z[j, t, c] for j in range(b) if keep[j] for t in range(t_len) for c in range(w)]
  total = 0.0
  for n, o in enumerate(offsets):
    losses = []
    for i in range(b):
      for t in range(t_len - o):
        for c in range(w):
          if keep[i]:
            pred = p[n, i, t, c]
            logits = np.array([pred @ x for x in everything]) / temperature
            losses.append(-(pred @ z[i, t + o, c]) / temperature + logsumexp(logits))
    total += np.mean(losses)
  return float(total)


def pixpro_pairs(query_box, query_grid, key_box, key_grid, threshold=0.7):
  """(B, N, M) positive pixel pairs by the distance of their bin centres (zdaxie/PixPro regression_loss)."""
  out = []
  for bq, bk in zip(np.asarray(query_box, np.float64), np.asarray(key_box, np.float64)):
    def centres(box, grid):
      h, w = grid
      bw, bh = (box[2] - box[0]) / w, (box[3] - box[1]) / h
      return [(box[0] + (j + 0.5) * bw, box[1] + (i + 0.5) * bh) for i in range(h) for j in range(w)], np.hypot(bw, bh)
    cq, dq = centres(bq, query_grid)
    ck, dk = centres(bk, key_grid)
    scale = max(dq, dk)
    out.append(np.array([[np.hypot(a[0] - c[0], a[1] - c[1]) / scale < threshold for c in ck] for a in cq]))
  return np.array(out)


def pixpro(query, key, query_box, key_box, value=None, sharpness=2.0, threshold=0.7, mask=None):
  query, key = np.asarray(query, np.float64), np.asarray(key, np.float64)
  b, h, w, d = query.shape
  pairs = pixpro_pairs(query_box, (h, w), key_box, key.shape[1:3], threshold)
  value = query if value is None else np.asarray(value, np.float64)
  keep = np.ones(b, bool) if mask is None else np.asarray(mask)
  losses = []
  for i in range(b):
    if not keep[i]:
      continue
    x = normalize(query[i].reshape(h * w, d))
    g = normalize(value[i].reshape(h * w, d))
    k = normalize(key[i].reshape(-1, d))
    y = np.zeros((h * w, d))
    for n in range(h * w):
      for m in range(h * w):
        y[n] += max(x[n] @ x[m], 0.0) ** sharpness * g[m]
    y = normalize(y)
    cosines = [y[n] @ k[m] for n in range(h * w) for m in range(k.shape[0]) if pairs[i, n, m]]
    losses.append(-np.mean(cosines) if cosines else 0.0)
  return float(np.mean(losses))
