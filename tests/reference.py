"""Independent float64 NumPy references for the losses, and a finite-difference gradient.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def logsumexp(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softplus(x):
  return np.logaddexp(0.0, x)


def infonce(q, k, temperature=0.1, negatives=None, in_batch_negatives=True):
  q, k = normalize(q), normalize(k)
  b = q.shape[0]
  total = 0.0
  for i in range(b):
    logits = []
    if in_batch_negatives:
      logits += [q[i] @ k[j] for j in range(b)]
    else:
      logits.append(q[i] @ k[i])
    if negatives is not None:
      n = normalize(negatives)
      rows = n if n.ndim == 2 else n[i]
      logits += [q[i] @ r for r in rows]
    logits = np.array(logits) / temperature
    total += -(q[i] @ k[i]) / temperature + logsumexp(logits)
  return total / b


def nt_xent(z1, z2, temperature=0.5):
  z = normalize(np.concatenate([z1, z2]))
  n = z.shape[0]
  b = n // 2
  total = 0.0
  for i in range(n):
    p = (i + b) % n
    logits = np.array([z[i] @ z[j] for j in range(n) if j != i]) / temperature
    total += -(z[i] @ z[p]) / temperature + logsumexp(logits)
  return total / n


def dcl(z1, z2, temperature=0.1, weights=None):
  z = normalize(np.concatenate([z1, z2]))
  n = z.shape[0]
  b = n // 2
  w = np.ones(n) if weights is None else np.concatenate([weights, weights])
  total = 0.0
  for i in range(n):
    p = (i + b) % n
    logits = np.array([z[i] @ z[j] for j in range(n) if j not in (i, p)]) / temperature
    total += -w[i] * (z[i] @ z[p]) / temperature + logsumexp(logits)
  return total / n


def dclw(z1, z2, temperature=0.1, sigma=0.5):
  a, b = normalize(z1), normalize(z2)
  pos = np.sum(a * b, axis=1) / sigma
  soft = np.exp(pos - pos.max()) / np.sum(np.exp(pos - pos.max()))
  return dcl(z1, z2, temperature, weights=2.0 - len(pos) * soft)


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


def numerical_grad(f, x, eps=1e-6):
  """Central differences of a scalar float64 function at x."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    old = x[idx]
    x[idx] = old + eps
    up = f(x)
    x[idx] = old - eps
    down = f(x)
    x[idx] = old
    g[idx] = (up - down) / (2 * eps)
  return g
