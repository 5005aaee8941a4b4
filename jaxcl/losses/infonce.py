"""InfoNCE and the SimCLR family (NT-Xent, DCL, DCLW): softmax losses with positives on a diagonal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
@_common.shardable("query", "key", "negatives", "mask")
def infonce(
    query: jax.Array,
    key: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    negatives: jax.Array | None = None,
    in_batch_negatives: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""InfoNCE, one direction: each query's positive is the key in the same row.

  "Representation Learning with Contrastive Predictive Coding" (van den Oord et al., 2018); with a
  queue of negatives and `in_batch_negatives=False` it is the MoCo loss ("Momentum Contrast for
  Unsupervised Visual Representation Learning", He et al., 2020).

      s_ij = <q_i, k_j> / τ
      ℓ_i = −s_ii + log( Σ_{j ∈ batch, m_j} exp s_ij + Σ_{n ∈ N(i)} exp <q_i, n>/τ )
      loss = mean_{i: m_i} ℓ_i

  where the batch sum is present when `in_batch_negatives` (else only the positive s_ii), N(i) is
  `negatives`: shared (K, D) negatives (a MoCo queue, mined hard negatives) or per-row (B, H, D), and
  m = `mask` (all True by default).

  Args:
    query: (B, D) anchors. key: (B, D) positives, row-aligned with `query`.
    temperature: τ > 0 (scalar, may be a traced learnable value).
    negatives: None, (K, D) shared or (B, H, D) per-row extra negatives.
    in_batch_negatives: use the other keys of the batch as negatives.
    normalize: L2-normalise query, key and negatives first.
    reduction: "mean" (over the valid anchors), "sum" or "none" (the (B,) per-query ℓ_i, 0 where
      masked; this device's queries under `axis_name`).
    mask: None or bool (B,): False marks padding rows (query i and key i), which are neither anchors
      nor negatives; the queue `negatives` are not masked.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" / "ring" for a batch split
      over devices (see `axis_name`).
    axis_name, mesh: the batch split over devices, see "Sharded batches" in the `jaxcl.losses`
      docstring. Shared `negatives` (a MoCo queue) are then split along K, per-row ones along B.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(4)
  >>> round(float(infonce(x, x, temperature=1.0)), 4)  # log(e + 3) - 1
  0.7437
  """
  query = _checks.check_array("query", query, ndim=2)
  key = _checks.check_array("key", key, ndim=2)
  _checks.check_same_shape("query", query, "key", key)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, query.shape[0])
  if not in_batch_negatives and (negatives is None or 0 in np.shape(negatives)[:-1]):
    given = "None" if negatives is None else f"shape {np.shape(negatives)}"
    raise ValueError(
        f"`in_batch_negatives=False` needs `negatives` (K, D) or (B, H, D) with K, H >= 1, got {given}."
    )
  if in_batch_negatives and negatives is None:
    _common.check_global_batch("query", query, 2, axis_name, why="the in-batch negatives need B >= 2")
  inv_t = _common.inverse_temperature(temperature)
  q = _common.maybe_normalize(query, normalize)
  k = _common.maybe_normalize(key, normalize)
  positive = inv_t * _common.rowwise_dot(q, k)

  lse_rows = lambda keys, col_valid=None: ops.logsumexp(
      q, keys, scale=inv_t, row_valid=mask, col_valid=col_valid, impl=impl, axis_name=axis_name).rows
  terms = [lse_rows(k, mask)] if in_batch_negatives else [positive]
  if negatives is not None:
    negatives = _checks.check_array("negatives", negatives, ndim=(2, 3))
    if negatives.shape[-1] != q.shape[1]:
      raise ValueError(
          f"`negatives` must have feature size {q.shape[1]} like `query`, got shape {negatives.shape}."
      )
    if negatives.ndim == 3 and negatives.shape[0] != q.shape[0]:
      raise ValueError(
          f"per-row `negatives` must have shape ({q.shape[0]}, H, {q.shape[1]}), got {negatives.shape}."
      )
    n = _common.maybe_normalize(negatives, normalize)
    if n.ndim == 2:
      terms.append(lse_rows(n))
    else:
      s = jnp.einsum("bd,bhd->bh", q, n, preferred_element_type=jnp.float32)
      terms.append(jax.nn.logsumexp(inv_t * s, axis=1))
  terms = [_common.zero_invalid(t, mask) for t in terms]  # a masked row's -inf before any arithmetic
  lse = terms[0] if len(terms) == 1 else jnp.logaddexp(*terms)
  return _common.reduce_loss(lse - positive, reduction, mask, axis_name)


def _two_views(z1, z2, normalize, reduction, mask, axis_name):
  """Validates the two views (the global batch needs two samples) and stacks them into the 2B anchors
  [z1; z2]; the per-sample mask becomes the anchors' validity [mask; mask]."""
  a, b = _common.pair("z1", z1, "z2", z2, normalize=normalize, axis_name=axis_name)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  return jnp.concatenate([a, b], axis=0), (None if mask is None else jnp.concatenate([mask, mask]))


def _view_ids(n_local: int, axis_name) -> jax.Array:
  """Global ids of the 2·n_local local rows [z1; z2]: view v of global sample i is v·B + i."""
  ids = _common.batch_ids(n_local, axis_name)
  return jnp.concatenate([ids, ids + _common.global_size(n_local, axis_name)])


def _partner_dot(z: jax.Array) -> jax.Array:
  """<z_i, z_{i±B}>: each of the 2B views against its other view."""
  return _common.rowwise_dot(z, jnp.roll(z, z.shape[0] // 2, axis=0))


@_common.keyword_only
@_common.shardable("z1", "z2", "mask")
def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""NT-Xent, the SimCLR loss over 2B views.

  "A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., 2020).
  With z = [z1; z2] (2B rows) and p(i) the other view of row i:

      ℓ_i = −s_{i,p(i)} + log Σ_{j ≠ i} exp s_ij,   s_ij = <z_i, z_j> / τ,   loss = mean_{i < 2B} ℓ_i

  Identical views give log(2B − 1).

  `reduction`: "mean", "sum" or "none" (the (2B,) ℓ_i in the order [z1; z2]; this device's under
  `axis_name`). `mask`: None or bool (B,); False marks padding samples, whose two views are neither
  anchors nor negatives (the mean runs over the valid anchors).

  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(nt_xent(x, x, temperature=1.0)), 4)  # log(e + 4) - 1
  0.9048
  """
  z, valid = _two_views(z1, z2, normalize, reduction, mask, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  ids = _view_ids(z.shape[0] // 2, axis_name)
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(ids, ids), row_valid=valid, col_valid=valid, impl=impl,
                      axis_name=axis_name).rows
  lse = _common.zero_invalid(lse, valid)
  return _common.reduce_loss(lse - inv_t * _partner_dot(z), reduction, valid, axis_name)


def _decoupled_lse(z: jax.Array, inv_t, valid, impl: str, axis_name) -> jax.Array:
  """log Σ_{j ∉ {i, p(i)}, valid} exp s_ij (0 for an invalid anchor): both views of an instance share
  its (global) sample id."""
  instance = jnp.tile(_common.batch_ids(z.shape[0] // 2, axis_name), 2)
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(instance, instance), row_valid=valid, col_valid=valid,
                      impl=impl, axis_name=axis_name).rows
  return _common.zero_invalid(lse, valid)


@_common.keyword_only
@_common.shardable("z1", "z2", "mask")
def dcl(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Decoupled contrastive loss: NT-Xent with the positive removed from the denominator.

  "Decoupled Contrastive Learning" (Yeh et al., ECCV 2022). With z = [z1; z2] and p(i) the other view:

      ℓ_i = −s_{i,p(i)} + log Σ_{j ∉ {i, p(i)}} exp s_ij,   s_ij = <z_i, z_j> / τ,   loss = mean_{i < 2B} ℓ_i

  Always <= `nt_xent` at the same temperature. `reduction` ("none": the (2B,) ℓ_i in the order [z1; z2])
  and `mask` (bool (B,), False for padding samples) as in `nt_xent`.

  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(dcl(x, x, temperature=1.0)), 4)  # log 4 - 1
  0.3863
  """
  z, valid = _two_views(z1, z2, normalize, reduction, mask, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  per_anchor = _decoupled_lse(z, inv_t, valid, impl, axis_name) - inv_t * _partner_dot(z)
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)


@_common.keyword_only
@_common.shardable("z1", "z2", "mask")
def dclw(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    sigma: float = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Weighted decoupled contrastive loss (DCLW), "Decoupled Contrastive Learning" (Yeh et al., 2022).

      w_i = 2 − B · softmax_i(<z1_i, z2_i> / σ)     (over the batch; a constant: no gradient)
      ℓ_i = −w_i s_{i,p(i)} + log Σ_{j ∉ {i, p(i)}} exp s_ij,   loss = mean_{i < 2B} ℓ_i

  Pairs that are already well aligned get less weight. With σ → ∞, w → 1 and DCLW → DCL.
  `reduction` ("none": the (2B,) ℓ_i in the order [z1; z2]) and `mask` (bool (B,), False for padding
  samples) as in `nt_xent`; with a mask, B and the softmax run over the valid samples.

  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(dclw(x, x, temperature=1.0)), 4)  # equal positives: w = 1, the DCL value
  0.3863
  """
  z, valid = _two_views(z1, z2, normalize, reduction, mask, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_positive("sigma", sigma)
  b = z.shape[0] // 2
  pos = _partner_dot(z)
  logits = pos[:b] / jnp.asarray(sigma, jnp.float32)
  # B · softmax over the GLOBAL batch of B (valid) pairs.
  if valid is None:
    weight = 2.0 - _common.global_size(b, axis_name) * jnp.exp(logits - _common.batch_logsumexp(logits, axis_name))
  else:
    kept = valid[:b]
    logits = jnp.where(kept, logits, -jnp.inf)
    n_valid = _common.batch_sum(kept.astype(jnp.float32), axis_name)
    lse = _common.batch_logsumexp(logits, axis_name)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # -inf when no sample is valid
    weight = jnp.where(kept, 2.0 - n_valid * jnp.exp(logits - lse), 0.0)
  weight = jax.lax.stop_gradient(jnp.tile(weight, 2))
  per_anchor = _decoupled_lse(z, inv_t, valid, impl, axis_name) - weight * inv_t * pos
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)
