"""Cross-modal softmax losses beyond CLIP: CWCL (soft intra-modal targets) and Symile (M modalities)."""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


def _check_weights(weights, b: int, b_global: int) -> jax.Array:
  """An explicit (B, B) target matrix (this device's (B/n, B) rows when sharded): finite, non-negative,
  every row with a positive sum."""
  weights = _checks.check_array("weights", weights, ndim=2)
  if weights.shape != (b, b_global):
    want = f"({b}, {b})" if b == b_global else f"({b}, {b_global}) on this device (rows of the global (B, B))"
    raise ValueError(f"`weights` must have shape {want} like the batch, got {weights.shape}.")
  w = _checks.concrete_value(weights)
  if w is not None:
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
      raise ValueError("`weights` must be finite and non-negative, got an entry outside [0, inf).")
    if np.any(w.sum(axis=1) <= 0):
      raise ValueError(f"every row of `weights` must have a positive sum, got row sums {w.sum(axis=1)}.")
  return weights.astype(jnp.float32)


def _column_sum(x: jax.Array, axis_name) -> jax.Array:
  """Σ_i x_i over the rows of the global batch (this device's rows summed over the devices)."""
  total = jnp.sum(x, axis=0)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _column_sum_outer(a: jax.Array, b: jax.Array, axis_name) -> jax.Array:
  """Aᵀ B = Σ_i a_i b_iᵀ (D×D) over the rows of the global batch."""
  total = a.T @ b
  return total if axis_name is None else jax.lax.psum(total, axis_name)


@_common.keyword_only
@_common.shardable("frozen", "trained", "weights", "mask")
def cwcl(
    frozen: jax.Array,
    trained: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    weights: jax.Array | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""CWCL: contrastive loss with continuous targets from the frozen modality's own similarities.

  "CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss" (Srinivasa et al., NeurIPS
  2023). `frozen` f comes from the pre-trained (locked) encoder, `trained` t from the one being aligned
  to it. With S_ij = <f_i, t_j> / τ and the soft targets of anchor i

      w_ij = (1 + <f̂_i, f̂_j>) / 2  ∈ [0, 1]       (f̂ = f / ‖f‖: cosine similarity in the frozen space)

      L_f→t = mean_i −(1/Σ_j w_ij) Σ_j w_ij log softmax_j(S_i·)    (rows: f_i against every t_j)
      L_t→f = mean_i −(1/Σ_j w_ij) Σ_j w_ij log softmax_j(S_·i)    (columns: t_i against every f_j)
      loss = ½ (L_f→t + L_t→f)

  The two directions are averaged as in CLIP (the paper adds them: twice this value), so with
  `weights = I` the loss is `clip(frozen, trained, logit_scale=1/τ)`. The weights are targets computed
  from the frozen side: no gradient flows through them. An explicit (B, B) `weights` is used as given,
  weights[i, j] being the target weight of sample j for anchor i in both directions.

  Σ_j w_ij S_ij is linear in S and never needs it: with F̂ the normalised frozen batch it is
  ½ <f_i, Σ_j t_j> + ½ f̂_iᵀ (F̂ᵀ T) f_i, all D×D products (B·B·D with explicit weights). Sharded
  (`axis_name` / `mesh`), Σ_j t_j and F̂ᵀT are summed over the devices, so every engine applies and
  the ring never gathers the batch; explicit weights are split by rows (each device its anchors' rows of
  the (B, B) matrix) and need every pair: both batches are gathered then, for "ring" too.

  Args:
    frozen: (B, D) embeddings of the pre-trained modality. trained: (B, D), row-aligned.
    temperature: τ > 0 (scalar, may be traced).
    weights: None (the paper's intra-modal weights) or an explicit non-negative (B, B) array.
    normalize: L2-normalise both batches first (the weights always use cosine similarity).
    reduction: "mean", "sum" or "none": the (2B,) per-anchor terms (B `frozen` anchors, then B
      `trained` anchors; this device's under `axis_name`), whose mean is the loss.
    mask: None or bool (B,): False marks padding pairs, which are neither anchors nor candidates (the
      target weights of padding columns are 0).
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (2B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # w = [[1, ½], [½, 1]]
  >>> round(float(cwcl(x, x, temperature=1.0)), 4)  # log(e + 1) - 2/3
  0.6466
  """
  f, t = _common.pair("frozen", frozen, "trained", trained, normalize=normalize, axis_name=axis_name)
  inv_t = _common.inverse_temperature(temperature)
  b = f.shape[0]
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  w = None if weights is None else _check_weights(weights, b, _common.global_size(b, axis_name))
  lse = ops.logsumexp(f, t, scale=inv_t, rows=True, cols=True, row_valid=mask, col_valid=mask, impl=impl,
                      axis_name=axis_name)
  # Padding rows are zeroed, so every sum over candidates j below runs over the real samples only.
  keep = lambda x: _common.zero_invalid(x, None if mask is None else mask[:, None])
  f32, t32 = keep(f.astype(jnp.float32)), keep(t.astype(jnp.float32))
  if w is None:
    fh = keep(jax.lax.stop_gradient(_common.l2_normalize(frozen.astype(jnp.float32))))
    n = (_common.global_size(b, axis_name) if mask is None
         else _common.batch_sum(mask.astype(jnp.float32), axis_name))
    # Σ_j w_ij <f_i, t_j> and Σ_j w_ij <f_j, t_i> through D×D matrices F̂ᵀT and F̂ᵀF.
    fh_t = _column_sum_outer(fh, t32, axis_name)
    fh_f = _column_sum_outer(fh, f32, axis_name)
    row_target = 0.5 * (f32 @ _column_sum(t32, axis_name)) + 0.5 * _common.rowwise_dot(fh @ fh_t, f32)
    col_target = 0.5 * (t32 @ _column_sum(f32, axis_name)) + 0.5 * _common.rowwise_dot(fh @ fh_f, t32)
    total = 0.5 * n + 0.5 * (fh @ _column_sum(fh, axis_name))
  else:  # explicit weights: this device's rows against the gathered batch
    all_mask = _common.gather_batch(mask, axis_name)
    w = w if mask is None else jnp.where(all_mask[None, :], w, 0.0)
    row_target = _common.rowwise_dot(f32, w @ _common.gather_batch(t32, axis_name))
    col_target = _common.rowwise_dot(t32, w @ _common.gather_batch(f32, axis_name))
    total = jnp.sum(w, axis=1)
  total = _common.zero_invalid(total, mask) + (0.0 if mask is None else (~mask).astype(jnp.float32))
  rows = _common.zero_invalid(lse.rows, mask) - inv_t * row_target / total
  cols = _common.zero_invalid(lse.cols, mask) - inv_t * col_target / total
  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(jnp.concatenate([rows, cols]), reduction, valid, axis_name)


@_common.keyword_only
@_common.shardable("modalities", "mask")
def symile(
    *modalities: jax.Array,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Symile: contrastive loss over M >= 2 modalities with the multilinear inner product.

  "Contrasting with Symile: Simple Model-Agnostic Representation Learning for Unlimited Modalities"
  (Saporta et al., NeurIPS 2024). With MIP(a, b, c, ...) = Σ_d a_d b_d c_d ... and each modality m in
  turn the target, row i's other modalities form the context c_i^m = ⊙_{m' ≠ m} x_i^{m'} and the
  candidates are the m-embeddings of every sample j (the O(N) negative sampling of the paper):

      logits^m_ij = logit_scale · <c_i^m, x_j^m> = logit_scale · MIP(x_i^1, ..., x_j^m, ..., x_i^M)
      loss = (1/M) Σ_m mean_i [ −logits^m_ii + log Σ_j exp logits^m_ij ]

  One `jaxcl.ops.logsumexp` per modality; the positive logit logit_scale · MIP(x_i^1, ..., x_i^M) is the
  same for every m. With M = 2 this is `clip`. Sharded (`axis_name` / `mesh`), each modality is split
  over the devices alike and the contexts stay local (row-wise products): every engine applies, the
  ring never gathers the candidates.

  Args:
    *modalities: M >= 2 arrays of shape (N, D), row i of each describing sample i.
    logit_scale: the multiplier (> 0, may be traced; learnable in the paper).
    normalize: L2-normalise each modality first.
    reduction: "mean", "sum" or "none": the (M·N,) per-anchor terms, modality-major (row m·N + i:
      modality m as the target of sample i; this device's M·N/n under `axis_name`), whose mean is the
      loss.
    mask: None or bool (N,): False marks padding samples, which are neither anchors nor candidates.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (M·N,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> round(float(symile(x, x, x, logit_scale=1.0)), 4)  # log(e + 1) - 1
  0.3133
  """
  if len(modalities) < 2:
    raise ValueError(
        f"`modalities` needs at least 2 arrays of shape (N, D) (a target and a context), got "
        f"{len(modalities)}."
    )
  xs = [_checks.check_array(f"modalities[{k}]", x, ndim=2) for k, x in enumerate(modalities)]
  for k, x in enumerate(xs[1:], start=1):
    _checks.check_same_shape("modalities[0]", xs[0], f"modalities[{k}]", x)
  _common.check_global_batch("modalities[0]", xs[0], 2, axis_name, why="a contrastive loss needs a negative")
  scale = _common.logit_scale(logit_scale)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, xs[0].shape[0])
  xs = [_common.maybe_normalize(x, normalize) for x in xs]
  dtype = jnp.result_type(*xs)
  x32 = [x.astype(jnp.float32) for x in xs]
  positive = scale * jnp.sum(functools.reduce(operator.mul, x32), axis=-1)
  losses = []
  for m, target in enumerate(xs):
    context = functools.reduce(operator.mul, [x for k, x in enumerate(x32) if k != m]).astype(dtype)
    lse = ops.logsumexp(context, target, scale=scale, row_valid=mask, col_valid=mask, impl=impl,
                        axis_name=axis_name).rows
    losses.append(_common.zero_invalid(lse, mask) - positive)
  valid = None if mask is None else jnp.tile(mask, len(losses))
  return _common.reduce_loss(jnp.concatenate(losses), reduction, valid, axis_name)
