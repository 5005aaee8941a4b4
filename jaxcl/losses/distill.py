"""Soft targets and distillation: ALBEF momentum distillation, similarity KD, M3Co mixup targets.

Every loss here is a soft-target cross-entropy over a similarity matrix,

    loss_i = (Σ_j T_ij) · LSE_j S_ij − Σ_j T_ij S_ij,

whose log-sum-exp runs on any engine (`jaxcl.ops.logsumexp`, `impl=`). The linear part comes from the
embeddings: row-wise dots for sparse targets (M3Co), and for teacher-softmax targets (ALBEF, similarity
distillation) a tiled, rematerialised contraction (`jaxcl.losses._soft_targets.expected_dot`) that
never forms the B×B matrix outside the `dense` engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.ops import engines
from jaxcl.losses import _common
from jaxcl.losses import _soft_targets


def _check_alpha(name: str, value) -> None:
  _checks.check_finite(name, value)
  v = _checks.concrete_value(value)
  if v is not None and (v.size != 1 or not 0.0 <= float(v) <= 1.0):
    raise ValueError(f"`{name}` must be a scalar in [0, 1], got {v if v.size != 1 else v.item()}.")


def _candidates(name: str, x, image: jax.Array) -> jax.Array:
  x = _checks.check_array(name, x, ndim=2)
  b, d = image.shape
  if x.shape[1] != d or x.shape[0] < b:
    raise ValueError(
        f"`{name}` must have shape (N, {d}) with N >= {b} (the batch's momentum features in the first {b} "
        f"rows, then e.g. a queue), got shape {x.shape}."
    )
  return x


@_common.keyword_only
def albef_itc(
    image: jax.Array,
    text: jax.Array,
    momentum_image: jax.Array,
    momentum_text: jax.Array,
    *,
    text_candidates: jax.Array | None = None,
    image_candidates: jax.Array | None = None,
    temperature: float | jax.Array = 0.07,
    alpha: float | jax.Array = 0.4,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  r"""ALBEF image–text contrastive loss with momentum distillation (ITC + MoD).

  "Align before Fuse: Vision and Language Representation Learning with Momentum Distillation" (Li et al.,
  NeurIPS 2021), eq. (1)–(2) and §3.3; the formula and the defaults follow the authors' code
  (salesforce/ALBEF `models/model_pretrain.py`, `configs/Pretrain.yaml`: α = 0.4, τ = 0.07). v, w are
  the image and text embeddings of the model being trained, v', w' those of its momentum (EMA) copy.

  ALBEF's pairing (pass `text_candidates` and `image_candidates`, momentum features w'_n and v'_n, each
  (N, D) with the batch's own momentum features in the first B rows, e.g. `momentum_text`, or
  `concatenate([momentum_text, text_queue])` for ALBEF's queue of 65 536): the trained image scores
  the momentum text candidates and the trained text the momentum image candidates,

      A_in = <v_i, w'_n>/τ,   A'_in = <v'_i, w'_n>/τ       (i → t)
      C_in = <w_i, v'_n>/τ,   C'_in = <w'_i, v'_n>/τ       (t → i)
      T^{i2t}_in = (1 − α) 1[n = i] + α softmax_n A'_i·,   T^{t2i}_in = (1 − α) 1[n = i] + α softmax_n C'_i·
      loss = ½ mean_i [ LSE_n A_in − Σ_n T^{i2t}_in A_in ] + ½ mean_i [ LSE_n C_in − Σ_n T^{t2i}_in C_in ]

  Without candidates (the default), one matrix of the trained features S_ij = <v_i, w_j>/τ is scored
  by its rows (i → t) and its columns (t → i), the targets the momentum model's S'_ij = <v'_i, w'_j>/τ:

      T^{i2t}_ij = (1 − α) 1[i = j] + α softmax_j S'_i·,    T^{t2i}_ij = (1 − α) 1[i = j] + α softmax_i S'_·j
      loss = ½ mean_i [ LSE_j S_ij − Σ_j T^{i2t}_ij S_ij ] + ½ mean_j [ LSE_i S_ij − Σ_i T^{t2i}_ij S_ij ]

  The two agree in value when the momentum model equals the trained one (v' = v, w' = w, candidates
  w' and v'); the gradients do not, since ALBEF's candidates carry no gradient. The targets carry no
  gradient in either form (nor into τ, nor into the momentum features). This is the cross-entropy
  against the mixed targets of ALBEF's code; the paper writes the distillation half as KL(q ‖ p), which
  differs from it by the momentum model's entropy (a constant with no gradient: training is identical).
  ALBEF also ramps α up linearly over the first epoch (α · min(1, step / steps_per_epoch)) and learns
  τ, clamped to [0.001, 0.5] before each step: both belong to the training loop (pass the current α and
  τ here).

  With α = 0 the default form is `clip(image, text, logit_scale=1/τ)`, and the candidate form is
  ½ [`infonce(image, momentum_text, negatives=text_queue)` + `infonce(text, momentum_image,
  negatives=image_queue)`] at τ, in value (no gradient into the momentum side). The log-sum-exps run
  on `impl`; Σ_n T_in S_in is a tiled contraction that never forms B×N outside the `dense` engine.

  Args:
    image, text: (B, D) embeddings of the model being trained, row i a matching pair.
    momentum_image, momentum_text: (B, D) embeddings of the same pairs from the momentum model.
    text_candidates, image_candidates: None (the single-matrix form), or both: (N_t, D) and (N_i, D)
      momentum features scored by `image` and by `text`, rows 0..B−1 the momentum features of the batch
      (the positives), any further rows extra candidates (ALBEF's queues). No gradient flows into them.
    temperature: τ > 0 (scalar, may be traced: ALBEF learns it), shared by both models.
    alpha: α ∈ [0, 1], the weight of the momentum targets.
    normalize: L2-normalise every input first.
    reduction: "mean", "sum" or "none": the (B,) per-pair terms ½ (i → t term of row i + t → i term of
      pair i: column i, or text i's row in ALBEF's pairing), whose mean is the loss.
    mask: None or bool (B,): False marks padding pairs: rows of `image`, `text` and both momentum
      batches, and the first B rows of the candidates, which are then neither anchors, positives,
      negatives nor part of a teacher's softmax. Extra candidate rows (a queue) are always real.
    impl: similarity engine, see `jaxcl.ops.available_impls()`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # S = S' = [[1, 0], [0, 1]], q = softmax([1, 0]) = [e/(e+1), 1/(e+1)]
  >>> round(float(albef_itc(x, x, x, x, temperature=1.0, alpha=0.5)), 4)  # log(e+1) - (1 + e/(e+1))/2
  0.4477
  >>> # ALBEF's pairing: the same value here (the momentum model equals the trained one)
  >>> albef = lambda c, a: albef_itc(x, x, x, x, text_candidates=c, image_candidates=c, temperature=1.0, alpha=a)
  >>> round(float(albef(x, 0.5)), 4)
  0.4477
  >>> queue = jnp.array([[-1.0, 0.0], [0.0, -1.0]])  # adds exp(0) + exp(-1) to each row's sum
  >>> round(float(albef(jnp.concatenate([x, queue]), 0.0)), 4)  # log(e + 2 + 1/e) - 1
  0.6265
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize)
  mi, mt = _common.pair("momentum_image", momentum_image, "momentum_text", momentum_text, normalize=normalize)
  _checks.check_same_shape("image", image, "momentum_image", momentum_image)
  if (text_candidates is None) != (image_candidates is None):
    raise ValueError(
        "`text_candidates` and `image_candidates` must be given together (ALBEF's pairing) or both None "
        "(the single-matrix form)."
    )
  _check_alpha("alpha", alpha)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, i.shape[0])
  inv_t = _common.inverse_temperature(temperature)
  alpha = jnp.asarray(alpha, jnp.float32)
  b = i.shape[0]
  t_scale = jax.lax.stop_gradient(inv_t)
  mi, mt = jax.lax.stop_gradient(mi), jax.lax.stop_gradient(mt)
  valid = dict(row_valid=mask, col_valid=mask)

  if text_candidates is None:
    lse = ops.logsumexp(i, t, scale=inv_t, rows=True, cols=True, impl=impl, **valid)
    positive = inv_t * _common.rowwise_dot(i, t)
    teacher = ops.logsumexp(mi, mt, scale=t_scale, rows=True, cols=True, impl=impl, **valid)
    dense = engines.is_dense(impl, b, b)
    soft_rows = _soft_targets.expected_dot(mi, mt, t_scale, teacher.rows, i, t, dense=dense, **valid)
    soft_cols = _soft_targets.expected_dot(mt, mi, t_scale, teacher.cols, t, i, dense=dense, **valid)
    rows = _common.zero_invalid(lse.rows, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_rows
    cols = _common.zero_invalid(lse.cols, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_cols
    return _common.reduce_loss(0.5 * (rows + cols), reduction, mask)

  tc = _candidates("text_candidates", text_candidates, i)
  ic = _candidates("image_candidates", image_candidates, i)
  tc = jax.lax.stop_gradient(_common.maybe_normalize(tc, normalize))
  ic = jax.lax.stop_gradient(_common.maybe_normalize(ic, normalize))

  def direction(q, teacher_q, cands):
    # LSE_n <q_i, c_n>/τ − (1 − α) <q_i, c_i>/τ − α Σ_n softmax_n(<teacher_q_i, c_n>/τ) <q_i, c_n>/τ
    n = cands.shape[0]
    cand_valid = None if mask is None else jnp.concatenate([mask, jnp.ones((n - b,), bool)])
    valid = dict(row_valid=mask, col_valid=cand_valid)
    lse = ops.logsumexp(q, cands, scale=inv_t, impl=impl, **valid).rows
    teacher = ops.logsumexp(teacher_q, cands, scale=t_scale, impl=impl, **valid).rows
    dense = engines.is_dense(impl, b, n)
    soft = _soft_targets.expected_dot(teacher_q, cands, t_scale, teacher, q, cands, dense=dense, **valid)
    positive = _common.rowwise_dot(q, cands[:b].astype(jnp.float32))
    return _common.zero_invalid(lse, mask) - inv_t * ((1.0 - alpha) * positive + alpha * soft)

  per_pair = 0.5 * (direction(i, mi, tc) + direction(t, mt, ic))
  return _common.reduce_loss(per_pair, reduction, mask)


@_common.keyword_only
def similarity_distillation(
    student: jax.Array,
    teacher: jax.Array,
    *,
    student_anchors: jax.Array | None = None,
    teacher_anchors: jax.Array | None = None,
    temperature: float | jax.Array = 0.04,
    teacher_temperature: float | jax.Array | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  r"""KL distillation of similarity distributions: the student copies the teacher's neighbourhoods.

  "CompRess: Self-Supervised Learning by Compressing Representations" (Abbasi Koohpayegani, Tejankar &
  Pirsiavash, NeurIPS 2020); the same objective with a cross-entropy is SEED ("SEED: Self-supervised
  Distillation For Visual Representation", Fang et al., ICLR 2021). Each sample's similarities to N
  anchors, softened by a temperature, form a distribution; the student's must match the teacher's:

      p^T_ij = softmax_j <t_i, a^T_j>/τ_T,     p^S_ij = softmax_j <s_i, a^S_j>/τ
      loss   = mean_i KL(p^T_i ‖ p^S_i)
             = mean_i [ Σ_j p^T_ij (T_ij − LSE_i T) + LSE_i S − Σ_j p^T_ij S_ij ]

  This matches the authors' code (UMBCvision/CompRess `nn/compress_loss.py`): L2-normalised features,
  KL(teacher ‖ student) averaged over the batch (`reduction='batchmean'`), and T = 0.04 for both
  models, the defaults here (τ = τ_T = 0.04). The anchors are a memory bank of each model's embeddings
  (CompRess-2q, one bank per model of 128 000 in their code; pass the teacher's bank for both when the
  dimensions agree: CompRess-1q). Their banks are detached buffers scored before the current batch is
  enqueued, so a sample is never its own anchor; pass a bank here as a constant (or under
  `jax.lax.stop_gradient`) for the same gradients. Without anchors the batch itself is the anchor set
  and each sample's own column is left out (in-batch relational distillation, our extension). Student
  and teacher may have different feature sizes. The teacher side carries no gradient; KL is 0 when the
  student's similarities equal the teacher's (SEED's cross-entropy is this plus the teacher's entropy,
  a constant). With a one-hot teacher (anchors = the teacher batch, orthogonal rows, τ_T → 0) it is
  `infonce(student, student_anchors, temperature=τ)`. The log-sum-exps run on `impl`; Σ_j p^T_ij S_ij
  is a tiled contraction that never forms B×N outside the `dense` engine.

  Args:
    student: (B, D_s) embeddings being trained. teacher: (B, D_t) embeddings of the same samples.
    student_anchors, teacher_anchors: (N, D_s) and (N, D_t) anchors (row j the same anchor), or both None.
    temperature: τ > 0 of the student (may be traced).
    teacher_temperature: τ_T > 0; None means τ.
    normalize: L2-normalise every input first.
    reduction: "mean", "sum" or "none": the (B,) KL(p^T_i ‖ p^S_i), in the order of the batch.
    mask: None or bool (B,): False marks padding rows of `student` and `teacher`: they are not
      anchors, nor (with in-batch anchors) anchors of the other samples. Given anchor banks are
      always real.
    impl: similarity engine, see `jaxcl.ops.available_impls()`.
  Returns:
    Scalar float32 loss (>= 0), or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  >>> round(float(similarity_distillation(s, 2.0 * s)), 4)  # same directions: same distributions
  0.0
  """
  student = _checks.check_array("student", student, ndim=2)
  teacher = _checks.check_array("teacher", teacher, ndim=2)
  if teacher.shape[0] != student.shape[0]:
    raise ValueError(
        f"`student` and `teacher` must have the same batch size, got shapes {student.shape} and "
        f"{teacher.shape}."
    )
  if (student_anchors is None) != (teacher_anchors is None):
    raise ValueError(
        "`student_anchors` and `teacher_anchors` must be given together (or both None for in-batch "
        "anchors)."
    )
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, student.shape[0])
  in_batch = student_anchors is None
  if in_batch:
    _checks.check_min_batch("student", student, 3, why="in-batch anchors leave B - 1 >= 2 per sample")
    student_anchors, teacher_anchors = student, teacher
  else:
    student_anchors = _checks.check_array("student_anchors", student_anchors, ndim=2)
    teacher_anchors = _checks.check_array("teacher_anchors", teacher_anchors, ndim=2)
    for name, a, x in (("student_anchors", student_anchors, student), ("teacher_anchors", teacher_anchors, teacher)):
      if a.shape[1] != x.shape[1]:
        name_x = name.split("_")[0]
        raise ValueError(
            f"`{name}` must have feature size {x.shape[1]} like `{name_x}`, got shape {a.shape}."
        )
    if student_anchors.shape[0] != teacher_anchors.shape[0]:
      raise ValueError(
          f"`student_anchors` and `teacher_anchors` must hold the same number of anchors, got shapes "
          f"{student_anchors.shape} and {teacher_anchors.shape}."
      )
    _checks.check_min_batch("student_anchors", student_anchors, 2, why="a distribution needs two anchors")
  inv_t = _common.inverse_temperature(temperature)
  t_scale = jax.lax.stop_gradient(
      inv_t if teacher_temperature is None
      else _common.inverse_temperature(teacher_temperature, "teacher_temperature")
  )
  s, sa = _common.maybe_normalize(student, normalize), _common.maybe_normalize(student_anchors, normalize)
  t = jax.lax.stop_gradient(_common.maybe_normalize(teacher, normalize))
  ta = jax.lax.stop_gradient(_common.maybe_normalize(teacher_anchors, normalize))
  b, n = s.shape[0], sa.shape[0]
  exclude = ops.diagonal(b) if in_batch else None
  valid = dict(row_valid=mask, col_valid=mask if in_batch else None)
  s_lse = ops.logsumexp(s, sa, scale=inv_t, exclude=exclude, impl=impl, **valid).rows
  t_lse = ops.logsumexp(t, ta, scale=t_scale, exclude=exclude, impl=impl, **valid).rows
  dense = engines.is_dense(impl, b, n)
  cross = _soft_targets.expected_dot(t, ta, t_scale, t_lse, s, sa, exclude_self=in_batch, dense=dense, **valid)
  neg_entropy = _soft_targets.expected_dot(t, ta, t_scale, t_lse, None, None, exclude_self=in_batch,
                                           dense=dense, **valid)
  kl = neg_entropy + _common.zero_invalid(s_lse, mask) - inv_t * cross
  return _common.reduce_loss(kl, reduction, mask)


@_common.keyword_only
def m3co(
    mixed: jax.Array,
    other: jax.Array,
    *,
    mix_index: jax.Array,
    mix_weight: float | jax.Array,
    temperature: float | jax.Array = 0.1,
    bidirectional: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  r"""M3Co: mixup contrastive loss aligning mixed samples of one modality with both sources in another.

  "Harnessing Shared Relations via Multimodal Mixup Contrastive Learning for Multimodal Classification"
  (Kumar, Singhal et al., 2024); the formula and the defaults follow the authors' code (`mixco_nce` in
  RaghavSinghal10/M3CoL `model/utils.py`: τ = 0.1, `bidirectional=True`). Sample i of modality 1 is
  mixed with sample k_i (a permutation of the batch): x̃_i = λ_i x_i + (1 − λ_i) x_{k_i}; its embedding
  m̃_i is contrasted against the modality-2 embeddings o_j with soft targets λ_i on o_i and 1 − λ_i on
  o_{k_i}:

      S_ij = <m̃_i, o_j> / τ,     T_ij = λ_i 1[j = i] + (1 − λ_i) 1[j = k_i]
      row  = mean_i [ LSE_j S_ij − λ_i S_ii − (1 − λ_i) S_{i k_i} ]          (−Σ_j T_ij log softmax_j S_i·)
      col  = mean_j [ w_j LSE_i S_ij ] − mean_i [ λ_i S_ii + (1 − λ_i) S_{i k_i} ],
             w_j = Σ_i T_ij = λ_j + Σ_{i: k_i = j} (1 − λ_i)                  (−Σ_i T_ij log softmax_i S_·j)
      loss = ½ (row + col)   (`bidirectional=True`, the authors' default),    loss = row   (False)

  The authors call it once per mixed modality (mixed modality 1 against modality 2 and mixed modality 2
  against modality 1, each with its own mix) and add the two: do the same. Their code mixes the
  embeddings, with λ ~ Beta(0.15, 0.15) on about half of the rows (λ = 1 on the rest), which a per-row
  λ expresses; where k_i = i it overwrites the target to 1 − λ_i, here it is λ_i + (1 − λ_i) = 1. The
  targets have two entries per row, so the linear part is two row-wise dots and w a scatter-add: every
  engine, nothing B×B. With λ = 1 (or k = identity) it is `clip(mixed, other, logit_scale=1/τ)`, and
  with `bidirectional=False` it is `infonce(mixed, other, temperature=τ)`.

  Args:
    mixed: (B, D) embeddings of the mixed inputs of one modality. other: (B, D) embeddings of the
      unmixed other modality, row i describing sample i.
    mix_index: (B,) integer k_i in [0, B): the sample mixed into row i.
    mix_weight: λ ∈ [0, 1], a scalar or (B,) per row (may be traced).
    temperature: τ > 0 (scalar, may be traced).
    bidirectional: average the row (mixed → other) and the column (other → mixed) cross-entropies;
      False: the row term only.
    normalize: L2-normalise both inputs first.
    reduction: "mean", "sum" or "none": the (B,) per-sample terms, whose mean is the loss:
      ½ [ LSE_j S_ij + w_i LSE_j S_ji − 2 (λ_i S_ii + (1 − λ_i) S_{i k_i}) ] (row i and column i), or
      LSE_j S_ij − λ_i S_ii − (1 − λ_i) S_{i k_i} with `bidirectional=False`.
    mask: None or bool (B,): False marks padding rows of `mixed` and `other`, neither anchors nor
      candidates; their `mix_index` and `mix_weight` entries are ignored (not checked). A real row's
      k_i must be a real row.
    impl: similarity engine, see `jaxcl.ops.available_impls()`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x, y = jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.eye(2)  # S = [[1, 0], [1, 0]]
  >>> loss = lambda **kw: m3co(x, y, mix_index=jnp.array([1, 0]), mix_weight=0.5, temperature=1.0, **kw)
  >>> round(float(loss(bidirectional=False)), 4)  # row: log(e + 1) - 1/2
  0.8133
  >>> round(float(loss()), 4)  # col: w = [1, 1], (log 2e + log 2)/2 - 1/2 = log 2; loss = (row + col)/2
  0.7532
  """
  m, o = _common.pair("mixed", mixed, "other", other, normalize=normalize)
  b = m.shape[0]
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  kept = None if mask is None else _checks.concrete_value(mask)
  mix_index = _checks.check_labels("mix_index", mix_index, b)
  idx = _checks.concrete_value(mix_index)
  if idx is not None and mask is not None:  # padding rows' entries are ignored
    idx = None if kept is None else idx[kept]
  if idx is not None and idx.size and (idx.min() < 0 or idx.max() >= b):
    raise ValueError(f"`mix_index` must hold indices in [0, {b}), got {idx}.")
  lam = _checks.check_scalar_or_vector("mix_weight", mix_weight, b)
  v = _checks.concrete_value(lam)
  if v is not None and mask is not None and v.ndim == 1:
    v = None if kept is None else v[kept]
  if v is not None:
    _checks.check_finite("mix_weight", v)
  if v is not None and v.size and (v.min() < 0 or v.max() > 1):
    raise ValueError(f"`mix_weight` must lie in [0, 1], got {v if v.size > 1 else v.item()}.")
  lam = jnp.broadcast_to(lam.astype(jnp.float32), (b,))
  if mask is not None:  # padding rows: λ = 1 and k_i = i, so they point at nothing else
    lam = jnp.where(mask, lam, 1.0)
    mix_index = jnp.where(mask, mix_index, jnp.arange(b, dtype=mix_index.dtype))
  inv_t = _common.inverse_temperature(temperature)
  lse = ops.logsumexp(m, o, scale=inv_t, rows=True, cols=bool(bidirectional), row_valid=mask, col_valid=mask,
                      impl=impl)
  o32 = o.astype(jnp.float32)
  own = _common.rowwise_dot(m, o32)
  partner = _common.rowwise_dot(m, o32[mix_index])
  linear = inv_t * (lam * own + (1.0 - lam) * partner)
  row = _common.zero_invalid(lse.rows, mask) - linear
  if not bidirectional:
    return _common.reduce_loss(row, reduction, mask)
  col_weight = lam + jnp.zeros((b,), jnp.float32).at[mix_index].add(1.0 - lam)
  col = col_weight * _common.zero_invalid(lse.cols, mask) - linear
  return _common.reduce_loss(0.5 * (row + col), reduction, mask)


@_common.keyword_only
def softclip(
    image: jax.Array,
    text: jax.Array,
    image_fine: jax.Array,
    text_fine: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    target_temperature: float | jax.Array = 0.07,
    alpha: float | jax.Array = 0.2,
    beta: float | jax.Array = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  r"""SoftCLIP: CLIP with soft targets from intra-modal self-similarity, plus a KL on the negatives.

  "SoftCLIP: Softer Cross-modal Alignment Makes CLIP Stronger" (Gao et al., AAAI 2024). The one-to-one
  CLIP target is softened with each modality's own fine-grained self-similarity (the paper uses ROI
  region features; here any (B, D_f) features, e.g. a frozen encoder's), and, because the positive
  still dominates the softened target, the negatives get a separate term. With S_ij = <v_i, w_j>/τ,
  the image self-similarity Q^I_ij = softmax_j <f^I_i, f^I_j>/τ_t and the text one Q^T alike:

      T^{i2t} = (1 − α) I + α Q^I,          T^{t2i} = (1 − α) I + α Q^T
      L_soft  = ½ [ mean_i CE(T^{i2t}_i, softmax_j S_i·) + mean_j CE(T^{t2i}_j, softmax_i S_·j) ]
      L_neg   = ½ [ mean_i KL(Q^{I−}_i ‖ P^{i2t−}_i) + mean_j KL(Q^{T−}_j ‖ P^{t2i−}_j) ]
      loss    = L_soft + β L_neg

  where "−" drops the positive (j = i) from a distribution and renormalises the rest (the paper's
  disentangled negatives). The authors have released no code (we found none to compare with), and we
  could not check the paper's full text here: this follows its abstract and method outline, and the
  KL direction and the weights are our choices (α = 0.2, β = 1, τ = τ_t = 0.07, CLIP's initial
  temperature), not checked against the paper. The targets carry no gradient. With α = β = 0 it is
  `clip(image, text, logit_scale=1/τ)`; with β = 0, τ_t = τ and both fine features equal to x it is the
  single-matrix form of `albef_itc(image, text, x, x, alpha=α)` (the momentum model replaced by x).
  Log-sum-exps run on `impl`; the target-weighted sums are tiled contractions that never form B×B
  outside the `dense` engine.

  Args:
    image, text: (B, D) embeddings being trained, row i a matching pair.
    image_fine, text_fine: (B, D_f) features for the intra-modal targets (may differ in D_f).
    temperature: τ > 0 (may be traced). target_temperature: τ_t > 0 of the self-similarities.
    alpha: α ∈ [0, 1], the weight of the soft targets. beta: β >= 0, the weight of L_neg.
    normalize: L2-normalise every input first.
    reduction: "mean", "sum" or "none": the (B,) per-pair terms ½ [CE of row i + CE of column i] +
      β ½ [KL of row i + KL of column i], whose mean is the loss.
    mask: None or bool (B,): False marks padding pairs (rows of all four inputs), neither anchors,
      positives, negatives nor part of any target distribution.
    impl: similarity engine, see `jaxcl.ops.available_impls()`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)  # every distribution over the negatives is uniform: L_neg = 0
  >>> round(float(softclip(x, x, x, x, temperature=1.0, target_temperature=1.0, alpha=0.0)), 4)
  0.5514
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize)
  fi = _checks.check_array("image_fine", image_fine, ndim=2)
  ft = _checks.check_array("text_fine", text_fine, ndim=2)
  b = i.shape[0]
  for name, x in (("image_fine", fi), ("text_fine", ft)):
    if x.shape[0] != b:
      raise ValueError(f"`{name}` must have {b} rows like `image`, got shape {x.shape}.")
  _check_alpha("alpha", alpha)
  _checks.check_non_negative("beta", beta)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  valid = dict(row_valid=mask, col_valid=mask)
  inv_t = _common.inverse_temperature(temperature)
  t_scale = jax.lax.stop_gradient(_common.inverse_temperature(target_temperature, "target_temperature"))
  alpha = jnp.asarray(alpha, jnp.float32)
  fi = jax.lax.stop_gradient(_common.maybe_normalize(fi, normalize))
  ft = jax.lax.stop_gradient(_common.maybe_normalize(ft, normalize))
  dense = engines.is_dense(impl, b, b)
  diag = ops.diagonal(b)

  lse = ops.logsumexp(i, t, scale=inv_t, rows=True, cols=True, impl=impl, **valid)
  positive = inv_t * _common.rowwise_dot(i, t)
  q_i = ops.logsumexp(fi, fi, scale=t_scale, impl=impl, **valid).rows
  q_t = ops.logsumexp(ft, ft, scale=t_scale, impl=impl, **valid).rows
  soft_rows = _soft_targets.expected_dot(fi, fi, t_scale, q_i, i, t, dense=dense, **valid)
  soft_cols = _soft_targets.expected_dot(ft, ft, t_scale, q_t, t, i, dense=dense, **valid)
  rows = _common.zero_invalid(lse.rows, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_rows
  cols = _common.zero_invalid(lse.cols, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_cols
  l_soft = 0.5 * (rows + cols)

  # Negatives only: every distribution over j ≠ i, renormalised.
  neg = ops.logsumexp(i, t, scale=inv_t, rows=True, cols=True, exclude=diag, impl=impl, **valid)
  qn_i = ops.logsumexp(fi, fi, scale=t_scale, exclude=diag, impl=impl, **valid).rows
  qn_t = ops.logsumexp(ft, ft, scale=t_scale, exclude=diag, impl=impl, **valid).rows

  def kl(tq, t_lse, q, k, s_lse):
    cross = _soft_targets.expected_dot(tq, tq, t_scale, t_lse, q, k, exclude_self=True, dense=dense, **valid)
    neg_entropy = _soft_targets.expected_dot(tq, tq, t_scale, t_lse, None, None, exclude_self=True,
                                             dense=dense, **valid)
    return neg_entropy + _common.zero_invalid(s_lse, mask) - inv_t * cross

  l_neg = 0.5 * (kl(fi, qn_i, i, t, neg.rows) + kl(ft, qn_t, t, i, neg.cols))
  return _common.reduce_loss(l_soft + jnp.asarray(beta, jnp.float32) * l_neg, reduction, mask)
