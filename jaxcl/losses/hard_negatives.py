"""Hard negatives: losses whose negatives are importance-weighted or mined by similarity.

The family of losses that change *which* negatives count, or how much, by how similar they are to the
anchor: HN-NCE weights the in-batch negatives towards the hard ones, CE-CLIP adds generated caption hard
negatives (and a rank loss against them), dual-view MoCo keeps the queue's most similar negatives. Every
loss is a row loss over S = scale · Q Kᵀ; where the change to InfoNCE/CLIP is expressible with
`jaxcl.ops.logsumexp` (a scale change, extra columns) it runs on every engine; `dual_view_moco` with
`top_k` keeps negatives by per-pair *values* and is dense (it says so; over devices it gathers the
queue). A top-k keeps every candidate
tied with the k-th value.

| paper | function | engines |
|---|---|---|
| Filtering, Distillation, and Hard Negatives for Vision-Language Pre-Training | hn_nce | all, allgather, ring |
| Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives ... | ce_clip | all, allgather, ring |
| Momentum Contrastive Learning with Enhanced Negative Sampling and Hard Negative Filtering | dual_view_moco | all, allgather, ring; dense with top_k (allgather, ring: queue gathered) |
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


# ------------------------------------------------------------------------------------------------ HN-NCE
def _hn_log_negatives(lse_hard: jax.Array, lse_weight: jax.Array, n_neg) -> jax.Array:
  """log Σ_{j≠i} w_ij exp(s_ij) with w_ij = n · exp(β s_ij) / Σ_{k≠i} exp(β s_ik); −inf when there is no
  negative (n = 0: a mask that leaves one valid pair)."""
  n = jnp.asarray(n_neg, jnp.float32)
  some = (n > 0) & jnp.isfinite(lse_weight)
  return jnp.where(some, jnp.log(jnp.where(some, n, 1.0)) + lse_hard - jnp.where(some, lse_weight, 0.0),
                   -jnp.inf)


@_common.keyword_only
@_common.shardable("image", "text", "mask")
def hn_nce(
    image: jax.Array,
    text: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    alpha: float = 1.0,
    beta: float = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""HN-NCE: CLIP with the negatives importance-weighted towards the hard ones.

  "Filtering, Distillation, and Hard Negatives for Vision-Language Pre-Training" (Radenovic et al.,
  CVPR 2023, DiHT). With s_ij = <x_i, y_j> / τ and B the batch size, the image→text term is

      w_ij = (B − 1) exp(β s_ij) / Σ_{k≠i} exp(β s_ik)                  (j ≠ i)
      L_i2t = mean_i −log [ e^{s_ii} / (α e^{s_ii} + Σ_{j≠i} w_ij e^{s_ij}) ]

  and L_t2i the same over the columns; loss = ½ (L_i2t + L_t2i). β is the concentration (β = 0: plain
  weights, so α = 1, β = 0 is exactly `clip(..., logit_scale=1/τ)`); α = 0 removes the positive from
  the denominator (the decoupled DHN-NCE variant).

  Engine form (exact): Σ_{j≠i} w_ij e^{s_ij} = (B−1) exp(LSE_{j≠i}((1+β) s_ij) − LSE_{j≠i}(β s_ij)),
  two masked log-sum-exps at scales (1+β)/τ and β/τ (rows and columns in one pass each), so every
  engine applies and no B×B matrix is built outside `dense`. The weights are differentiated through,
  as in the importance-sampling estimator of Robinson et al. (2021) that DiHT builds on.

  Args:
    image: (B, D). text: (B, D), row-aligned.
    temperature: τ > 0 (scalar, may be traced).
    alpha: weight α >= 0 of the positive in the denominator (1 in DiHT).
    beta: concentration β >= 0. DiHT released no training code; 0.5 is the setting of a public
      reimplementation (lucas-ventura/CoVR, `hn_nce.yaml`, α = 1), which sums the two directions
      where this function averages them (a factor of 2).
    normalize: L2-normalise both batches first.
    reduction: "mean" (the loss above), "sum" or "none": the (2B,) per-anchor terms, the B image
      anchors (i→t) then the B text anchors (t→i), this device's under `axis_name`; their mean is the
      loss (½ (L_i2t + L_t2i) is the mean over the 2B anchors).
    mask: None or bool (B,); False marks padding pairs, which are neither anchors nor negatives (nor
      counted in B − 1 of the weights): a padded batch gives the loss of its valid pairs.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (2B,) for "none").

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(hn_nce(x, x, temperature=1.0, beta=0.0)), 4)  # = CLIP: log(e + 2) - 1
  0.5514
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_non_negative("alpha", alpha)
  _checks.check_non_negative("beta", beta)
  _common.check_reduction(reduction)
  b = i.shape[0]
  mask = _common.sample_mask(mask, b)
  ids = _common.batch_ids(b, axis_name)
  diag = (ids, ids)
  lse = functools.partial(ops.logsumexp, i, t, rows=True, cols=True, exclude=diag, row_valid=mask,
                          col_valid=mask, impl=impl, axis_name=axis_name)
  hard = lse(scale=(1.0 + beta) * inv_t)
  weight = lse(scale=beta * inv_t)
  positive = inv_t * _common.rowwise_dot(i, t)
  if mask is None:
    n_neg = _common.global_size(b, axis_name) - 1
  else:
    n_neg = _common.batch_sum(mask.astype(jnp.float32), axis_name) - 1.0
  terms = []
  for h, w in ((hard.rows, weight.rows), (hard.cols, weight.cols)):
    h, w = _common.zero_invalid(h, mask), _common.zero_invalid(w, mask)
    log_neg = _hn_log_negatives(h, w, n_neg)
    if isinstance(alpha, (int, float)) and alpha == 0:
      log_den = log_neg
    else:
      log_den = jnp.logaddexp(jnp.log(jnp.asarray(alpha, jnp.float32)) + positive, log_neg)
    terms.append(log_den - positive)
  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(jnp.concatenate(terms), reduction, valid, axis_name)


# --------------------------------------------------------------------------------------------- CE-CLIP
class CeClipOutput(NamedTuple):
  """What `ce_clip` returns. `loss`, `itc`, `imc` and `cmr` follow its `reduction` (scalars, or (B,)
  per-pair terms for "none"), so that loss = itc + imc_weight · imc + cmr_weight · cmr holds for each;
  `thresholds` is always the (H,) θ for the next step (no gradient)."""

  loss: jax.Array
  thresholds: jax.Array  # (H,) the adaptive rank thresholds for the next step
  itc: jax.Array
  imc: jax.Array
  cmr: jax.Array


def _ce_clip_out_specs(batch_spec, reduction):
  """The outputs of `ce_clip` over a mesh: the losses like `reduction`, θ replicated."""
  r = batch_spec if reduction == "none" else PartitionSpec()
  return CeClipOutput(loss=r, thresholds=PartitionSpec(), itc=r, imc=r, cmr=r)


@_common.keyword_only
@_common.shardable("image", "text", "hard_negatives", "valid", "mask", out_specs=_ce_clip_out_specs)
def ce_clip(
    image: jax.Array,
    text: jax.Array,
    hard_negatives: jax.Array,
    *,
    logit_scale: float | jax.Array = 100.0,
    thresholds: jax.Array | None = None,
    valid: jax.Array | None = None,
    imc_weight: float = 0.3,
    cmr_weight: float = 0.2,
    threshold_range: tuple[float, float] | None = (0.0, 10.0),
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> CeClipOutput:
  r"""CE-CLIP: CLIP with caption hard negatives, an intra-modal contrast and a cross-modal rank loss.

  "Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives to Enhance Visio-Linguistic
  Compositional Understanding" (Zhang, Awal & Agrawal, CVPR 2024). Each image I_i has its caption T_i
  and H generated hard-negative captions N_ih (swapped relations, attributes, ...). With
  S(a, b) = logit_scale · <a, b>:

      L_itc = ½ [ mean_i −log softmax over {T_j} ∪ {N_jh} of S(I_i, T_i)
                 + mean_i −log softmax over {I_j} of S(T_i, I_i) ]
      L_imc = mean_i −log [ e^{S(I_i,T_i)} / (e^{S(I_i,T_i)} + Σ_{j,h} e^{S(T_i, N_jh)}) ]
      L_cmr = mean_{i,h} v_ih · max(0, θ_h + S(I_i, N_ih) − S(I_i, T_i))
      loss  = L_itc + imc_weight · L_imc + cmr_weight · L_cmr

  θ_h is an adaptive threshold per hard-negative type h (a curriculum): after each step
  θ_h ← clip(mean_i S(I_i, T_i) − mean_{i: v_ih} S(I_i, N_ih), 0, 10), returned as `thresholds` to feed
  back. v_ih (`valid`) marks which hard negatives exist. Details follow the authors' code
  (lezhang7/Enhance-FineGrained, `Clip_DALoss` and its training script: image→text over all captions
  and hard negatives, text→image over images only, the "mean" threshold rule, θ starting at 0 and
  clamped to [0, upper_bound = 10] after every step, the released run's weights IMC 0.3 and CMR 0.2).
  One deviation: the authors keep non-existent hard negatives (padding captions) in the i→t and IMC
  denominators and mask them only in the rank loss; here `valid` removes them everywhere. Every S
  reduction is an engine `logsumexp` (the hard negatives are extra columns), so every engine applies.

  With imc_weight = cmr_weight = 0 and no hard negatives in the denominator this is `clip`.

  Args:
    image: (B, D). text: (B, D) the true captions. hard_negatives: (B, H, D) caption hard negatives.
    logit_scale: the CLIP multiplier (100 for a trained CLIP; may be traced).
    thresholds: (H,) current θ (zeros when None, i.e. the first step).
    valid: (B, H) boolean, which hard negatives exist (all when None).
    imc_weight, cmr_weight: the loss weights.
    threshold_range: (low, high) the updated θ is clipped to, in logit units; None: no clipping.
    normalize: L2-normalise all embeddings first.
    reduction: "mean" (the loss above), "sum" or "none": the (B,) per-pair terms
      ℓ_i = ½ (itc_i^{i→t} + itc_i^{t→i}) + imc_weight · imc_i + cmr_weight · mean_h cmr_ih, whose mean
      is the loss; `itc`, `imc` and `cmr` of the output are reduced the same way.
    mask: None or bool (B,); False marks padding pairs: neither their image nor their text is an
      anchor or a negative, and their hard negatives are ignored everywhere (as `valid` False), also in
      the θ update, so a padded batch gives the loss and θ of its valid pairs.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch (image, text,
      hard_negatives, valid, mask) split over devices, every denominator over the global batch and its
      hard negatives (engine log-sum-exps: the ring never gathers the keys), θ from global means.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the returned θ is the same on every device.
  Returns:
    CeClipOutput(loss, thresholds (the updated θ, no gradient), itc, imc, cmr).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> out = ce_clip(x, x, x[:, None, ::-1], logit_scale=1.0)  # each hard negative is the other caption
  >>> round(float(out.itc), 4)  # ½[(log(2e + 2) - 1) + (log(e + 1) - 1)] = ½ log 2 + log(e + 1) - 1
  0.6598
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  b, d = i.shape
  n = _checks.check_array("hard_negatives", hard_negatives, ndim=3)
  _checks.check_min_batch("hard_negatives", n, 1, axis=1, why="the hard-negative terms need one per row")
  if n.shape[0] != b or n.shape[2] != d:
    raise ValueError(f"`hard_negatives` must have shape ({b}, H, {d}), got {n.shape}.")
  h = n.shape[1]
  n = _common.maybe_normalize(n, normalize)
  scale = _common.logit_scale(logit_scale)
  _checks.check_non_negative("imc_weight", imc_weight)
  _checks.check_non_negative("cmr_weight", cmr_weight)
  if threshold_range is not None and not (
      len(threshold_range) == 2 and float(threshold_range[0]) <= float(threshold_range[1])):
    raise ValueError(f"`threshold_range` must be None or (low, high) with low <= high, got {threshold_range!r}.")
  if thresholds is None:
    thresholds = jnp.zeros((h,), jnp.float32)
  thresholds = _checks.check_array("thresholds", thresholds, ndim=1)
  if thresholds.shape != (h,):
    raise ValueError(f"`thresholds` must have shape ({h},), one per hard-negative type, got {thresholds.shape}.")
  if valid is None:
    valid = jnp.ones((b, h), bool)
  valid = jnp.asarray(valid)
  if valid.shape != (b, h) or valid.dtype != jnp.bool_:
    raise ValueError(f"`valid` must be a boolean array of shape ({b}, {h}), got {valid.dtype} {valid.shape}.")
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  if mask is not None:
    valid = valid & mask[:, None]
  flat = jnp.reshape(n, (b * h, d))
  flat_valid = jnp.reshape(valid, (b * h,))
  # Invalid hard negatives leave every denominator: id -1 never equals a row id >= 0.
  neg_ids = jnp.where(flat_valid, 0, -1).astype(jnp.int32)
  keep_valid = (jnp.zeros((b,), jnp.int32), neg_ids)

  positive = scale * _common.rowwise_dot(i, t)
  lse = functools.partial(ops.logsumexp, scale=scale, row_valid=mask, impl=impl, axis_name=axis_name)
  both = lse(i, t, rows=True, cols=True, col_valid=mask)
  lse_hn = lse(i, flat, include=keep_valid).rows
  i2t = jnp.logaddexp(_common.zero_invalid(both.rows, mask), lse_hn) - positive
  itc = 0.5 * (i2t + _common.zero_invalid(both.cols, mask) - positive)

  lse_text = lse(t, flat, include=keep_valid).rows
  imc = jnp.logaddexp(positive, lse_text) - positive

  s_hn = scale * jnp.einsum("bd,bhd->bh", i, n, preferred_element_type=jnp.float32)
  vf = valid.astype(jnp.float32)
  cmr = jnp.mean(vf * jax.nn.relu(thresholds[None, :] + s_hn - positive[:, None]), axis=1)

  n_valid = _common.batch_sum_rows(vf, axis_name)  # (H,) over the global batch
  mean_positive = _common.reduce_loss(positive, "mean", mask, axis_name)
  new_thresholds = mean_positive - _common.batch_sum_rows(vf * s_hn, axis_name) / jnp.maximum(n_valid, 1.0)
  if threshold_range is not None:
    new_thresholds = jnp.clip(new_thresholds, threshold_range[0], threshold_range[1])
  new_thresholds = jax.lax.stop_gradient(jnp.where(n_valid > 0, new_thresholds, thresholds))
  reduce = functools.partial(_common.reduce_loss, reduction=reduction, valid=mask, axis_name=axis_name)
  loss = itc + imc_weight * imc + cmr_weight * cmr
  return CeClipOutput(reduce(loss), new_thresholds, reduce(itc), reduce(imc), reduce(cmr))


# ------------------------------------------------------------------------------- MoCo: dual view, top-k
@_common.keyword_only
@_common.shardable("query", "key", "queue", "mask")
def dual_view_moco(
    query: jax.Array,
    key: jax.Array,
    queue: jax.Array,
    *,
    temperature: float | jax.Array = 0.2,
    top_k: int | None = None,
    dual_view: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MoCo with a dual-view loss and cosine-similarity hard-negative selection from the queue.

  "Momentum Contrastive Learning with Enhanced Negative Sampling and Hard Negative Filtering" (Hoang et
  al., 2025). With a queue of K negatives n_1..n_K and, for anchor a_i with positive b_i, N_i the
  negatives kept for that anchor (all K, or the `top_k` most cosine-similar to a_i):

      ℓ(a, b) = mean_i −log [ e^{<a_i,b_i>/τ} / (e^{<a_i,b_i>/τ} + Σ_{n ∈ N_i} e^{<a_i,n>/τ}) ]
      loss    = ½ (ℓ(q, k) + ℓ(k, q))     (dual view: the key is an anchor too; ℓ(q, k) otherwise)

  With `top_k=None` and `dual_view=False` this is MoCo's loss, `infonce(query, key, negatives=queue,
  in_batch_negatives=False)`. Choices: the paper selects "the most challenging negatives based on
  cosine similarity"; here that is a per-anchor top-k (k a parameter, no default from the paper), and
  the selection carries no gradient. Gradients flow into both `query` and `key`; as in MoCo, pass a
  stop-gradient key from the momentum encoder if it must not be trained.

  Engines: without `top_k` the queue term is a `jaxcl.ops.logsumexp` (every engine); with `top_k` it is
  dense (a per-row top-k of the (B, K) similarities), `impl` is then ignored. On a batch split over
  devices (`axis_name` / `mesh`, "allgather" | "ring") the queue is split along K like `infonce`'s:
  without `top_k` the queue term is the engine's global log-sum-exp (the ring never gathers the
  queue); with `top_k` both engines gather the queue (the top k needs every pair) and compute the
  local anchors densely.

  Args:
    query: (B, D) online-encoder embeddings. key: (B, D) momentum-encoder embeddings (positives).
    queue: (K, D) negatives.
    temperature: τ > 0 (MoCo v2: 0.2).
    top_k: None or the number of hardest queue negatives kept per anchor (1 <= k).
    dual_view: average the two directions.
    normalize: L2-normalise query, key and queue first.
    reduction: "mean" (the loss above), "sum" or "none": the per-anchor terms, (2B,) with `dual_view`
      (the B query anchors, then the B key anchors) or (B,) without; their mean is the loss.
    mask: None or bool (B,); False marks padding pairs, which are no anchors (the negatives all come
      from the queue, which is shared and never masked).
    impl: similarity engine for the queue term when `top_k` is None; "allgather" | "ring" for a batch
      split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses` ("none" gives this device's anchors,
      its query anchors then its key anchors).
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (2B,) / (B,) for "none").

  >>> import jax.numpy as jnp
  >>> q = jnp.eye(2)
  >>> queue = jnp.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
  >>> round(float(dual_view_moco(q, q, queue, temperature=1.0, top_k=1)), 4)  # log(2e) - 1 = log 2
  0.6931
  """
  q, k = _common.pair("query", query, "key", key, normalize=False, why="MoCo needs a batch of pairs",
                      axis_name=axis_name)
  n = _checks.check_array("queue", queue, ndim=2)
  _checks.check_min_batch("queue", n, 1, why="the queue holds the negatives")
  if n.shape[1] != q.shape[1]:
    raise ValueError(f"`queue` must have feature size {q.shape[1]} like `query`, got shape {n.shape}.")
  inv_t = _common.inverse_temperature(temperature)
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"`top_k` must be a positive int or None, got {top_k!r}.")
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, q.shape[0])
  if mask is not None:  # padding rows become zeros: finite terms, dropped by the reduction, zero gradient
    q, k = (jnp.where(mask[:, None], x, jnp.zeros_like(x)) for x in (q, k))
  q, k, n = (_common.maybe_normalize(x, normalize) for x in (q, k, n))
  if top_k is not None:
    n = _common.gather_batch(n, axis_name)  # the per-anchor top k needs every queue entry

  def direction(a, b):
    positive = inv_t * _common.rowwise_dot(a, b)
    if top_k is None:
      negatives = ops.logsumexp(a, n, scale=inv_t, impl=impl, axis_name=axis_name).rows
    else:
      sims = jnp.einsum("id,kd->ik", a, n, preferred_element_type=jnp.float32)
      cos = sims if normalize else jnp.einsum(
          "id,kd->ik", _common.l2_normalize(a.astype(jnp.float32)), _common.l2_normalize(n.astype(jnp.float32))
      )
      kth = jax.lax.top_k(jax.lax.stop_gradient(cos), min(top_k, n.shape[0]))[0][:, -1]
      keep = jax.lax.stop_gradient(cos >= kth[:, None])
      negatives = jax.nn.logsumexp(jnp.where(keep, inv_t * sims, -jnp.inf), axis=1)
    return jnp.logaddexp(positive, negatives) - positive

  if dual_view:
    valid = None if mask is None else jnp.concatenate([mask, mask])
    return _common.reduce_loss(jnp.concatenate([direction(q, k), direction(k, q)]), reduction, valid, axis_name)
  return _common.reduce_loss(direction(q, k), reduction, mask, axis_name)
