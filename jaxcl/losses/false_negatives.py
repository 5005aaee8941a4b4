"""False negatives: losses that keep a query's other positives (or likely positives) out of its denominator.

The family of InfoNCE variants in which some in-batch candidates are not contrasted against because they
are, or look like, positives: DecoupledSoftmax drops every known positive of a multi-label query from
its denominator; positive-aware InfoNCE drops candidates more similar than the positive (a per-row
threshold) and may keep only the top k of the rest. Known positives are an id mask (every engine) or a
(B, B) mask (dense); the similarity filter depends on per-pair *values*, which an id mask cannot
express, so `positive_aware_infonce` is dense and says so. A top-k keeps every candidate tied with the
k-th value.

| paper | function | engines |
|---|---|---|
| Dual-Encoders for Extreme Multi-Label Classification | decoupled_softmax | all, allgather, ring (id masks); dense, allgather, ring with keys gathered (B×B mask) |
| NV-Embed / Breaking the Modality Barrier (UniME) | positive_aware_infonce | dense only |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


# ------------------------------------------------------------------------------------ decoupled softmax
@_common.keyword_only
@_common.shardable("query", "key", "positives", "mask")
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
    axis_name: str | tuple[str, ...] | None = None,
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
      loss; this device's under `axis_name`.
    mask: None or bool (B,); False marks padding pairs: the query is no anchor and its key is in no
      denominator (with either form of `positives`), so a padded batch gives the loss of its valid pairs.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch split over
      devices. With id pairs (or None) the denominators are the engine's global log-sum-exp (the ring
      never gathers the keys); with a (B, B) mask, split by rows like the batch ((B/n, B) per device),
      both engines gather the keys and compute the local rows densely (the mask names every pair).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; id pairs hold global ids.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (B,) for "none").

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> ids = jnp.array([0, 0, 1])  # queries 0 and 1 share a label: each drops the other's key
  >>> round(float(decoupled_softmax(x, x, positives=(ids, ids), temperature=1.0)), 4)  # see below
  0.3927

  (rows 0 and 1: log(e + 1) − 1 each; row 2: log(e + 2) − 1; the mean of the three.)
  """
  q, k = _common.pair("query", query, "key", key, normalize=normalize, axis_name=axis_name)
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  b = q.shape[0]
  mask = _common.sample_mask(mask, b)
  positive = inv_t * _common.rowwise_dot(q, k)
  ids = _common.batch_ids(b, axis_name)
  if positives is None or isinstance(positives, (tuple, list)):
    exclude = (ids, ids) if positives is None else positives
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
    negatives = ops.logsumexp(q, k, scale=inv_t, exclude=exclude, row_valid=mask, col_valid=mask, impl=impl,
                              axis_name=axis_name).rows
  else:
    n_cols = _common.global_size(b, axis_name)
    positive_mask = _checks.check_array("positives", positives, ndim=2, floating=False)
    if positive_mask.shape != (b, n_cols) or positive_mask.dtype != jnp.bool_:
      shape = f"({b}, {n_cols})" if axis_name is None else f"({b}, {n_cols}) on each device (B/n, B)"
      raise ValueError(
          f"`positives` as a mask must be a boolean array of shape {shape}, got {positive_mask.dtype} of "
          f"shape {positive_mask.shape}."
      )
    resolved = impl if axis_name is not None else ops.resolve_impl(impl, b, b)
    if resolved not in ("dense", "allgather", "ring", "auto"):
      raise ValueError(
          f"`positives` as a (B, B) mask needs the dense engine (impl='dense' or 'auto' on a small batch); "
          f"got impl={impl!r} (resolved to {resolved!r}). Pass an id pair to use the other engines."
      )
    all_keys = _common.gather_batch(k, axis_name)  # the mask names every pair: the ring gathers too
    s = inv_t * jnp.einsum("id,jd->ij", q, all_keys, preferred_element_type=jnp.float32)
    valid = ~(positive_mask | (ids[:, None] == jnp.arange(n_cols, dtype=jnp.int32)[None, :]))
    if mask is not None:
      valid = valid & _common.gather_batch(mask, axis_name)[None, :]
    negatives = jax.nn.logsumexp(jnp.where(valid, s, -jnp.inf), axis=1)
    negatives = jnp.where(jnp.any(valid, axis=1), negatives, -jnp.inf)
  return _common.reduce_loss(jnp.logaddexp(positive, negatives) - positive, reduction, mask, axis_name)


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
