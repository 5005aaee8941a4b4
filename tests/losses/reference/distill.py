"""Float64 NumPy references for jaxcl/losses/distill.py, written from the papers' formulas with explicit
loops, sharing no code with jaxcl."""

from __future__ import annotations

import numpy as np

from tests.losses.reference.common import logsumexp, normalize


# ------------------------------------------------------------------------------ float64 references
norm = normalize


def log_softmax(x, axis):
  return x - np.expand_dims(logsumexp(x, axis=axis), axis)


def ref_albef(image, text, m_image, m_text, tau, alpha, teacher_tau=None):
  """Cross-entropy against (1 − α) one-hot + α momentum softmax, both directions, full matrices."""
  teacher_tau = tau if teacher_tau is None else teacher_tau
  s = norm(image) @ norm(text).T / tau
  sm = norm(m_image) @ norm(m_text).T / teacher_tau
  eye = np.eye(s.shape[0])
  q_rows = np.exp(log_softmax(sm, 1))
  q_cols = np.exp(log_softmax(sm, 0))
  t_rows = (1 - alpha) * eye + alpha * q_rows
  t_cols = (1 - alpha) * eye + alpha * q_cols
  i2t = -np.sum(t_rows * log_softmax(s, 1), axis=1).mean()
  t2i = -np.sum(t_cols * log_softmax(s, 0), axis=0).mean()
  return 0.5 * (i2t + t2i)


def ref_albef_candidates(image, text, m_image, m_text, text_cands, image_cands, tau, alpha):
  """ALBEF's code in float64: sim_i2t = image @ text_all, targets from m_image @ text_all, and likewise
  t2i = text @ image_all with targets from m_text @ image_all; one-hot on the first B columns."""
  b = image.shape[0]
  tc, ic = norm(text_cands), norm(image_cands)

  def direction(q, teacher_q, cands):
    s = norm(q) @ cands.T / tau
    one_hot = np.zeros_like(s)
    one_hot[np.arange(b), np.arange(b)] = 1.0
    targets = (1 - alpha) * one_hot + alpha * np.exp(log_softmax(norm(teacher_q) @ cands.T / tau, 1))
    return -np.sum(log_softmax(s, 1) * targets, axis=1).mean()

  return 0.5 * (direction(image, m_image, tc) + direction(text, m_text, ic))


def ref_similarity_kd(student, teacher, s_anchors=None, t_anchors=None, tau=0.04, teacher_tau=None):
  """mean_i KL(p^T_i || p^S_i) with explicit loops over the anchors."""
  teacher_tau = tau if teacher_tau is None else teacher_tau
  s, t = norm(student), norm(teacher)
  in_batch = s_anchors is None
  sa, ta = (s, t) if in_batch else (norm(s_anchors), norm(t_anchors))
  total = 0.0
  for i in range(s.shape[0]):
    js = [j for j in range(sa.shape[0]) if not (in_batch and j == i)]
    ls = np.array([s[i] @ sa[j] for j in js]) / tau
    lt = np.array([t[i] @ ta[j] for j in js]) / teacher_tau
    log_ps, log_pt = ls - logsumexp(ls), lt - logsumexp(lt)
    total += np.sum(np.exp(log_pt) * (log_pt - log_ps))
  return total / s.shape[0]


def ref_m3co(mixed, other, mix_index, lam, tau, bidirectional=True):
  """The authors' `mixco_nce`: target matrix T (λ_i at i, 1 − λ_i at k_i), row cross-entropy, and with
  `bidirectional` the mean with the cross-entropy of Sᵀ against Tᵀ (here T_ii = 1 when k_i = i)."""
  s = norm(mixed) @ norm(other).T / tau
  b = s.shape[0]
  lam = np.broadcast_to(np.asarray(lam, np.float64), (b,))
  probs = np.zeros((b, b))
  for i in range(b):
    probs[i, i] += lam[i]
    probs[i, mix_index[i]] += 1 - lam[i]
  row = -np.sum(log_softmax(s, 1) * probs, axis=1).mean()
  if not bidirectional:
    return row
  col = -np.sum(log_softmax(s.T, 1) * probs.T, axis=1).mean()
  return 0.5 * (row + col)


def ref_softclip(image, text, fine_i, fine_t, tau, t_tau, alpha, beta):
  """Full-matrix SoftCLIP: soft-target CE both ways + KL over renormalised negatives both ways."""
  s = norm(image) @ norm(text).T / tau
  qi = np.exp(log_softmax(norm(fine_i) @ norm(fine_i).T / t_tau, 1))
  qt = np.exp(log_softmax(norm(fine_t) @ norm(fine_t).T / t_tau, 1))
  b = s.shape[0]
  eye = np.eye(b)
  t_rows, t_cols = (1 - alpha) * eye + alpha * qi, (1 - alpha) * eye + alpha * qt
  soft = 0.5 * (-np.sum(t_rows * log_softmax(s, 1), 1).mean() - np.sum(t_cols.T * log_softmax(s, 0), 0).mean())

  def neg_kl(target_logits, student_logits):
    total = 0.0
    for i in range(b):
      lt = np.delete(target_logits[i], i)
      ls = np.delete(student_logits[i], i)
      lpt, lps = lt - logsumexp(lt), ls - logsumexp(ls)
      total += np.sum(np.exp(lpt) * (lpt - lps))
    return total / b

  li = norm(fine_i) @ norm(fine_i).T / t_tau
  lt = norm(fine_t) @ norm(fine_t).T / t_tau
  return soft + beta * 0.5 * (neg_kl(li, s) + neg_kl(lt, s.T))
