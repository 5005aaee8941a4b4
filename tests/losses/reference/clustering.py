"""Float64 NumPy references for jaxcl/losses/clustering.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


norm = normalize


# ------------------------------------------------------------------------------ float64 references
def _rows(features, labels, *others):
  """(N, V, D) -> view-major (N·V, D) rows with labels (and other per-sample ids) tiled."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    return (f, np.asarray(labels)) + tuple(np.asarray(o) for o in others)
  v = f.shape[1]
  z = np.concatenate([f[:, i] for i in range(v)])
  return (z, np.tile(labels, v)) + tuple(np.tile(o, v) for o in others)


def ref_sbcl(features, labels, sub, tau1, tau2=None, beta=0.25, own_views=True):
  """tau2: None (= tau1), a scalar or a per-class vector indexed by label. own_views: the row's other
  views of its own sample join ℓ²'s positives and denominator."""
  n = len(labels)
  z, y, s, sample = _rows(features, labels, sub, np.arange(n))
  z = norm(z)
  m = len(y)
  tau2_row = np.full(m, tau1) if tau2 is None else (
      np.full(m, tau2) if np.ndim(tau2) == 0 else np.asarray(tau2)[y])
  t1, t2 = [], []
  for i in range(m):
    same_sub = [p for p in range(m) if p != i and y[p] == y[i] and s[p] == s[i]]
    views = [p for p in range(m) if p != i and sample[p] == sample[i]] if own_views else []
    other_sub = [p for p in range(m) if y[p] == y[i] and s[p] != s[i]] + views
    if same_sub:
      logits = np.array([z[i] @ z[a] for a in range(m) if a != i]) / tau1
      lse = logsumexp(logits)
      t1.append(np.mean([lse - z[i] @ z[p] / tau1 for p in same_sub]))
    if other_sub:
      den = [a for a in range(m) if not (y[a] == y[i] and s[a] == s[i])] + views
      lse = logsumexp(np.array([z[i] @ z[a] for a in den]) / tau2_row[i])
      t2.append(np.mean([lse - z[i] @ z[p] / tau2_row[i] for p in other_sub]))
  return (np.mean(t1) if t1 else 0.0) + beta * (np.mean(t2) if t2 else 0.0)


def ref_sbcl_authors(features, labels, sub, tau1, tau2_per_class, grama=0.25, base_temperature=0.07):
  """A NumPy port of the mask algebra of the authors' `SupConLoss_rank` (JackHck/SBCL, SimCLR/loss.py),
  2 views, written independently of `ref_sbcl`: subclass mask, `ad_mask` (own other view), one loss per
  anchor, `.mean()` over all 2B anchors. Subclass ids must be unique across classes, as there."""
  f = np.asarray(features, np.float64)
  b = f.shape[0]
  z = norm(np.concatenate([f[:, 0], f[:, 1]]))
  cluster = np.tile(sub, 2)
  lab = np.tile(labels, 2)
  dots = z @ z.T
  logits = dots / tau1
  logits = logits - logits.max(1, keepdims=True)
  tau2 = np.asarray(tau2_per_class, np.float64)[lab][:, None]
  logits_rank = dots / tau2
  logits_rank = logits_rank - logits_rank.max(1, keepdims=True)
  logits_mask = 1.0 - np.eye(2 * b)
  mask = (cluster[:, None] == cluster[None, :]) * logits_mask
  log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1, keepdims=True))
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  label_mask = (lab[:, None] == lab[None, :]).astype(np.float64)
  logits_label_mask = (1.0 - mask) * logits_mask
  ad_mask = np.zeros((2 * b, 2 * b))
  cols = list(range(b, 2 * b)) + list(range(b))
  ad_mask[cols, np.arange(2 * b)] = 1.0
  exp_logits_rank = np.exp(logits_rank) * (ad_mask + logits_label_mask)
  label_mask = ad_mask + logits_label_mask * label_mask
  log_prob_rank = logits_rank - np.log(exp_logits_rank.sum(1, keepdims=True))
  mean_log_label_pos = (label_mask * log_prob_rank).sum(1) / label_mask.sum(1)
  loss = -(tau1 / base_temperature) * mean_log_prob_pos - grama * mean_log_label_pos
  return loss.mean()


def ref_mlcd(f, c, positives, s, m):
  f, c = norm(f), norm(c)
  total = 0.0
  for i in range(f.shape[0]):
    cos = c @ f[i]
    pos = set(int(p) for p in positives[i])
    total += np.log1p(sum(np.exp(-s * (cos[j] - m)) for j in pos))
    total += np.log1p(sum(np.exp(s * cos[j]) for j in range(len(cos)) if j not in pos))
  return total / f.shape[0]


def ref_kmeans(x, labels, subclass_size, iterations):
  """Spherical Lloyd per class, initial centres = the class's first k_c members in index order."""
  x = norm(x)
  out = np.zeros(len(labels), int)
  next_id = 0
  for c in sorted(set(labels.tolist())):
    members = np.where(labels == c)[0]
    k = max(1, len(members) // subclass_size)
    centres = x[members[:k]].copy()
    for _ in range(iterations + 1):
      assign = np.argmax(x[members] @ centres.T, axis=1)
      for j in range(k):
        if np.any(assign == j):
          mean = x[members][assign == j].sum(0)
          centres[j] = mean / np.linalg.norm(mean)
    out[members] = next_id + assign
    next_id += k
  return out


def ref_mcl(z1, z2, clusters, tau):
  z = normalize(np.concatenate([z1, z2]))
  c = np.concatenate([clusters, clusters])
  n = len(z)
  total = 0.0
  for i in range(n):
    p = (i + n // 2) % n
    logits = np.array([z[i] @ z[j] for j in range(n) if j != i and c[j] == c[i]]) / tau
    total += logsumexp(logits) - z[i] @ z[p] / tau
  return total / n


def ref_pamc(z, edges, weights, cluster_ids, scale):
  """PAMC as the released code's `NcontrastCCSP`: edge cosines (0 on self-loops) weighted by A, meta-nodes
  summed per cluster (every cluster non-empty here), their cosines with the diagonal set to 0."""
  z = np.asarray(z, np.float64)
  n = len(z)
  pos = np.zeros(n)
  for (i, j), a in zip(np.asarray(edges).T, weights):
    c = 0.0 if i == j else z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
    pos[i] += a * np.exp(scale * c)
  k = int(np.max(cluster_ids)) + 1
  meta = np.stack([z[np.asarray(cluster_ids) == c].sum(0) for c in range(k)])
  cos = norm(meta) @ norm(meta).T
  np.fill_diagonal(cos, 0.0)
  neg = np.exp(scale * cos).sum(1)
  return -np.mean(np.log(pos + 1e-10)) + np.mean(np.log(neg + 1e-10))


def ref_ncontrast(z, adjacency, scale):
  """Graph-MLP's Ncontrast over all N nodes (dense A; cosines with the diagonal set to 0)."""
  cos = norm(z) @ norm(z).T
  np.fill_diagonal(cos, 0.0)
  e = np.exp(scale * cos)
  return np.mean(-np.log(np.sum(e * adjacency, 1)) + np.log(np.sum(e, 1)))
