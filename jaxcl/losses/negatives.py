"""Negatives: hard-negative weighting, false-negative filtering, decoupled and cluster-restricted denominators.

Every loss here is a row loss over S = scale · Q Kᵀ. Where the change to InfoNCE/CLIP is expressible
with `jaxcl.ops.logsumexp` (a scale change, an id mask, extra columns) it runs on every engine; where
the kept negatives depend on per-pair *values* (`positive_aware_infonce`: drop negatives more similar
than the positive, keep the top k; `dual_view_moco` with `top_k`) the loss is dense and says so. A
top-k keeps every candidate tied with the k-th value.

| paper | function | engines |
|---|---|---|
| Filtering, Distillation, and Hard Negatives for Vision-Language Pre-Training | hn_nce | all, allgather, ring |
| Dual-Encoders for Extreme Multi-Label Classification | decoupled_softmax | all (id masks); dense (B×B mask) |
| NV-Embed / Breaking the Modality Barrier (UniME) | positive_aware_infonce | dense only |
| Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning | mcl_nt_xent, mcl_cluster_ids | all, allgather, ring |
| Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives ... | ce_clip | all |
| Momentum Contrastive Learning with Enhanced Negative Sampling and Hard Negative Filtering | dual_view_moco | all; dense with top_k |
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


# ------------------------------------------------------------------------------------ decoupled softmax
@_common.keyword_only
def decoupled_softmax(
    query: jax.Array,
    key: jax.Array,
    *,
    positives: tuple[jax.Array, jax.Array] | jax.Array | None = None,
    temperature: float | jax.Array = 0.05,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  r"""DecoupledSoftmax: InfoNCE in which the *other* positives of a query leave its denominator.

  "Dual-Encoders for Extreme Multi-Label Classification" (Gupta et al., ICLR 2024, DEXML). Each query i
  is paired with one positive label key_i (the batch row); P(i) is the set of in-batch keys that are
  positive for query i (a multi-label query has several). With s_ij = <q_i, k_j> / τ:

      loss = mean_i −log [ e^{s_ii} / (e^{s_ii} + Σ_{j ∉ P(i)} e^{s_ij}) ]

  so positives never compete with each other. When P(i) = {i} it is `infonce`.

  Args:
    query: (B, D). key: (B, D), row-aligned (key_i is the sampled positive label of query i).
    positives: who else is positive for each query: None (only the diagonal: InfoNCE), an id pair
      (row_ids, col_ids) — pairs with equal ids are positives, e.g. label ids when each key is a label —
      which runs on every engine (the ids must make row_ids[i] == col_ids[i], checked when concrete),
      or a (B, B) boolean mask (mask[i, j]: key j is positive for query i), which needs the dense
      engine (`impl` "auto" or "dense"); the mask's diagonal always counts as positive.
    temperature: τ > 0 (may be traced). 0.05 is the authors' setting (nilesh2797/DEXML,
      `configs/dual-encoder.yaml`, whose `losses.py` decoupled softmax is this formula in its default
      sampled-positive mode).
    normalize: L2-normalise first.
    reduction: "mean" (the loss above), "sum" or "none": the (B,) per-query terms, whose mean is the
      loss.
    mask: None or bool (B,); False marks padding pairs: the query is no anchor and its key is in no
      denominator (with either form of `positives`), so a padded batch gives the loss of its valid pairs.
    impl: similarity engine.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (B,) for "none").

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> ids = jnp.array([0, 0, 1])  # queries 0 and 1 share a label: each drops the other's key
  >>> round(float(decoupled_softmax(x, x, positives=(ids, ids), temperature=1.0)), 4)  # see below
  0.3927

  (rows 0 and 1: log(e + 1) − 1 each; row 2: log(e + 2) − 1; the mean of the three.)
  """
  q = _common.embeddings("query", query, normalize=False)
  k = _common.embeddings("key", key, normalize=False)
  _checks.check_same_shape("query", q, "key", k)
  q, k = _common.maybe_normalize(q, normalize), _common.maybe_normalize(k, normalize)
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  b = q.shape[0]
  mask = _common.sample_mask(mask, b)
  positive = inv_t * _common.rowwise_dot(q, k)
  if positives is None or isinstance(positives, (tuple, list)):
    exclude = ops.diagonal(b) if positives is None else positives
    if positives is not None:
      _checks.check_int32("positives[0]", positives[0])
      _checks.check_int32("positives[1]", positives[1])
      r = _checks.concrete_value(positives[0])
      c = _checks.concrete_value(positives[1])
      if r is not None and c is not None and np.shape(r) == np.shape(c) == (b,) and np.any(r != c):
        raise ValueError(
            "`positives` ids must make every row's own key a positive (row_ids[i] == col_ids[i]); rows "
            f"{np.flatnonzero(r != c).tolist()} differ."
        )
    negatives = ops.logsumexp(q, k, scale=inv_t, exclude=exclude, row_valid=mask, col_valid=mask, impl=impl).rows
  else:
    positive_mask = _checks.check_array("positives", positives, ndim=2, floating=False)
    if positive_mask.shape != (b, b) or positive_mask.dtype != jnp.bool_:
      raise ValueError(
          f"`positives` as a mask must be a boolean array of shape ({b}, {b}), got {positive_mask.dtype} of "
          f"shape {positive_mask.shape}."
      )
    resolved = ops.resolve_impl(impl, b, b)
    if resolved != "dense":
      raise ValueError(
          f"`positives` as a (B, B) mask needs the dense engine (impl='dense' or 'auto' on a small batch); "
          f"got impl={impl!r} (resolved to {resolved!r}). Pass an id pair to use the other engines."
      )
    s = inv_t * jnp.einsum("id,jd->ij", q, k, preferred_element_type=jnp.float32)
    valid = ~(positive_mask | jnp.eye(b, dtype=bool))
    if mask is not None:
      valid = valid & mask[None, :]
    negatives = jax.nn.logsumexp(jnp.where(valid, s, -jnp.inf), axis=1)
    negatives = jnp.where(jnp.any(valid, axis=1), negatives, -jnp.inf)
  return _common.reduce_loss(jnp.logaddexp(positive, negatives) - positive, reduction, mask)


# ------------------------------------------------------------------------- positive-aware hard negatives
@_common.keyword_only
def positive_aware_infonce(
    query: jax.Array,
    key: jax.Array,
    *,
    hard_negatives: jax.Array | None = None,
    temperature: float | jax.Array = 0.05,
    threshold: str = "relative",
    margin: float = 0.95,
    top_k: int | None = None,
    in_batch_negatives: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""InfoNCE with positive-aware false-negative filtering and optional top-k hard negatives.

  "NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models" (Lee et al., 2024),
  positive-aware hard-negative mining, and "Breaking the Modality Barrier: Universal Embedding Learning
  with Multimodal LLMs" (Gu et al., 2025, UniME), hard-negative sampling with false-negative filtering.
  With c_ij the cosine similarity of query i and candidate j and c_i⁺ that of its positive, a
  candidate negative is kept only if it is not suspiciously close to the positive:

      threshold="relative" (NV-Embed, margin 0.95):  keep j  iff  c_ij < margin · c_i⁺
      threshold="additive" (UniME, margin e.g. 0.1):  keep j  iff  c_ij < c_i⁺ + margin

  then, if `top_k` is set, only the k most similar kept negatives remain (UniME keeps a few of the
  hardest; k is a parameter here), and

      loss = mean_i −log [ e^{c_i⁺/τ} / (e^{c_i⁺/τ} + Σ_{kept j} e^{c_ij/τ}) ]

  Candidates are the other keys of the batch (`in_batch_negatives`) and the per-row `hard_negatives`.
  The filter and the top-k are selections (no gradient flows through which entries are kept). The
  filter compares cosine similarities (before the temperature). UniME applies it online, as here
  (deepglint/UniME `loss.py`: additive margin 0.1, top-k 8, τ = 0.02). NV-Embed / NV-Retriever apply
  the 95 % rule offline, when mining hard negatives with a teacher embedding model; to follow them
  exactly, mine with the teacher and pass the result as `hard_negatives` with
  `in_batch_negatives=False, margin=1.0` (the online filter then keeps everything below the positive).

  Dense only: the kept set depends on per-pair values (a threshold per row and a top-k), which an id
  mask cannot express, so the (B, B + H) similarities are materialised.

  Args:
    query: (B, D). key: (B, D) positives, row-aligned.
    hard_negatives: None or (B, H, D) mined negatives per row.
    temperature: τ > 0 (0.05 by default; UniME uses 0.02).
    threshold: "relative" or "additive", see above.
    margin: the filter parameter.
    top_k: None (keep every filtered negative) or k >= 1.
    in_batch_negatives: use the other keys of the batch as candidates.
    normalize: L2-normalise first (the filter always uses cosine similarities).
    reduction: "mean" (the loss above), "sum" or "none": the (B,) per-query terms, whose mean is the
      loss.
    mask: None or bool (B,); False marks padding pairs: the query is no anchor, its key is no in-batch
      negative of the other queries, and its `hard_negatives` are ignored.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (B,) for "none").

  >>> import jax.numpy as jnp
  >>> q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> k = jnp.array([[1.0, 0.0], [0.6, 0.8]])  # every negative is kept (0.6 < 0.95, 0 < 0.76)
  >>> round(float(positive_aware_infonce(q, k, temperature=1.0)), 4)  # see below
  0.4421

  (row 0: log(e + e^0.6) − 1; row 1: log(e^0.8 + 1) − 0.8; their mean.)
  """
  q = _checks.check_array("query", query, ndim=2)
  k = _checks.check_array("key", key, ndim=2)
  _checks.check_same_shape("query", q, "key", k)
  _checks.check_choice("threshold", threshold, ("relative", "additive"))
  _checks.check_finite("margin", margin)
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  b, d = q.shape
  mask = _common.sample_mask(mask, b)
  if not in_batch_negatives and (hard_negatives is None or 0 in np.shape(hard_negatives)[:-1]):
    given = "None" if hard_negatives is None else f"shape {np.shape(hard_negatives)}"
    raise ValueError(
        f"`in_batch_negatives=False` needs `hard_negatives` (B, H, D) with H >= 1, got {given}."
    )
  qn, kn = _common.l2_normalize(q.astype(jnp.float32)), _common.l2_normalize(k.astype(jnp.float32))
  qq, kk = (qn, kn) if normalize else (q.astype(jnp.float32), k.astype(jnp.float32))
  cos_pos = _common.rowwise_dot(qn, kn)
  logit_pos = inv_t * _common.rowwise_dot(qq, kk)
  cos, logits = [], []
  if in_batch_negatives:
    _checks.check_min_batch("query", q, 2, why="the in-batch negatives need B >= 2")
    not_negative = jnp.eye(b, dtype=bool) if mask is None else jnp.eye(b, dtype=bool) | ~mask[None, :]
    cos.append(jnp.where(not_negative, jnp.inf, qn @ kn.T))  # neither the positive nor a padding key
    logits.append(inv_t * (qq @ kk.T))
  if hard_negatives is not None:
    n = _checks.check_array("hard_negatives", hard_negatives, ndim=3)
    if n.shape[0] != b or n.shape[2] != d:
      raise ValueError(f"`hard_negatives` must have shape ({b}, H, {d}), got {n.shape}.")
    n32 = n.astype(jnp.float32)
    nn_ = _common.l2_normalize(n32)
    cos.append(jnp.einsum("bd,bhd->bh", qn, nn_))
    logits.append(inv_t * jnp.einsum("bd,bhd->bh", qq, nn_ if normalize else n32))
  cos, logits = jnp.concatenate(cos, axis=1), jnp.concatenate(logits, axis=1)
  bound = margin * cos_pos if threshold == "relative" else cos_pos + margin
  keep = jax.lax.stop_gradient(cos < bound[:, None])
  if top_k is not None:
    if not isinstance(top_k, int) or top_k < 1:
      raise ValueError(f"`top_k` must be a positive int or None, got {top_k!r}.")
    k_eff = min(top_k, cos.shape[1])
    ranked = jnp.where(keep, cos, -jnp.inf)
    kth = jax.lax.top_k(jax.lax.stop_gradient(ranked), k_eff)[0][:, -1]
    keep = keep & (ranked >= kth[:, None])
  negatives = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=1)
  negatives = jnp.where(jnp.any(keep, axis=1), negatives, -jnp.inf)
  return _common.reduce_loss(jnp.logaddexp(logit_pos, negatives) - logit_pos, reduction, mask)


# --------------------------------------------------------------------- cluster-restricted negatives (MCL)
@_common.keyword_only
def mcl_cluster_ids(stage_cluster_ids) -> jax.Array:
  r"""Joint cluster ids over several stages: equal iff the cluster agrees in *every* given stage.

  "Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
  2024, Multistage Contrastive Learning). Stage t trains with negatives drawn from the anchor's cluster
  in the clusterings of the features of all previous stages 1..t−1; pass those clusterings here and
  the result to `mcl_nt_xent`. The final representation concatenates the stage models' features.

  Args:
    stage_cluster_ids: (S, B) integers, row s the cluster id of each example at stage s.
  Returns:
    (B,) int32 ids in [0, B).

  >>> import jax.numpy as jnp
  >>> mcl_cluster_ids(jnp.array([[0, 0, 1, 1], [5, 6, 5, 5]])).tolist()
  [0, 1, 2, 2]
  """
  _checks.check_int32("stage_cluster_ids", stage_cluster_ids)
  ids = jnp.asarray(stage_cluster_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
        f"`stage_cluster_ids` must be an integer array of shape (S, B), got {ids.dtype} of shape {ids.shape}."
    )
  b = ids.shape[1]
  if b * b >= 2**31:
    raise ValueError(f"`stage_cluster_ids` has {b} examples; the joint ids need B² < 2³¹ (B <= 46340).")
  # Compact each stage to [0, B), then fold the stages into one id (mixed radix B, re-compacted after
  # every stage so the values stay below B² and fit int32 for any realistic batch).
  joint = jnp.zeros((b,), jnp.int32)
  for row in ids:
    compact = jnp.searchsorted(jnp.sort(row), row, side="left").astype(jnp.int32)
    combined = joint * b + compact
    joint = jnp.searchsorted(jnp.sort(combined), combined, side="left").astype(jnp.int32)
  return joint


@_common.keyword_only
@_common.shardable("z1", "z2", "cluster_ids", "mask")
def mcl_nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    cluster_ids: jax.Array,
    *,
    temperature: float | jax.Array = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""NT-Xent with cluster-aware negatives: an anchor only contrasts with examples of its own cluster.

  "Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
  2024), cluster-aware negative sampling of Multistage Contrastive Learning (MCL). With z = [z1; z2]
  (2B rows), p(i) the other view of row i and c the cluster ids (the same for both views):

      loss = mean_{i < 2B} [ −s_{i,p(i)} + log Σ_{j ≠ i, c_j = c_i} exp s_ij ],   s_ij = <z_i, z_j> / τ

  The positive is always in the anchor's cluster. Restricting negatives to the cluster removes the
  features the previous stages already learned (they separate clusters) from the contrast, so the new
  stage must learn others. The restriction is an `include` id mask, so every engine applies. With one
  cluster this is `nt_xent`; a singleton cluster leaves only the positive in the denominator (loss 0).

  Args:
    z1, z2: (B, D) two views.
    cluster_ids: (B,) integer cluster of each example (e.g. `mcl_cluster_ids` of earlier stages).
    temperature: τ > 0 (SimCLR's 0.5 by default).
    normalize: L2-normalise first.
    reduction: "mean" (the loss above), "sum" or "none": the (2B,) per-anchor terms in the order
      [z1; z2] (this device's under `axis_name`, as in `nt_xent`), whose mean is the loss.
    mask: None or bool (B,); False marks padding samples, whose two views are neither anchors nor
      negatives of any cluster: a padded batch gives the loss of its valid samples.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch split over
      devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (2B,) for "none").

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(4)
  >>> round(float(mcl_nt_xent(x, x, jnp.array([0, 0, 1, 1]), temperature=1.0)), 4)  # log(e + 2) - 1
  0.5514
  """
  a, b = _common.pair("z1", z1, "z2", z2, normalize=normalize, axis_name=axis_name)
  c = _checks.check_labels("cluster_ids", cluster_ids, a.shape[0])
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  valid = None if mask is None else jnp.tile(mask, 2)
  z = jnp.concatenate([a, b], axis=0)
  cid = jnp.tile(c.astype(jnp.int32), 2)
  ids = _common.batch_ids(a.shape[0], axis_name)
  rows = jnp.concatenate([ids, ids + _common.global_size(a.shape[0], axis_name)])  # view v of sample i: v·B + i
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(rows, rows), include=(cid, cid), row_valid=valid,
                      col_valid=valid, impl=impl, axis_name=axis_name).rows
  partner = _common.rowwise_dot(z, jnp.roll(z, z.shape[0] // 2, axis=0))
  return _common.reduce_loss(_common.zero_invalid(lse, valid) - inv_t * partner, reduction, valid, axis_name)


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


@_common.keyword_only
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
    impl: similarity engine.
  Returns:
    CeClipOutput(loss, thresholds (the updated θ, no gradient), itc, imc, cmr).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> out = ce_clip(x, x, x[:, None, ::-1], logit_scale=1.0)  # each hard negative is the other caption
  >>> round(float(out.itc), 4)  # ½[(log(2e + 2) - 1) + (log(e + 1) - 1)] = ½ log 2 + log(e + 1) - 1
  0.6598
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize)
  b, d = i.shape
  n = _checks.check_array("hard_negatives", hard_negatives, ndim=3)
  _checks.check_min_batch("hard_negatives", n, 1, axis=1, why="the hard-negative terms need one per row")
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
  lse = ops.logsumexp(i, t, scale=scale, rows=True, cols=True, row_valid=mask, col_valid=mask, impl=impl)
  lse_hn = ops.logsumexp(i, flat, scale=scale, include=keep_valid, row_valid=mask, impl=impl).rows
  i2t = jnp.logaddexp(_common.zero_invalid(lse.rows, mask), lse_hn) - positive
  itc = 0.5 * (i2t + _common.zero_invalid(lse.cols, mask) - positive)

  lse_text = ops.logsumexp(t, flat, scale=scale, include=keep_valid, row_valid=mask, impl=impl).rows
  imc = jnp.logaddexp(positive, lse_text) - positive

  s_hn = scale * jnp.einsum("bd,bhd->bh", i, n, preferred_element_type=jnp.float32)
  vf = valid.astype(jnp.float32)
  cmr = jnp.mean(vf * jax.nn.relu(thresholds[None, :] + s_hn - positive[:, None]), axis=1)

  count = jnp.maximum(jnp.sum(vf, axis=0), 1.0)
  mean_positive = _common.reduce_loss(positive, "mean", mask)
  new_thresholds = mean_positive - jnp.sum(vf * s_hn, axis=0) / count
  if threshold_range is not None:
    new_thresholds = jnp.clip(new_thresholds, threshold_range[0], threshold_range[1])
  new_thresholds = jax.lax.stop_gradient(jnp.where(jnp.sum(vf, axis=0) > 0, new_thresholds, thresholds))
  reduce = functools.partial(_common.reduce_loss, reduction=reduction, valid=mask)
  loss = itc + imc_weight * imc + cmr_weight * cmr
  return CeClipOutput(reduce(loss), new_thresholds, reduce(itc), reduce(imc), reduce(cmr))


# ------------------------------------------------------------------------------- MoCo: dual view, top-k
@_common.keyword_only
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
  dense (a per-row top-k of the (B, K) similarities), `impl` is then ignored.

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
    impl: similarity engine for the queue term when `top_k` is None.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (2B,) / (B,) for "none").

  >>> import jax.numpy as jnp
  >>> q = jnp.eye(2)
  >>> queue = jnp.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
  >>> round(float(dual_view_moco(q, q, queue, temperature=1.0, top_k=1)), 4)  # log(2e) - 1 = log 2
  0.6931
  """
  q, k = _common.pair("query", query, "key", key, normalize=False, why="MoCo needs a batch of pairs")
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

  def direction(a, b):
    positive = inv_t * _common.rowwise_dot(a, b)
    if top_k is None:
      negatives = ops.logsumexp(a, n, scale=inv_t, impl=impl).rows
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
    return _common.reduce_loss(jnp.concatenate([direction(q, k), direction(k, q)]), reduction, valid)
  return _common.reduce_loss(direction(q, k), reduction, mask)
