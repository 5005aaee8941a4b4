"""Float64 NumPy references for jaxcl/losses/infonce.py: InfoNCE, NT-Xent, DCL and DCLW.

Written from the papers' formulas with explicit loops or full matrices, sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


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
