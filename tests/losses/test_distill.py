"""Tests of jaxcl/losses/distill.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.losses import _soft_targets
from jaxcl.losses.clip import clip
from jaxcl.losses.distill import albef_itc, m3co, similarity_distillation, softclip
from jaxcl.losses.infonce import infonce
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.distill import ref_albef, ref_albef_candidates, ref_m3co, ref_similarity_kd, ref_softclip


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# ------------------------------------------------------------------------------ float64 references
norm = reference.common.normalize


def log_softmax(x, axis):
  return x - np.expand_dims(reference.common.logsumexp(x, axis=axis), axis)


# ------------------------------------------------------------------------------------------ ALBEF
@pytest.mark.parametrize("b,d,tau,alpha", [(5, 4, 0.07, 0.4), (3, 6, 0.5, 1.0), (6, 3, 0.2, 0.0)])
def test_albef_matches_reference(b, d, tau, alpha):
  mi, mt = randn(1, b, d), randn(2, b, d)
  assert_value_and_grads(
      lambda i, t: albef_itc(i, t, mi, mt, temperature=tau, alpha=alpha),
      lambda i, t: ref_albef(i, t, mi, mt, tau, alpha),
      [randn(3, b, d), randn(4, b, d)],
  )


@pytest.mark.parametrize("b,n_extra,tau,alpha", [(5, 3, 0.07, 0.4), (4, 0, 0.5, 1.0), (3, 4, 0.2, 0.0)])
def test_albef_candidates_match_albefs_code(b, n_extra, tau, alpha):
  # ALBEF's pairing: image vs momentum text candidates, text vs momentum image candidates (+ a queue).
  d = 4
  mi, mt = randn(70, b, d), randn(71, b, d)
  tc = np.concatenate([mt, randn(72, n_extra, d)])
  ic = np.concatenate([mi, randn(73, n_extra + 1, d)])  # queues of different lengths are fine
  assert_value_and_grads(
      lambda i, t: albef_itc(i, t, mi, mt, text_candidates=tc, image_candidates=ic, temperature=tau, alpha=alpha),
      lambda i, t: ref_albef_candidates(i, t, mi, mt, tc, ic, tau, alpha),
      [randn(74, b, d), randn(75, b, d)],
  )


def test_albef_candidates_carry_no_gradient_and_temperature_skips_the_targets():
  i, t, mi, mt, q = (randn(k, 4, 3) for k in range(76, 81))
  tc, ic = np.concatenate([mt, q]), np.concatenate([mi, q[::-1]])
  loss = lambda i, t, mi, mt, tc, ic, tau=0.3: albef_itc(
      i, t, mi, mt, text_candidates=tc, image_candidates=ic, temperature=tau
  )
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(i, t, mi, mt, tc, ic)
  assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in grads[:2])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads[2:])
  # d/dτ: the student logits only (the target temperature is a constant, 0.3).
  g = jax.jit(jax.grad(lambda tau: loss(i, t, mi, mt, tc, ic, tau)))(0.3)

  def ref(tau):
    s_i, s_t = norm(i) @ norm(tc).T / tau, norm(t) @ norm(ic).T / tau
    t_i = 0.6 * np.eye(4, 8) + 0.4 * np.exp(log_softmax(norm(mi) @ norm(tc).T / 0.3, 1))
    t_t = 0.6 * np.eye(4, 8) + 0.4 * np.exp(log_softmax(norm(mt) @ norm(ic).T / 0.3, 1))
    return 0.5 * (-np.sum(t_i * log_softmax(s_i, 1), 1).mean() - np.sum(t_t * log_softmax(s_t, 1), 1).mean())

  np.testing.assert_allclose(float(g), reference.common.numerical_grad(lambda x: ref(x[()]), np.array(0.3)), rtol=1e-4)


def test_albef_candidates_equal_the_single_matrix_value_when_the_momentum_model_is_the_trained_one():
  i, t = randn(82, 6, 5), randn(83, 6, 5)
  loss = jax.jit(lambda *xs, **kw: albef_itc(*xs, temperature=0.2, alpha=0.4, **kw))
  single = loss(i, t, i, t)
  paired = loss(i, t, i, t, text_candidates=t, image_candidates=i)
  np.testing.assert_allclose(float(paired), float(single), rtol=1e-6)


def test_albef_candidates_without_distillation_are_two_infonces_with_queues():
  i, t, mi, mt = (randn(k, 5, 4) for k in range(84, 88))
  q_t, q_i = randn(88, 3, 4), randn(89, 6, 4)
  got = jax.jit(
      lambda a, b: albef_itc(
          a, b, mi, mt, text_candidates=jnp.concatenate([mt, q_t]), image_candidates=jnp.concatenate([mi, q_i]),
          temperature=0.1, alpha=0.0,
      )
  )(i, t)
  nce = functools.partial(infonce, temperature=0.1)
  want = jax.jit(lambda a, b: 0.5 * (nce(a, mt, negatives=q_t) + nce(b, mi, negatives=q_i)))(i, t)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_albef_temperature_gradient_skips_the_targets():
  # τ is learnt in ALBEF, but the momentum targets are computed without gradient: d/dτ must treat the
  # target temperature as a constant.
  i, t, mi, mt = (randn(k, 4, 3) for k in range(10, 14))
  g = jax.jit(jax.grad(lambda tau: albef_itc(i, t, mi, mt, temperature=tau)))(0.3)
  want = reference.common.numerical_grad(lambda x: ref_albef(i, t, mi, mt, x[()], 0.4, teacher_tau=0.3), np.array(0.3))
  np.testing.assert_allclose(float(g), want, rtol=1e-4)
  g_teacher = jax.jit(jax.grad(lambda a, b: albef_itc(i, t, a, b), argnums=(0, 1)))(mi, mt)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g_teacher)


def test_albef_without_distillation_is_clip():
  i, t, mi, mt = (randn(k, 6, 5) for k in range(20, 24))
  got = jax.jit(lambda *xs: albef_itc(*xs, temperature=0.1, alpha=0.0))(i, t, mi, mt)
  want = jax.jit(lambda a, b: clip(a, b, logit_scale=10.0))(i, t)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_albef_is_affine_in_alpha():
  # The mixed targets are affine in α and the loss is linear in the targets.
  i, t, mi, mt = (randn(k, 5, 4) for k in range(30, 34))
  loss = jax.jit(lambda a: albef_itc(i, t, mi, mt, temperature=0.2, alpha=a))
  l0, l1, l4 = float(loss(0.0)), float(loss(1.0)), float(loss(0.4))
  np.testing.assert_allclose(l4, 0.6 * l0 + 0.4 * l1, rtol=1e-5)
  assert abs(l1 - l0) > 1e-3


# --------------------------------------------------------------------------- similarity distillation
@pytest.mark.parametrize("b,ds,dt,tau,t_tau", [(5, 4, 6, 0.2, None), (4, 3, 3, 0.5, 0.1)])
def test_similarity_distillation_in_batch_matches_reference(b, ds, dt, tau, t_tau):
  teacher = randn(5, b, dt)
  assert_value_and_grads(
      lambda s: similarity_distillation(s, teacher, temperature=tau, teacher_temperature=t_tau),
      lambda s: ref_similarity_kd(s, teacher, tau=tau, teacher_tau=t_tau),
      [randn(6, b, ds)],
  )


def test_similarity_distillation_with_anchors_matches_reference():
  teacher, t_anchors = randn(7, 3, 5), randn(8, 6, 5)
  assert_value_and_grads(
      lambda s, sa: similarity_distillation(
          s, teacher, student_anchors=sa, teacher_anchors=t_anchors, temperature=0.3, teacher_temperature=0.2
      ),
      lambda s, sa: ref_similarity_kd(s, teacher, sa, t_anchors, tau=0.3, teacher_tau=0.2),
      [randn(9, 3, 4), randn(10, 6, 4)],
  )


def test_similarity_distillation_is_zero_for_an_identical_student_and_positive_otherwise():
  x = randn(11, 6, 4)
  rot = np.linalg.qr(randn(12, 4, 4).astype(np.float64))[0].astype(np.float32)
  loss = jax.jit(lambda s, t: similarity_distillation(s, t, temperature=0.1))
  # A rotated copy has the same similarities: the same distributions.
  np.testing.assert_allclose(float(loss(x @ rot, x)), 0.0, atol=2e-6)
  assert float(loss(randn(13, 6, 4), x)) > 1e-3


def test_similarity_distillation_with_a_one_hot_teacher_is_infonce():
  # Teacher anchors = the teacher batch and τ_T → 0: p^T_i is one-hot on anchor i, so the KL is the
  # cross-entropy −log softmax_i(S_i·), i.e. InfoNCE of the student against the student anchors.
  # Orthogonal teacher rows: off-anchor weights exp(-1/τ_T) vanish.
  s, sa, t = randn(14, 5, 4), randn(15, 5, 4), np.eye(5, 8, dtype=np.float32) * randn(16, 5, 1)**2
  got = jax.jit(
      lambda *xs: similarity_distillation(
          xs[0], xs[2], student_anchors=xs[1], teacher_anchors=xs[2], temperature=0.2,
          teacher_temperature=1e-2,
      )
  )(s, sa, t)
  want = jax.jit(lambda a, b: infonce(a, b, temperature=0.2))(s, sa)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


# ---------------------------------------------------------------------------------------- SoftCLIP
@pytest.mark.parametrize("tau,t_tau,alpha,beta", [(0.07, 0.07, 0.2, 1.0), (0.5, 0.2, 0.7, 0.3), (0.2, 1.0, 1.0, 0.0)])
def test_softclip_matches_reference(tau, t_tau, alpha, beta):
  fi, ft = randn(60, 5, 6), randn(61, 5, 3)
  assert_value_and_grads(
      lambda i, t: softclip(i, t, fi, ft, temperature=tau, target_temperature=t_tau, alpha=alpha, beta=beta),
      lambda i, t: ref_softclip(i, t, fi, ft, tau, t_tau, alpha, beta),
      [randn(62, 5, 4), randn(63, 5, 4)],
  )


def test_softclip_reduces_to_clip_and_to_albef():
  i, t, x, y = randn(64, 6, 4), randn(65, 6, 4), randn(66, 6, 4), randn(67, 6, 3)
  hard = jax.jit(lambda a, b: softclip(a, b, x, y, temperature=0.1, alpha=0.0, beta=0.0))(i, t)
  want = jax.jit(lambda a, b: clip(a, b, logit_scale=10.0))(i, t)
  np.testing.assert_allclose(float(hard), float(want), rtol=1e-6)
  # Both fine features equal to x: the soft targets are ALBEF's with the momentum pair (x, x).
  soft = jax.jit(lambda a, b: softclip(a, b, x, x, temperature=0.2, target_temperature=0.2, alpha=0.6, beta=0.0))(i, t)
  albef = jax.jit(lambda a, b: albef_itc(a, b, x, x, temperature=0.2, alpha=0.6))(i, t)
  np.testing.assert_allclose(float(soft), float(albef), rtol=1e-6)
  # The negatives term is a KL: >= 0, and 0 when the student's negatives match the targets'.
  with_neg = jax.jit(lambda a, b: softclip(a, b, x, y, temperature=0.2, alpha=0.0, beta=1.0))(i, t)
  assert float(with_neg) > float(jax.jit(lambda a, b: clip(a, b, logit_scale=5.0))(i, t))


# ------------------------------------------------------------------------------------------ M3Co
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    "lam,idx",
    [
        (0.3, np.array([3, 0, 4, 1, 2])),
        (np.array([0.1, 0.9, 0.5, 0.0, 1.0], np.float32), np.array([3, 0, 4, 1, 2])),
        # not a permutation: column 3 and 1 receive two partners, row 2 is mixed with itself
        (np.array([0.2, 0.7, 0.4, 0.6, 0.9], np.float32), np.array([3, 3, 2, 1, 1])),
    ],
)
def test_m3co_matches_the_authors_mixco_nce(lam, idx, bidirectional):
  assert_value_and_grads(
      lambda m, o: m3co(m, o, mix_index=idx, mix_weight=lam, temperature=0.2, bidirectional=bidirectional),
      lambda m, o: ref_m3co(m, o, idx, lam, 0.2, bidirectional),
      [randn(17, 5, 4), randn(18, 5, 4)],
  )


def test_m3co_without_mixing_is_clip_and_its_row_term_infonce():
  m, o = randn(19, 6, 4), randn(20, 6, 4)
  perm = np.random.default_rng(0).permutation(6)
  for bidirectional, want in (
      (True, float(jax.jit(lambda a, b: clip(a, b, logit_scale=10.0))(m, o))),
      (False, float(jax.jit(lambda a, b: infonce(a, b, temperature=0.1))(m, o))),
  ):
    loss = jax.jit(lambda a, b, idx, lam: m3co(a, b, mix_index=idx, mix_weight=lam, bidirectional=bidirectional))
    np.testing.assert_allclose(float(loss(m, o, perm, 1.0)), want, rtol=1e-6)  # λ = 1
    np.testing.assert_allclose(float(loss(m, o, np.arange(6), 0.3)), want, rtol=1e-6)  # k = identity


def test_m3co_column_weights_sum_to_the_batch():
  # Σ_j w_j = Σ_ij T_ij = B: with equal column log-sum-exps L, col = L − linear part = row.
  x = np.eye(3, dtype=np.float32)  # S = I/τ: every column has the same log-sum-exp
  loss = lambda bidi: float(m3co(x, x, mix_index=np.array([1, 1, 1]), mix_weight=0.25, temperature=0.5,
                                 bidirectional=bidi))
  np.testing.assert_allclose(loss(True), loss(False), rtol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_m3co_mix_weight_gradient_under_jit(bidirectional):
  # A per-row λ: the gradient flows through the row targets and the scatter-added column weights.
  m, o, idx = randn(21, 4, 3), randn(22, 4, 3), np.array([1, 2, 1, 0])
  lam = np.array([0.4, 0.8, 0.1, 0.6])
  g = jax.jit(jax.grad(lambda lam: m3co(m, o, mix_index=idx, mix_weight=lam, bidirectional=bidirectional)))(lam)
  want = reference.common.numerical_grad(lambda x: ref_m3co(m, o, idx, x, 0.1, bidirectional), lam)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- tiled soft-target contraction
@pytest.mark.parametrize("exclude_self,tile", [(False, 2), (True, 3), (True, 7), (False, 100)])
def test_expected_dot_tiles_match_dense(exclude_self, tile):
  # Widths that do and do not divide the 7 columns (padding), one tile, and the diagonal mask.
  tq, tk, q, k = randn(23, 7, 5), randn(24, 7, 5), randn(25, 7, 3), randn(26, 7, 3)
  ids = jnp.arange(7)
  lse = ops.logsumexp(tq, tk, scale=2.0, exclude=(ids, ids) if exclude_self else None, impl="dense").rows

  def run(dense):
    f = lambda a, b: jnp.sum(
        jnp.sin(_soft_targets.expected_dot(tq, tk, 2.0, lse, a, b, exclude_self=exclude_self, dense=dense, tile=tile))
    )
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(q, k)

  (v_d, g_d), (v_t, g_t) = run(True), run(False)
  np.testing.assert_allclose(float(v_t), float(v_d), rtol=1e-5, atol=1e-5)
  for a, b in zip(g_t, g_d):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The teacher probabilities of each row sum to 1: with q = k = all-ones rows the dot is 1 per pair.
  ones = jnp.ones((7, 3))
  p_sum = _soft_targets.expected_dot(tq, tk, 2.0, lse, ones, ones / 3.0, exclude_self=exclude_self, dense=False, tile=tile)
  np.testing.assert_allclose(p_sum, np.ones(7), rtol=1e-5)


def _engine_calls():
  x, y, mx, my = (randn(k, 6, 4) for k in range(40, 44))
  anchors_s, anchors_t, t = randn(44, 7, 4), randn(45, 7, 5), randn(46, 6, 5)
  idx = np.array([2, 0, 1, 5, 3, 4])
  calls = {
      "albef_itc": (lambda impl: lambda a, b: albef_itc(a, b, mx, my, temperature=0.2, impl=impl), (x, y)),
      "albef_itc candidates": (
          lambda impl: lambda a, b: albef_itc(
              a, b, mx, my, text_candidates=jnp.concatenate([my, anchors_s]), image_candidates=mx,
              temperature=0.2, impl=impl,
          ),
          (x, y),
      ),
      "similarity_distillation": (
          lambda impl: lambda a: similarity_distillation(a, t, temperature=0.2, impl=impl), (x,)
      ),
      "similarity_distillation anchors": (
          lambda impl: lambda a, b: similarity_distillation(
              a, t, student_anchors=b, teacher_anchors=anchors_t, temperature=0.2, impl=impl
          ),
          (x, anchors_s),
      ),
      "m3co": (lambda impl: lambda a, b: m3co(a, b, mix_index=idx, mix_weight=0.7, impl=impl), (x, y)),
      "m3co rows": (
          lambda impl: lambda a, b: m3co(a, b, mix_index=idx, mix_weight=0.7, bidirectional=False, impl=impl),
          (x, y),
      ),
      "softclip": (lambda impl: lambda a, b: softclip(a, b, mx, t, temperature=0.2, impl=impl), (x, y)),
  }
  return calls


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_engine_calls()))
def test_every_available_engine_agrees_with_dense(name):
  make, args = _engine_calls()[name]
  helpers.assert_engines_agree(name, make, args, value_atol=1e-6)


# ----------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_inputs_give_float32_losses_close_to_float32():
  x, y, mx, my = (randn(k, 8, 16) for k in range(50, 54))
  idx = np.roll(np.arange(8), 1)
  losses = {
      "albef_itc": lambda a, b: albef_itc(a, b, mx, my, temperature=0.1),
      "albef_itc candidates": lambda a, b: albef_itc(a, b, mx, my, text_candidates=my, image_candidates=mx),
      "similarity_distillation": lambda a, b: similarity_distillation(a, b, temperature=0.1),
      "m3co": lambda a, b: m3co(a, b, mix_index=idx, mix_weight=0.6),
      "softclip": lambda a, b: softclip(a, b, mx, my, temperature=0.1),
  }
  for name, f in losses.items():
    want = float(jax.jit(f)(x, y))
    got, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32, name
    np.testing.assert_allclose(float(got), want, rtol=3e-2, atol=1e-2, err_msg=name)
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


E4 = np.eye(4, 3, dtype=np.float32) + 0.1


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: albef_itc(ONES((4, 3)), ONES((4, 3)), ONES((4, 3)), ONES((5, 3))), r"`momentum_image` and `momentum_text` must have the same shape"),
        (lambda: albef_itc(ONES((4, 3)), ONES((4, 3)), ONES((4, 2)), ONES((4, 2))), r"`image` and `momentum_image` must have the same shape"),
        (lambda: albef_itc(ONES((1, 3)), ONES((1, 3)), ONES((1, 3)), ONES((1, 3))), r"`image` needs at least 2 examples"),
        (lambda: albef_itc(E4, E4, E4, E4, alpha=1.5), r"`alpha` must be a scalar in \[0, 1\], got 1.5"),
        (lambda: albef_itc(E4, E4, E4, E4, temperature=0.0), r"`temperature` must be positive"),
        (lambda: albef_itc(E4, E4, E4, E4, impl="nope"), r"`impl` must be one of"),
        (lambda: albef_itc(E4, E4, E4, E4, text_candidates=E4), r"`text_candidates` and `image_candidates` must be given together"),
        (lambda: albef_itc(E4, E4, E4, E4, image_candidates=E4), r"must be given together"),
        (lambda: albef_itc(E4, E4, E4, E4, text_candidates=ONES((3, 3)), image_candidates=E4), r"`text_candidates` must have shape \(N, 3\) with N >= 4"),
        (lambda: albef_itc(E4, E4, E4, E4, text_candidates=E4, image_candidates=ONES((6, 2))), r"`image_candidates` must have shape \(N, 3\) with N >= 4 .*got shape \(6, 2\)"),
        (lambda: albef_itc(E4, E4, E4, E4, text_candidates=E4, image_candidates=ONES((4,))), r"`image_candidates` must have rank 2"),
        (lambda: similarity_distillation(ONES((4, 3)), ONES((5, 3))), r"must have the same batch size"),
        (lambda: similarity_distillation(ONES((2, 3)), ONES((2, 3))), r"`student` needs at least 3 examples"),
        (lambda: similarity_distillation(E4, E4, student_anchors=E4), r"must be given together"),
        (lambda: similarity_distillation(E4, E4, student_anchors=ONES((6, 2)), teacher_anchors=ONES((6, 3))), r"`student_anchors` must have feature size 3 like `student`"),
        (lambda: similarity_distillation(E4, E4, student_anchors=ONES((6, 3)), teacher_anchors=ONES((5, 3))), r"the same number of anchors"),
        (lambda: similarity_distillation(E4, E4, teacher_temperature=-1.0), r"`teacher_temperature` must be positive"),
        (lambda: similarity_distillation(ONES((4,)), E4), r"`student` must have rank 2"),
        (lambda: m3co(E4, E4, mix_index=np.arange(3), mix_weight=0.5), r"`mix_index` must have shape \(4,\)"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4.0), mix_weight=0.5), r"`mix_index` must have an integer dtype"),
        (lambda: m3co(E4, E4, mix_index=np.array([0, 1, 2, 4]), mix_weight=0.5), r"`mix_index` must hold indices in \[0, 4\)"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4), mix_weight=1.2), r"`mix_weight` must lie in \[0, 1\]"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4), mix_weight=np.ones(3)), r"`mix_weight` must be a scalar or have shape \(4,\)"),
        (lambda: m3co(E4, ONES((4, 2)), mix_index=np.arange(4), mix_weight=0.5), r"`mixed` and `other` must have the same shape"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4), mix_weight=0.5, bidirectional=False, temperature=-0.1), r"`temperature` must be positive"),
        (lambda: softclip(E4, E4, ONES((3, 2)), E4), r"`image_fine` must have 4 rows like `image`"),
        (lambda: softclip(E4, E4, E4, ONES((4,))), r"`text_fine` must have rank 2"),
        (lambda: softclip(E4, E4, E4, E4, alpha=-0.1), r"`alpha` must be a scalar in \[0, 1\]"),
        (lambda: softclip(E4, E4, E4, E4, beta=-1.0), r"`beta` must be >= 0"),
        (lambda: softclip(E4, E4, E4, E4, target_temperature=0.0), r"`target_temperature` must be positive"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ------------------------------------------------------------------------------- reduction and mask
_QUEUE_T, _QUEUE_I = randn(190, 2, 3), randn(191, 2, 3)


_S_BANK, _T_BANK = randn(192, 6, 3), randn(193, 6, 4)


_IDX5, _LAM5 = np.array([2, 0, 1, 4, 3], np.int32), np.array([0.3, 1.0, 0.6, 0.2, 0.9], np.float32)


def _real_index(idx, mask):
  """The padded batch's mix_index: a real row's partner k (an index into the real rows) is moved to that
  row's position in the padded batch (the padding rows keep their garbage)."""
  if mask is None:
    return idx
  pos = jnp.nonzero(mask, size=_IDX5.size)[0]
  return jnp.where(mask, pos[jnp.clip(idx, 0, _IDX5.size - 1)], idx)


def _masked_cases(impl):
  """name -> (loss(*arrays, **kw), arrays (floats first), number of arrays differentiated)."""
  def m3co_(bidirectional):
    return lambda m, o, lam, idx, mask=None, **kw: m3co(
        m, o, mix_index=_real_index(idx, mask), mix_weight=lam, temperature=0.3, bidirectional=bidirectional,
        impl=impl, mask=mask, **kw)

  four = [randn(180, 5, 3), randn(181, 5, 3), randn(182, 5, 3), randn(183, 5, 3)]
  return {
      "albef_itc": (lambda i, t, mi, mt, **kw: albef_itc(i, t, mi, mt, temperature=0.3, alpha=0.4, impl=impl, **kw),
                    four, 2),
      "albef_itc(candidates)": (lambda i, t, mi, mt, **kw: albef_itc(
          i, t, mi, mt, text_candidates=jnp.concatenate([mt, _QUEUE_T]),
          image_candidates=jnp.concatenate([mi, _QUEUE_I]), temperature=0.3, alpha=0.4, impl=impl, **kw), four, 2),
      "similarity_distillation": (lambda s, t, **kw: similarity_distillation(s, t, temperature=0.3, teacher_temperature=0.2,
                                                                           impl=impl, **kw),
                                  [randn(184, 5, 3), randn(185, 5, 4)], 1),
      "similarity_distillation(anchors)": (lambda s, t, **kw: similarity_distillation(
          s, t, student_anchors=_S_BANK, teacher_anchors=_T_BANK, temperature=0.3, impl=impl, **kw),
          [randn(186, 5, 3), randn(187, 5, 4)], 1),
      "m3co": (m3co_(True), [randn(188, 5, 3), randn(189, 5, 3), _LAM5, _IDX5], 3),
      "m3co(row)": (m3co_(False), [randn(188, 5, 3), randn(189, 5, 3), _LAM5, _IDX5], 3),
      "softclip": (lambda i, t, fi, ft, **kw: softclip(i, t, fi, ft, temperature=0.3, target_temperature=0.2, alpha=0.3,
                                                       beta=0.5, impl=impl, **kw),
                   [randn(194, 5, 3), randn(195, 5, 3), randn(196, 5, 2), randn(197, 5, 4)], 2),
  }


@pytest.mark.parametrize("impl", helpers.PADDED_TEST_ENGINES)
@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_padded_batch_with_mask_equals_unpadded_batch(name, impl):
  loss, arrays, n_diff = _masked_cases(impl)[name]
  helpers.assert_padded_equals_unpadded(loss, arrays, n_diff=n_diff, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_reduction_none_and_sum(name):
  loss, arrays, _ = _masked_cases("auto")[name]
  helpers.assert_reductions_agree(loss, arrays, 5)
  if not name.startswith("m3co"):  # (a real row's partner must be real: m3co's masked case is above)
    helpers.assert_reductions_agree(loss, arrays, 5, mask=np.array([1, 1, 0, 1, 1], bool))


def test_reduction_none_terms_by_hand():
  # m3co's docstring example: x = [[1, 0], [1, 0]], y = I, k = [1, 0], λ = 1/2: both rows' terms are
  # log(e + 1) − 1/2; the columns: w = [1, 1], LSE = log 2e and log 2, each minus the same 1/2.
  x, y = jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.eye(2)
  per = m3co(x, y, mix_index=jnp.array([1, 0]), mix_weight=0.5, temperature=1.0, reduction="none")
  row = np.log(np.e + 1) - 0.5
  np.testing.assert_allclose(per, [0.5 * (row + np.log(2 * np.e) - 0.5), 0.5 * (row + np.log(2) - 0.5)], rtol=1e-6)


def test_padding_rows_of_m3co_are_not_checked():
  mask = np.array([True, True, True, False])
  value = m3co(E4, E4, mix_index=np.array([1, 0, 2, 9]), mix_weight=np.array([0.5, 0.5, 0.5, 7.0]), mask=mask)
  want = m3co(E4[:3], E4[:3], mix_index=np.array([1, 0, 2]), mix_weight=0.5)
  np.testing.assert_allclose(float(value), float(want), rtol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: albef_itc(E4, E4, E4, E4, mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: albef_itc(E4, E4, E4, E4, text_candidates=ONES((6, 3)), image_candidates=ONES((6, 3)),
                           mask=np.ones(6, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: albef_itc(E4, E4, E4, E4, reduction="avg"), r"`reduction` must be one of"),
        (lambda: similarity_distillation(E4, E4, mask=np.ones(4, np.float32)), r"`mask` must be a boolean array"),
        (lambda: similarity_distillation(E4, E4, reduction="batchmean"), r"`reduction` must be one of"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4), mix_weight=0.5, mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: m3co(E4, E4, mix_index=np.arange(4), mix_weight=0.5, reduction="avg"), r"`reduction` must be one of"),
        (lambda: m3co(E4, E4, mix_index=np.array([0, 1, 4, 3]), mix_weight=0.5, mask=np.array([1, 1, 1, 0], bool)),
         r"`mix_index` must hold indices in \[0, 4\)"),
        (lambda: softclip(E4, E4, E4, E4, mask=np.ones((4, 1), bool)), r"`mask` must have shape \(4,\)"),
        (lambda: softclip(E4, E4, E4, E4, reduction=None), r"`reduction` must be one of"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ------------------------------------------------------------------------------------ sharded batches
SHARDED = [("ring", 3), ("allgather", 8)]
PADDED = np.arange(24) % 5 != 2  # 24 rows split over 3 and 8 devices, every fifth one padding


def _mix_index(mask):
  """A permutation of the real rows (a padding row points at itself), as M3Co's mix draws it."""
  index = np.arange(mask.size)
  real = np.flatnonzero(mask)
  index[real] = np.random.default_rng(3).permutation(real)
  return index


def _sharded_cases(name, impl):
  """(loss closure, arguments, rtol) triples. "ring": the masked batch (padding rows); "allgather": the
  unmasked one with a traced temperature (or α), and the loss's other form where it has one
  (replicated candidates or anchor banks, scored on a one-device engine whatever the sharded `impl`)."""
  x = lambda seed, d=4: randn(seed, 24, d)  # noqa: E731
  if name == "albef_itc":
    four = [x(1), x(2), x(3), x(4)]
    if impl == "ring":
      return [(lambda a, b, c, d, **kw: albef_itc(a, b, c, d, temperature=0.3, mask=PADDED, **kw), four, 1e-5)]
    queue = randn(9, 8, 4)
    cands = lambda c, d: dict(text_candidates=jnp.concatenate([d, queue]),  # noqa: E731
                              image_candidates=jnp.concatenate([c, queue]))
    return [(lambda a, b, c, d, tau, **kw: albef_itc(a, b, c, d, temperature=tau, **kw), four + [0.3], 1e-5),
            (lambda a, b, c, d, **kw: albef_itc(a, b, c, d, temperature=0.3, **cands(c, d), **kw), four, 1e-5)]
  if name == "similarity_distillation":
    loss = functools.partial(similarity_distillation, temperature=0.2)
    if impl == "ring":
      return [(functools.partial(loss, mask=PADDED), [x(1), x(2, 3)], 1e-5)]
    banks = dict(student_anchors=randn(10, 16, 4), teacher_anchors=randn(11, 16, 3))
    return [(loss, [x(1), x(2, 3)], 1e-5), (functools.partial(loss, mask=PADDED, **banks), [x(1), x(2, 3)], 1e-5)]
  if name == "m3co":
    if impl == "ring":
      return [(lambda a, b, k, **kw: m3co(a, b, mix_index=k, mix_weight=0.3, mask=PADDED, **kw),
               [x(1), x(2), _mix_index(PADDED)], 1e-5)]
    lam = np.random.default_rng(4).uniform(size=24).astype(np.float32)
    return [(lambda a, b, k, w, **kw: m3co(a, b, mix_index=k, mix_weight=w, **kw),
             [x(1), x(2), _mix_index(np.ones(24, bool)), lam], 1e-5)]
  loss = functools.partial(softclip, temperature=0.3, target_temperature=0.5)
  args = [x(1), x(2), x(3, 5), x(4, 3)]
  if impl == "ring":
    return [(functools.partial(loss, mask=PADDED), args, 1e-5)]
  # d/dα is a sum over every pair: float32 round-off of a few 1e-5 between the two orders of summation
  return [(lambda a, b, c, d, alpha, **kw: loss(a, b, c, d, alpha=alpha, **kw), args + [0.4], 1e-4)]


@pytest.mark.parametrize("impl,n_devices", SHARDED)
@pytest.mark.parametrize("name", ["albef_itc", "similarity_distillation", "m3co", "softclip"])
def test_sharded_batch_equals_dense(name, impl, n_devices):
  """Over a mesh (allgather and ring engines, the target sums against the gathered batch) the value and
  the gradients, a traced temperature or α included, are those of the dense loss on one device, with
  padding rows (ring) and without (allgather)."""
  for loss, args, rtol in _sharded_cases(name, impl):
    helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices, rtol=rtol)
