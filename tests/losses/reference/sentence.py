"""Float64 NumPy references for jaxcl/losses/sentence.py: SimCSE, DiffCSE, miCSE, MCSE and Quick-Thoughts.

Written from the released code's formulas (the full logit matrices, the targets as matrices, explicit
loops), sharing no code with jaxcl.
"""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


def cross_entropy(logits, targets):
  """mean_i −Σ_j T_ij log softmax_j(logits_i)."""
  log_p = logits - logsumexp(logits, axis=1)[:, None]
  return float(np.mean(-np.sum(targets * log_p, axis=1)))


def simcse(z1, z2, z3=None, temperature=0.05, hard_negative_weight=0.0):
  """princeton-nlp/SimCSE cl_forward: cos_sim = [cos(z1, z2) | cos(z1, z3) + w·I] / temp, CE with
  labels arange(B)."""
  z1, z2 = normalize(z1), normalize(z2)
  logits = z1 @ z2.T / temperature
  b = z1.shape[0]
  if z3 is not None:
    hard = normalize(z3)
    logits = np.concatenate([logits, z1 @ hard.T / temperature + hard_negative_weight * np.eye(b)], axis=1)
  targets = np.zeros_like(logits)
  targets[np.arange(b), np.arange(b)] = 1.0
  return cross_entropy(logits, targets)


def diffcse(z1, z2, rtd_logits, replaced, temperature=0.05, rtd_weight=0.005, token_mask=None):
  """SimCSE + λ · the 2-class cross-entropy of the ELECTRA head with logits (0, x) per counted token."""
  x = np.asarray(rtd_logits, np.float64).reshape(-1)
  y = np.asarray(replaced).reshape(-1).astype(int)
  m = np.ones_like(x) if token_mask is None else np.asarray(token_mask).reshape(-1).astype(np.float64)
  two_class = np.stack([np.zeros_like(x), x], axis=1)
  log_p = two_class - logsumexp(two_class, axis=1)[:, None]
  token_loss = -log_p[np.arange(x.size), y]
  return simcse(z1, z2, temperature=temperature) + rtd_weight * float(np.sum(m * token_loss) / np.sum(m))


def attention_mi(attention1, attention2):
  """miCSE's regulariser −c · mean_r I_r over the rows r (the middle axes), every entry where both > 0."""
  b, p = attention1.shape[0], attention1.shape[-1]
  x_all = np.asarray(attention1, np.float64).reshape(b, -1, p)
  y_all = np.asarray(attention2, np.float64).reshape(b, -1, p)
  informations, kept = [], 0
  for x_row, y_row in zip(x_all.reshape(-1, p), y_all.reshape(-1, p)):
    keep = (x_row > 0) & (y_row > 0)
    kept += keep.sum()
    x, y = np.log(x_row[keep]), np.log(y_row[keep])
    x, y = x - x.mean(), y - y.mean()
    rho = float(x @ y) / (max(np.linalg.norm(x), 1e-6) * max(np.linalg.norm(y), 1e-6))
    informations.append(-0.5 * np.log(max(1.0 - rho**2, 1e-6)))
  scale = (kept / x_all.size) ** 2 + 1e-6
  return -np.mean(informations) * scale


def micse(z1, z2, attention1, attention2, temperature=0.05, mi_weight=0.011):
  return simcse(z1, z2, temperature=temperature) + mi_weight * attention_mi(attention1, attention2)


def mcse(z1, z2, g1, g2, image, temperature=0.05, grounding_temperature=0.05, grounding_weight=0.01):
  """uds-lsv/MCSE compute_loss: intra (SimCSE) + λ · ½ (CE(cos(p1, v)/τ_vl) + CE(cos(p2, v)/τ_vl))."""
  inter = 0.5 * (simcse(g1, image, temperature=grounding_temperature)
                 + simcse(g2, image, temperature=grounding_temperature))
  return simcse(z1, z2, temperature=temperature) + grounding_weight * inter


def quick_thoughts(inputs, contexts, context_size=1, temperature=1.0, normalize_inputs=False):
  """lajanugen/S2V build_loss: scores with the diagonal set to 0, targets Σ_k eye(B, k) over the
  offsets 0 < |k| <= c, row-normalised; softmax cross-entropy, mean over the rows."""
  f, g = np.asarray(inputs, np.float64), np.asarray(contexts, np.float64)
  if normalize_inputs:
    f, g = normalize(f), normalize(g)
  b = f.shape[0]
  scores = f @ g.T / temperature
  np.fill_diagonal(scores, 0.0)
  targets = np.zeros((b, b))
  for k in range(-context_size, context_size + 1):
    if k != 0:
      targets += np.eye(b, k=k)
  targets /= targets.sum(axis=1, keepdims=True)
  return cross_entropy(scores, targets)
