"""Float64 NumPy references for jaxcl/losses/classification.py: CatLIP (and its targets) and UNPG.

Written from the papers' formulas and the released code's steps with explicit loops, sharing no code
with jaxcl.
"""

from __future__ import annotations

import numpy as np


def catlip(logits, targets):
  """Mean over images of Σ_c −[t log σ(z) + (1 − t) log σ(−z)] (corenet's "batch_mean" BCE)."""
  z, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  return np.mean(np.sum(-(t * log_sigmoid(z) + (1 - t) * log_sigmoid(-z)), axis=1))


def catlip_targets(token_ids, vocabulary, num_classes):
  """corenet's `targets[labels] = 1` per caption, one caption at a time."""
  out = np.zeros((len(token_ids), num_classes))
  for i, caption in enumerate(token_ids):
    labels = [vocabulary[w] for w in caption if vocabulary[w] >= 0]
    out[i, labels] = 1.0
  return out


def unpg(features, labels, class_weights, scale, margin, margin_type="arcface", whisker=1.5):
  """UNPG as the released code computes it: margin cosines, the upper-triangle negative pairs, the
  box-and-whisker filter on their sorted values, one cross-entropy over [class logits, kept pairs]."""
  x = features / np.linalg.norm(features, axis=1, keepdims=True)
  w = class_weights / np.linalg.norm(class_weights, axis=1, keepdims=True)
  cosine = x @ w.T
  b = len(labels)
  for i in range(b):
    c = cosine[i, labels[i]]
    cosine[i, labels[i]] = np.cos(np.arccos(c) + margin) if margin_type == "arcface" else c - margin
  pairs = np.array([x[i] @ x[j] for i in range(b) for j in range(i + 1, b) if labels[i] != labels[j]])
  if whisker is not None and len(pairs):
    ordered = np.sort(pairs)
    q1, q3 = ordered[int(0.25 * len(pairs))], ordered[int(0.75 * len(pairs))]
    low, high = q1 - whisker * (q3 - q1), q3 + whisker * (q3 - q1)
    pairs = ordered[(ordered >= low) & (ordered <= high)]
  losses = []
  for i in range(b):
    logits = scale * np.concatenate([cosine[i], pairs])
    top = logits.max()
    losses.append(top + np.log(np.sum(np.exp(logits - top))) - logits[labels[i]])
  return np.mean(losses)
