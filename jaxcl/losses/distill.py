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


def _candidates(name: str, x, image: jax.Array, b: int) -> jax.Array:
  """(N, D) candidates, N >= b (the global batch size), D the feature size of `image`."""
  x = _checks.check_array(name, x, ndim=2)
  d = image.shape[1]
  if x.shape[1] != d or x.shape[0] < b:
    raise ValueError(
        f"`{name}` must have shape (N, {d}) with N >= {b} (the batch's momentum features in the first {b} "
        f"rows, then e.g. a queue), got shape {x.shape}."
    )
  return x


def _local_dense(impl, n_rows: int, n_cols: int, axis_name) -> bool:
  """Whether a soft-target contraction of n_rows against n_cols is formed densely: as `impl` decides on
  one device; by the size alone under `axis_name` (this device's rows against gathered columns)."""
  return engines.is_dense("auto" if axis_name is not None else impl, n_rows, n_cols)


def _local_impl(impl, axis_name) -> str:
  """The engine of a log-sum-exp of this device's rows against replicated columns (a candidate queue,
  an anchor bank): `impl` on one device, "auto" (a one-device engine) under `axis_name`."""
  return "auto" if axis_name is not None else impl


@_common.keyword_only
@_common.shardable("image", "text", "momentum_image", "momentum_text", "mask")
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
    axis_name: str | tuple[str, ...] | None = None,
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

  Sharded (`axis_name` / `mesh`): the four batches are split over the devices. In the single-matrix
  form the log-sum-exps run on the allgather or ring engine, and Σ_j T_ij S_ij needs every pair: each
  device contracts its rows against the gathered batches (ring gathers them too). The candidates are
  replicated (every device holds all N; they carry no gradient), rows 0..B−1 the global batch, and
  each device scores its own rows against them on a one-device engine.

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
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"` (this device's pairs under `axis_name`).

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
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  mi, mt = _common.pair("momentum_image", momentum_image, "momentum_text", momentum_text, normalize=normalize,
                        axis_name=axis_name)
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
  b_all = _common.global_size(b, axis_name)
  t_scale = jax.lax.stop_gradient(inv_t)
  mi, mt = jax.lax.stop_gradient(mi), jax.lax.stop_gradient(mt)
  all_mask = _common.gather_batch(mask, axis_name)
  gather = lambda x: _common.gather_batch(x, axis_name)  # noqa: E731

  if text_candidates is None:
    valid = dict(row_valid=mask, col_valid=mask)
    lse = ops.logsumexp(i, t, scale=inv_t, rows=True, cols=True, impl=impl, axis_name=axis_name, **valid)
    positive = inv_t * _common.rowwise_dot(i, t)
    teacher = ops.logsumexp(mi, mt, scale=t_scale, rows=True, cols=True, impl=impl, axis_name=axis_name,
                            **valid)
    dense = _local_dense(impl, b, b_all, axis_name)
    valid = dict(row_valid=mask, col_valid=all_mask)  # this device's rows against the whole batch
    soft_rows = _soft_targets.expected_dot(mi, gather(mt), t_scale, teacher.rows, i, gather(t), dense=dense,
                                           **valid)
    soft_cols = _soft_targets.expected_dot(mt, gather(mi), t_scale, teacher.cols, t, gather(i), dense=dense,
                                           **valid)
    rows = _common.zero_invalid(lse.rows, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_rows
    cols = _common.zero_invalid(lse.cols, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_cols
    return _common.reduce_loss(0.5 * (rows + cols), reduction, mask, axis_name)

  tc = _candidates("text_candidates", text_candidates, i, b_all)
  ic = _candidates("image_candidates", image_candidates, i, b_all)
  tc = jax.lax.stop_gradient(_common.maybe_normalize(tc, normalize))
  ic = jax.lax.stop_gradient(_common.maybe_normalize(ic, normalize))
  ids = _common.batch_ids(b, axis_name)
  local_impl = _local_impl(impl, axis_name)

  def direction(q, teacher_q, cands):
    # LSE_n <q_i, c_n>/τ − (1 − α) <q_i, c_i>/τ − α Σ_n softmax_n(<teacher_q_i, c_n>/τ) <q_i, c_n>/τ
    n = cands.shape[0]
    cand_valid = None if mask is None else jnp.concatenate([all_mask, jnp.ones((n - b_all,), bool)])
    valid = dict(row_valid=mask, col_valid=cand_valid)
    lse = ops.logsumexp(q, cands, scale=inv_t, impl=local_impl, **valid).rows
    teacher = ops.logsumexp(teacher_q, cands, scale=t_scale, impl=local_impl, **valid).rows
    dense = _local_dense(impl, b, n, axis_name)
    soft = _soft_targets.expected_dot(teacher_q, cands, t_scale, teacher, q, cands, dense=dense, **valid)
    positive = _common.rowwise_dot(q, cands[ids].astype(jnp.float32))
    return _common.zero_invalid(lse, mask) - inv_t * ((1.0 - alpha) * positive + alpha * soft)

  per_pair = 0.5 * (direction(i, mi, tc) + direction(t, mt, ic))
  return _common.reduce_loss(per_pair, reduction, mask, axis_name)


@_common.keyword_only
@_common.shardable("student", "teacher", "mask")
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
    axis_name: str | tuple[str, ...] | None = None,
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

  Sharded (`axis_name` / `mesh`): `student` and `teacher` are split over the devices. With in-batch
  anchors the log-sum-exps run on the allgather or ring engine and Σ_j p^T_ij S_ij, which needs every
  pair, contracts each device's rows against the gathered batches (ring gathers them too). Anchor
  banks are replicated (every device holds all N) and scored by each device's rows on a one-device
  engine.

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
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss (>= 0), or (B,) with `reduction="none"` (this device's rows under `axis_name`).

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
    _common.check_global_batch("student", student, 3, axis_name,
                               why="in-batch anchors leave B - 1 >= 2 per sample")
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
  b = s.shape[0]
  ids = _common.batch_ids(b, axis_name)
  if in_batch:  # the global batch, each row's own column left out
    valid = dict(row_valid=mask, col_valid=mask)
    lse = lambda q, k, scale: ops.logsumexp(q, k, scale=scale, exclude=(ids, ids), impl=impl,  # noqa: E731
                                            axis_name=axis_name, **valid).rows
    s_lse, t_lse = lse(s, sa, inv_t), lse(t, ta, t_scale)
    sa, ta = _common.gather_batch(sa, axis_name), _common.gather_batch(ta, axis_name)
    valid = dict(row_valid=mask, col_valid=_common.gather_batch(mask, axis_name))
  else:  # replicated banks: this device's rows against all of them
    valid = dict(row_valid=mask, col_valid=None)
    local_impl = _local_impl(impl, axis_name)
    s_lse = ops.logsumexp(s, sa, scale=inv_t, impl=local_impl, **valid).rows
    t_lse = ops.logsumexp(t, ta, scale=t_scale, impl=local_impl, **valid).rows
  dense = _local_dense(impl, b, sa.shape[0], axis_name)
  soft = dict(exclude_self=in_batch, row_ids=ids, dense=dense, **valid)
  cross = _soft_targets.expected_dot(t, ta, t_scale, t_lse, s, sa, **soft)
  neg_entropy = _soft_targets.expected_dot(t, ta, t_scale, t_lse, None, None, **soft)
  kl = neg_entropy + _common.zero_invalid(s_lse, mask) - inv_t * cross
  return _common.reduce_loss(kl, reduction, mask, axis_name)


@_common.keyword_only
@_common.shardable("mixed", "other", "mix_index", "mix_weight", "mask")
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
    axis_name: str | tuple[str, ...] | None = None,
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
  with `bidirectional=False` it is `infonce(mixed, other, temperature=τ)`. Sharded (`axis_name` /
  `mesh`; `mix_index` holds global row numbers, split with the batch), the log-sum-exps run on the
  allgather or ring engine; the partner rows o_{k_i} are read from the gathered `other` (B×D, for
  "ring" too) and w is summed over the devices.

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
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"` (this device's rows under `axis_name`).

  >>> import jax.numpy as jnp
  >>> x, y = jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.eye(2)  # S = [[1, 0], [1, 0]]
  >>> loss = lambda **kw: m3co(x, y, mix_index=jnp.array([1, 0]), mix_weight=0.5, temperature=1.0, **kw)
  >>> round(float(loss(bidirectional=False)), 4)  # row: log(e + 1) - 1/2
  0.8133
  >>> round(float(loss()), 4)  # col: w = [1, 1], (log 2e + log 2)/2 - 1/2 = log 2; loss = (row + col)/2
  0.7532
  """
  m, o = _common.pair("mixed", mixed, "other", other, normalize=normalize, axis_name=axis_name)
  b = m.shape[0]
  b_all = _common.global_size(b, axis_name)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  kept = None if mask is None else _checks.concrete_value(mask)
  mix_index = _checks.check_labels("mix_index", mix_index, b)
  idx = _checks.concrete_value(mix_index)
  if idx is not None and mask is not None:  # padding rows' entries are ignored
    idx = None if kept is None else idx[kept]
  if idx is not None and idx.size and (idx.min() < 0 or idx.max() >= b_all):
    raise ValueError(f"`mix_index` must hold indices in [0, {b_all}), got {idx}.")
  lam = _checks.check_scalar_or_vector("mix_weight", mix_weight, b)
  v = _checks.concrete_value(lam)
  if v is not None and mask is not None and v.ndim == 1:
    v = None if kept is None else v[kept]
  if v is not None:
    _checks.check_finite("mix_weight", v)
  if v is not None and v.size and (v.min() < 0 or v.max() > 1):
    raise ValueError(f"`mix_weight` must lie in [0, 1], got {v if v.size > 1 else v.item()}.")
  lam = jnp.broadcast_to(lam.astype(jnp.float32), (b,))
  ids = _common.batch_ids(b, axis_name)
  if mask is not None:  # padding rows: λ = 1 and k_i = i, so they point at nothing else
    lam = jnp.where(mask, lam, 1.0)
    mix_index = jnp.where(mask, mix_index, ids.astype(mix_index.dtype))
  inv_t = _common.inverse_temperature(temperature)
  lse = ops.logsumexp(m, o, scale=inv_t, rows=True, cols=bool(bidirectional), row_valid=mask, col_valid=mask,
                      impl=impl, axis_name=axis_name)
  o32 = o.astype(jnp.float32)
  own = _common.rowwise_dot(m, o32)
  partner = _common.rowwise_dot(m, _common.gather_batch(o32, axis_name)[mix_index])
  linear = inv_t * (lam * own + (1.0 - lam) * partner)
  row = _common.zero_invalid(lse.rows, mask) - linear
  if not bidirectional:
    return _common.reduce_loss(row, reduction, mask, axis_name)
  spread = jnp.zeros((b_all,), jnp.float32).at[mix_index].add(1.0 - lam)  # Σ_{i: k_i = j} (1 − λ_i)
  if axis_name is not None:
    spread = jax.lax.psum(spread, axis_name)
  col_weight = lam + spread[ids]
  col = col_weight * _common.zero_invalid(lse.cols, mask) - linear
  return _common.reduce_loss(0.5 * (row + col), reduction, mask, axis_name)


@_common.keyword_only
@_common.shardable("image", "text", "image_fine", "text_fine", "mask")
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
    axis_name: str | tuple[str, ...] | None = None,
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
  outside the `dense` engine. Sharded (`axis_name` / `mesh`; all four inputs split over the devices),
  the log-sum-exps run on the allgather or ring engine and the target-weighted sums, which need every
  pair, contract each device's rows against the gathered batches (ring gathers them too).

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
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"` (this device's pairs under `axis_name`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)  # every distribution over the negatives is uniform: L_neg = 0
  >>> round(float(softclip(x, x, x, x, temperature=1.0, target_temperature=1.0, alpha=0.0)), 4)
  0.5514
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
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
  ids = _common.batch_ids(b, axis_name)
  diag = (ids, ids)
  lse = lambda q, k, scale, **kw: ops.logsumexp(q, k, scale=scale, impl=impl, axis_name=axis_name,  # noqa: E731
                                                **valid, **kw)
  # The target-weighted sums: this device's rows against the whole (gathered) batch.
  gather = lambda x: _common.gather_batch(x, axis_name)  # noqa: E731
  fi_all, ft_all, i_all, t_all = gather(fi), gather(ft), gather(i), gather(t)
  soft = dict(row_ids=ids, row_valid=mask, col_valid=gather(mask),
              dense=_local_dense(impl, b, _common.global_size(b, axis_name), axis_name))

  both = lse(i, t, inv_t, rows=True, cols=True)
  positive = inv_t * _common.rowwise_dot(i, t)
  q_i, q_t = lse(fi, fi, t_scale).rows, lse(ft, ft, t_scale).rows
  soft_rows = _soft_targets.expected_dot(fi, fi_all, t_scale, q_i, i, t_all, **soft)
  soft_cols = _soft_targets.expected_dot(ft, ft_all, t_scale, q_t, t, i_all, **soft)
  rows = _common.zero_invalid(both.rows, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_rows
  cols = _common.zero_invalid(both.cols, mask) - (1.0 - alpha) * positive - alpha * inv_t * soft_cols
  l_soft = 0.5 * (rows + cols)

  # Negatives only: every distribution over j ≠ i, renormalised.
  neg = lse(i, t, inv_t, rows=True, cols=True, exclude=diag)
  qn_i, qn_t = lse(fi, fi, t_scale, exclude=diag).rows, lse(ft, ft, t_scale, exclude=diag).rows

  def kl(tq, tq_all, t_lse, q, k_all, s_lse):
    cross = _soft_targets.expected_dot(tq, tq_all, t_scale, t_lse, q, k_all, exclude_self=True, **soft)
    neg_entropy = _soft_targets.expected_dot(tq, tq_all, t_scale, t_lse, None, None, exclude_self=True, **soft)
    return neg_entropy + _common.zero_invalid(s_lse, mask) - inv_t * cross

  l_neg = 0.5 * (kl(fi, fi_all, qn_i, i, t_all, neg.rows) + kl(ft, ft_all, qn_t, t, i_all, neg.cols))
  return _common.reduce_loss(l_soft + jnp.asarray(beta, jnp.float32) * l_neg, reduction, mask, axis_name)
