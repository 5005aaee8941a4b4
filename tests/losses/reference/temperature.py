"""Float64 NumPy references for jaxcl/losses/temperature.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


# ---------------------------------------------------------------------------------------------- MACL
def ref_macl(z1, z2, t0, alpha, a0, reweight, frozen=None):
  """Huang et al. (2023) with explicit loops; `frozen` = (A, V) held fixed (their stop-gradients)."""
  z = normalize(np.concatenate([z1, z2]))
  n = len(z)
  partner = [(i + n // 2) % n for i in range(n)]
  a_mag = np.mean([z[i] @ z[partner[i]] for i in range(n)]) if frozen is None else frozen[0]
  tau = t0 * (1 + alpha * (a_mag - a0))
  total, weights = 0.0, []
  for i in range(n):
    logits = np.array([z[i] @ z[j] for j in range(n) if j != i]) / tau
    log_p = z[i] @ z[partner[i]] / tau - logsumexp(logits)
    v = 1.0 / (1.0 - np.exp(log_p)) if reweight else 1.0
    weights.append(v)
    w = v if frozen is None else frozen[1][i]
    total += -w * log_p
  if frozen is None:
    return total / n, (a_mag, weights)
  return total / n


# --------------------------------------------------------------------------------------------- focal
def ref_focal(img, txt, scale, gamma):
  s = scale * normalize(img) @ normalize(txt).T
  total = 0.0
  for m in (s, s.T):
    for i in range(len(m)):
      p = np.exp(m[i, i] - logsumexp(m[i]))
      total += -((1 - p) ** gamma) * np.log(p) / len(m)
  return total / 2


# -------------------------------------------------------------------------------------------- iSogCLR
def ref_isogclr_step(z1, z2, ids, state, gamma, rho, eta, beta, tau_min, tau_max):
  """LibAUC GCLoss_v1 (enable_isogclr) with explicit loops. Returns the loss, the weights it holds
  fixed (for the gradient) and the new state."""
  u_all, tau_all, tg_all = (np.array(s, np.float64) for s in state)
  z = normalize(np.concatenate([z1, z2]))
  b = len(z1)
  n_neg = 2 * (b - 1)
  loss, weights, u_views, grad_views = 0.0, {}, [], []
  for a in range(2 * b):
    i = a % b
    tau = tau_all[ids[i]]
    p = (a + b) % (2 * b)
    negs = [j for j in range(2 * b) if j % b != i]
    c = {j: z[a] @ z[j] for j in negs}
    g = sum(np.exp(c[j] / tau) for j in negs) / n_neg
    u_old = u_all[ids[i]]
    u = g if u_old == 0 else (1 - gamma) * u_old + gamma * g
    w = {j: np.exp(c[j] / tau) / u for j in negs}
    weights[a] = w
    loss += -(z[a] @ z[p]) + sum(w[j] * c[j] for j in negs) / n_neg
    u_views.append(u)
    grad_views.append(np.log(u) + rho - sum(w[j] * c[j] / tau for j in negs) / n_neg)
  new_u, new_tau, new_tg = u_all.copy(), tau_all.copy(), tg_all.copy()
  for i in range(b):
    new_u[ids[i]] = (u_views[i] + u_views[i + b]) / 2
    gt = (grad_views[i] + grad_views[i + b]) / 2
    new_tg[ids[i]] = (1 - beta) * tg_all[ids[i]] + beta * gt
    new_tau[ids[i]] = np.clip(tau_all[ids[i]] - eta * new_tg[ids[i]], tau_min, tau_max)
  return loss / (2 * b), weights, (new_u, new_tau, new_tg)  # mean over the 2B anchors


def ref_isogclr_surrogate(z1, z2, weights):
  """−c_pos + Σ_j w_j c_aj / n with the weights frozen: its gradient is iSogCLR's gradient estimate."""
  z = normalize(np.concatenate([z1, z2]))
  b = len(z1)
  total = 0.0
  for a in range(2 * b):
    w = weights[a]
    total += -(z[a] @ z[(a + b) % (2 * b)]) + sum(w[j] * (z[a] @ z[j]) for j in w) / (2 * (b - 1))
  return total / (2 * b)


# ---------------------------------------------------------------------------------------------- AMCL
def ref_amcl(z1, z2, tau, beta, top_k):
  """Wang et al. (2024) per head and anchor with loops (the authors' AMCLNTXentLoss layout)."""
  b, h, d = z1.shape
  total = 0.0
  for head in range(h):
    z = normalize(np.concatenate([z1[:, head], z2[:, head]]))
    n = 2 * b
    for a in range(n):
      p = (a + b) % n
      negs = [j for j in range(n) if j not in (a, p)]
      c = {j: z[a] @ z[j] for j in negs}
      t = tau[head, a]
      if top_k is None:
        kept = negs
        neg = logsumexp(np.array([c[j] / t[j] for j in kept]))
      else:
        kept = sorted(negs, key=lambda j: -c[j])[:top_k]
        neg = np.mean([c[j] / t[j] for j in kept])
      omega = 0.5 * d * np.log(t[p]) + 1.0 / t[p]
      reg = sum(np.log(t[j]) + 1.0 / t[j] for j in kept)
      total += (-(z[a] @ z[p]) / t[p] + beta * omega + neg - beta * reg) / n
  return total


# ---------------------------------------------------------------------------------- iSogCLR, bimodal
def ref_isogclr_clip_step(image, text, ids, state, gamma, rho, eta, beta, tau_min, tau_max):
  """LibAUC GCLoss_v2 (enable_isogclr) with explicit loops, u in the linear domain (float64) and the
  loss divided by B − 1 (see isogclr_clip). `state` = (image_u, image_tau, image_tau_grad, text_u,
  text_tau, text_tau_grad) with u = 0 for unseen ids. Returns the loss, the weights it holds fixed and
  the new state."""
  img, txt = normalize(image), normalize(text)
  c = img @ txt.T
  b = len(c)
  arrays = [np.array(s, np.float64) for s in state]
  new = [a.copy() for a in arrays]
  loss, weights = 0.0, []
  for direction, m in enumerate((c, c.T)):
    u_all, tau_all, tg_all = arrays[3 * direction: 3 * direction + 3]
    for i in range(b):
      tau = tau_all[ids[i]]
      h = {j: m[i, j] - m[i, i] for j in range(b) if j != i}
      g = sum(np.exp(h[j] / tau) for j in h) / (b - 1)
      u = g if u_all[ids[i]] == 0 else (1 - gamma) * u_all[ids[i]] + gamma * g
      w = {j: np.exp(h[j] / tau) / u for j in h}
      weights.append(w)
      loss += sum(w[j] * h[j] for j in h) / (b - 1)
      grad_tau = np.log(u) + rho - sum(w[j] * h[j] / tau for j in h) / (b - 1)
      tg = (1 - beta) * tg_all[ids[i]] + beta * grad_tau
      new[3 * direction][ids[i]] = u
      new[3 * direction + 2][ids[i]] = tg
      new[3 * direction + 1][ids[i]] = np.clip(tau - eta * tg, tau_min, tau_max)
  return loss / (2 * b), weights, new


def ref_isogclr_clip_surrogate(image, text, weights):
  """mean over the 2B anchors of Σ_j w_ij (c_ij − c_ii) / (B − 1) with the weights frozen."""
  c = normalize(image) @ normalize(text).T
  b = len(c)
  total = 0.0
  for direction, m in enumerate((c, c.T)):
    for i in range(b):
      w = weights[direction * b + i]
      total += sum(w[j] * (m[i, j] - m[i, i]) for j in w) / (b - 1)
  return total / (2 * b)


def ref_isogclr_clip_objective_term(image, text, i, tau, rho):
  """The i-th image term of F: τ log mean_{j≠i} exp((c_ij − c_ii)/τ) + τ ρ (for d/dτ by differences)."""
  c = normalize(image) @ normalize(text).T
  h = np.array([c[i, j] - c[i, i] for j in range(len(c)) if j != i])
  return tau * np.log(np.mean(np.exp(h / tau))) + tau * rho
