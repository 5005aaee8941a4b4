"""Float64 NumPy references for jaxcl/losses/sparse_coding.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses import reference


# ---------------------------------------------------------------------------- float64 references (loops)
def ref_topk(pre, k, valid=None):
  """ReLU of the k largest entries of each row among the valid columns, zeros elsewhere."""
  pre = np.asarray(pre, np.float64)
  out = np.zeros_like(pre)
  for i in range(pre.shape[0]):
    candidates = [h for h in range(pre.shape[1]) if valid is None or valid[h]]
    for h in sorted(candidates, key=lambda h: -pre[i, h])[:k]:
      out[i, h] = max(pre[i, h], 0.0)
  return out


def ref_parts(x, pos, w, b_enc, b_pre, w_dec, *, k, steps=None, threshold=10, multi_k=4, aux_k=512,
              tau=0.2, form="nt_xent", detached=None):
  """(L(k), L(m·k), L_aux, L_cl, codes of the rows, new steps). `detached` replaces sg(z_k W_dec)."""
  rows = x if pos is None else np.concatenate([x, pos])
  n, d = rows.shape
  hidden = w.shape[1]
  pre = np.array([[sum((rows[i, j] - b_pre[j]) * w[j, h] for j in range(d)) + b_enc[h]
                   for h in range(hidden)] for i in range(n)])
  zk = ref_topk(pre, k)
  mse = lambda a, b: np.mean((a - b) ** 2)
  loss_k = mse(rows, zk @ w_dec + b_pre)
  zm = ref_topk(pre, min(multi_k * k, hidden))
  loss_m = mse(rows, zm @ w_dec + b_pre)
  steps = np.zeros(hidden, np.int64) if steps is None else np.asarray(steps)
  new_steps = np.array([0 if any(zm[i, h] > 1e-5 for i in range(n)) else steps[h] + 1
                        for h in range(hidden)])
  dead = new_steps >= threshold
  zaux = ref_topk(pre, min(aux_k, hidden), valid=dead)
  e = rows - (zk @ w_dec if detached is None else detached)
  den = mse(e, e.mean(axis=0, keepdims=True))
  loss_aux = mse(zaux @ w_dec + b_pre, e) / den if den > 0 else 0.0
  z1 = zk[: len(x)]
  z2 = z1 if pos is None else zk[len(x):]
  cl = reference.infonce.nt_xent(z1, z2, tau) if form == "nt_xent" else reference.infonce.infonce(z1, z2, tau)
  return loss_k, loss_m, loss_aux, cl, zk, new_steps


def ref_csr(*args, multi_k_weight=1 / 8, aux_weight=1 / 32, gamma=0.1, **kwargs):
  loss_k, loss_m, loss_aux, cl, _, _ = ref_parts(*args, **kwargs)
  return loss_k + multi_k_weight * loss_m + aux_weight * loss_aux + gamma * cl
