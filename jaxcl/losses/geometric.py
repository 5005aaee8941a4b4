"""Geometric contrastive objectives: CACR (attraction/repulsion as conditional transport), the
contrastive-gap losses (CLIP + alignment + uniformity) and GRAM (Gram-matrix volume across modalities,
and the hard negatives of its data–anchor matching term).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.ops import engines
from jaxcl.losses import _common
from jaxcl.losses.clip import clip
from jaxcl.losses.alignment_uniformity import alignment


def _softmax_mean_similarity(q, k, scale, exclude, impl, valid=None, col_valid=None, axis_name=None):
  """E_{j ~ softmax_j(scale · <q_i, k_j>)} <q_i, k_j> per row, fully differentiable (Bq,) float32.

  The softmax-weighted mean of the similarities is the derivative of the row log-sum-exp with
  respect to the row's scale: ∂/∂a_i log Σ_j exp(a_i s_ij) = Σ_j softmax_j(a_i s_i·) s_ij. Its gradient
  (through the weights too) is a second derivative of the engine's log-sum-exp. Rows that are not
  `valid` and columns that are not `col_valid` (None: all are; `col_valid` defaults to `valid`) are
  left out; an invalid row's value is 0. Under `axis_name` (q this device's rows) the scales are
  marked device-varying, so that the derivative is this device's, not summed over the devices.
  """
  scales = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (q.shape[0],))
  if axis_name is not None:
    scales = ops.sharded.varying(scales, axis_name)
  col_valid = valid if col_valid is None else col_valid

  def row_lse(a):
    lse = ops.logsumexp(q, k, scale=a, exclude=exclude, row_valid=valid, col_valid=col_valid, impl=impl).rows
    return jnp.sum(_common.zero_invalid(lse, valid))

  return jax.grad(row_lse)(scales)


@_common.keyword_only
@_common.shardable("views", "mask", batch_axis={"views": 1})
def cacr(
    views: jax.Array,
    *,
    alpha: float | jax.Array = 1.0,
    beta: float | jax.Array = 1.0,
    t_pos: float | jax.Array = 1.0,
    t_neg: float | jax.Array = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""CACR: contrastive attraction and contrastive repulsion as conditional transport.

  "Contrastive Attraction and Contrastive Repulsion for Representation Learning" (Zheng et al., TMLR
  2023). With V >= 2 views z^v_i = views[v, i] of B instances and squared Euclidean costs, the
  attraction term transports each anchor to its own other views, weighting the *far* ones up, and
  the repulsion term transports it to the other instances, weighting the *near* ones up:

      π⁺_i(u | v) = softmax_{u ≠ v}( t⁺ ‖z^v_i − z^u_i‖² )
      L_CA = (1/V) Σ_v mean_i Σ_{u ≠ v} π⁺_i(u | v) · α ‖z^v_i − z^u_i‖²

      π⁻_i(j | v, u) = softmax_{j ≠ i}( −t⁻ ‖z^v_i − z^u_j‖² )
      L_CR = mean_{v < u} mean_i Σ_{j ≠ i} π⁻_i(j | v, u) · (−β ‖z^v_i − z^u_j‖²)

      loss = L_CA + L_CR

  This follows the authors' code (github.com/JegZheng/CACR-SSL, `our_loss1` + `our_loss2`, with the
  Euclidean cost and defaults α = β = t⁺ = t⁻ = 1): the negatives of a view pair (v, u), v < u, are the
  other instances' u-views, and the gradient flows through the transport weights π (not detached).

  L_CR never builds the B×B matrix outside `dense`: with q_i = [z^v_i, 1], k_j = [z^u_j, −‖z^u_j‖²/2],
  −t⁻‖z^v_i − z^u_j‖² = 2t⁻ <q_i, k_j> − t⁻‖z^v_i‖² (the row constant cancels in the softmax), and the
  π⁻-weighted mean of ‖z^v_i − z^u_j‖² = ‖z^v_i‖² − 2 E_π⁻ <q_i, k_j>, where E_π⁻<q_i, k_j> is the
  derivative of the row log-sum-exp of `jaxcl.ops.logsumexp` with respect to the row's scale. Its
  gradient is therefore a second derivative of the engine: `dense` and `blockwise` support it (the
  second-order pass of `blockwise` differentiates its tiled backward loop); the fused `pallas` kernels
  do not, so `impl="pallas"` is an error and `impl="auto"` uses `blockwise` where it would pick
  `pallas`. L_CA only needs the B·V² same-instance distances. With V = 2, L_CA = α·`alignment`.

  Sharded (`axis_name` / `mesh`, the instances split over the devices: axis 1 of `views`), L_CR needs
  that second derivative, which the sharded engines do not offer: each device gathers the u-views and
  scores its own rows against them on a one-device engine (`dense` or `blockwise` by size), for
  `impl` "allgather" and "ring" alike (ring gathers them too).

  Args:
    views: (V, B, D) with V >= 2 views and B >= 2 instances.
    alpha, beta: weights of the attraction and repulsion costs (> 0).
    t_pos, t_neg: inverse temperatures of the positive and negative transport weights (> 0).
    normalize: L2-normalise the views first (the paper's encoder ends with an L2 normalisation).
    reduction: "mean", "sum" or "none": the (B,) per-instance terms
      ℓ_i = (1/V) Σ_v Σ_{u ≠ v} π⁺_i(u | v) α ‖z^v_i − z^u_i‖² + mean_{v<u} Σ_{j ≠ i} π⁻_i(j | v, u) (−β ‖z^v_i − z^u_j‖²),
      in instance order (this device's under `axis_name`), whose mean is the loss.
    mask: None or bool (B,): False marks padding instances (all their views), which are neither anchors
      nor negatives; the means run over the valid instances.
    impl: "dense", "blockwise" or "auto" (see above); "allgather" | "ring" with `axis_name` / `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the batch axis of `views` is axis 1.
  Returns:
    Scalar float32 (negative: the repulsion term is a negated cost), or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> views = jnp.stack([jnp.eye(2), jnp.eye(2)])  # identical views, the other instance at ‖·‖² = 2
  >>> float(cacr(views))  # L_CA = 0, L_CR = −2
  -2.0
  """
  views = _checks.check_array("views", views, ndim=3)
  if views.shape[0] < 2:
    raise ValueError(
        f"`views` must hold at least 2 views along axis 0 (shape (V, B, D) with V >= 2), got shape "
        f"{views.shape}."
    )
  if axis_name is None:
    _checks.check_min_batch("views", views, 2, axis=1, why="the repulsion term needs a negative")
  else:
    _common.check_global_batch("views[0]", views[0], 2, axis_name, why="the repulsion term needs a negative")
  for name, value in (("alpha", alpha), ("beta", beta), ("t_pos", t_pos), ("t_neg", t_neg)):
    _checks.check_positive(name, value)
  _common.check_reduction(reduction)
  n_views, b = views.shape[:2]
  b_all = _common.global_size(b, axis_name)
  mask = _common.sample_mask(mask, b)
  impl = engines.twice_differentiable("auto" if axis_name is not None else impl, b, b_all,
                                      "the CACR repulsion term")
  z = _common.maybe_normalize(views, normalize)
  z32 = z.astype(jnp.float32)
  alpha, beta, t_pos, t_neg = (jnp.asarray(v, jnp.float32) for v in (alpha, beta, t_pos, t_neg))

  # Attraction: per instance, the V×V squared distances between its views.
  sq = jnp.sum(jnp.square(z32[:, None] - z32[None, :]), axis=-1)  # (V, V, B)
  other = ~jnp.eye(n_views, dtype=bool)[:, :, None]
  weights = jax.nn.softmax(jnp.where(other, t_pos * sq, -jnp.inf), axis=1)
  attraction = jnp.mean(jnp.sum(jnp.where(other, weights * alpha * sq, 0.0), axis=1), axis=0)  # (B,)

  # Repulsion: one masked log-sum-exp per view pair (v < u), rows z^v against columns z^u (this
  # device's rows against the gathered columns under `axis_name`).
  norms = jnp.sum(z32 * z32, axis=-1)  # (V, B)
  ones = jnp.ones((b, 1), z.dtype)
  own = (_common.batch_ids(b, axis_name), jnp.arange(b_all, dtype=jnp.int32))  # j ≠ i
  col_valid = _common.gather_batch(mask, axis_name)
  repulsion = []
  for v in range(n_views):
    q = jnp.concatenate([z[v], ones], axis=1)
    for u in range(v + 1, n_views):
      k = jnp.concatenate([z[u], (-0.5 * norms[u])[:, None].astype(z.dtype)], axis=1)
      k = _common.gather_batch(k, axis_name)
      mean_sim = _softmax_mean_similarity(q, k, 2.0 * t_neg, own, impl, mask, col_valid, axis_name)
      repulsion.append(-beta * (norms[v] - 2.0 * mean_sim))  # (B,)
  return _common.reduce_loss(attraction + sum(repulsion) / len(repulsion), reduction, mask, axis_name)


def _uniformity(x, y, t, impl, mask=None, axis_name=None):
  """log mean_{i≠j} exp(−t ‖x_i − y_j‖²) for unit rows (x = y: Wang & Isola's uniformity; x ≠ y: the
  cross-modal one) through the engine's masked log-sum-exp, over the valid rows i, j of the global
  batch (this device's rows against every device's under `axis_name`); 0 when fewer than two are
  valid."""
  b = x.shape[0]
  ids = _common.batch_ids(b, axis_name)
  rows = ops.logsumexp(x, y, scale=2.0 * t, exclude=(ids, ids), row_valid=mask, col_valid=mask, impl=impl,
                       axis_name=axis_name).rows
  if mask is None:
    n = jnp.float32(_common.global_size(b, axis_name))
    keep = jnp.ones((b,), bool)
  else:
    n = _common.batch_sum(mask.astype(jnp.float32), axis_name)
    keep = mask
  enough = n >= 2
  keep = keep & enough
  rows = jnp.where(keep, rows, 0.0)  # no -inf enters the arithmetic
  m = jax.lax.stop_gradient(jnp.max(jnp.where(keep, rows, -jnp.inf), initial=-jnp.inf))
  if axis_name is not None:
    m = jax.lax.pmax(m, axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  total = _common.batch_sum(jnp.where(keep, jnp.exp(rows - m), 0.0), axis_name)
  value = jnp.log(jnp.where(enough, total, 1.0)) + m - 2.0 * t - jnp.log(jnp.where(enough, n * (n - 1.0), 1.0))
  return jnp.where(enough, value, 0.0)


@_common.keyword_only
@_common.shardable("image", "text", "mask")
def contrastive_gap(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array = 1 / 0.07,
    cross_uniformity: bool = False,
    alignment_weight: float | jax.Array = 1.0,
    uniformity_weight: float | jax.Array = 1.0,
    t: float | jax.Array = 2.0,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""CLIP plus alignment and uniformity terms that close the contrastive (modality) gap.

  "It's Not a Modality Gap: Characterizing and Addressing the Contrastive Gap" (Fahim, Murphy & Fyshe,
  2024). The paper adds Wang & Isola's alignment and uniformity to the CLIP loss:

      L_CUA   = L_CLIP + w_a · L_align(x, y) + w_u · ½ [ L_unif(x) + L_unif(y) ]
      L_CUAXU = L_CUA  + w_u · L_xunif(x, y)

      L_align(x, y)  = mean_i ‖x_i − y_i‖²                                        (α = 2)
      L_unif(x)      = log mean_{i≠j} exp(−t ‖x_i − x_j‖²)                        (in-modal)
      L_xunif(x, y)  = log mean_{i≠j} exp(−t ‖x_i − y_j‖²)                        (cross-modal)

  on L2-normalised embeddings, t = 2: all weights 1, the two in-modal uniformities averaged, the
  cross-modal one over the off-diagonal (non-matching) pairs, as in the public code that defines the
  paper's `compute_CUA_loss` / `compute_CUAXU_loss` (the authors' repository abrar-fahim/contrastive-gap
  switches these terms on by config flags). `cross_uniformity=True` gives L_CUAXU. Every term goes through
  `jaxcl.ops.logsumexp` on the chosen engine (the allgather or ring engine when sharded: `axis_name` /
  `mesh`, the uniformities' log-means combined over the devices); with both weights 0 and
  `cross_uniformity=False` this is `clip`. The gap itself is measured by `jaxcl.eval.modality_gap`.

  Args:
    image, text: (B, D) paired embeddings, B >= 2 (always L2-normalised).
    logit_scale: CLIP's multiplier 1/τ (> 0, may be traced).
    cross_uniformity: add the cross-modal uniformity term (L_CUAXU).
    alignment_weight, uniformity_weight: w_a, w_u >= 0.
    t: the uniformity kernel's t > 0.
    reduction: "mean" only: the uniformity terms are logs of means over pairs, with no per-sample
      decomposition.
    mask: None or bool (B,): False marks padding pairs, left out of every term (neither anchors, nor
      negatives, nor pairs of a uniformity; every mean runs over the valid pairs).
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices ("Sharded batches" in `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # CLIP log(e + 1) − 1; alignment 0; uniformity log e^−4 for each modality
  >>> round(float(contrastive_gap(x, x, logit_scale=1.0)), 4)
  -3.6867
  """
  x, y = _common.pair("image", image, "text", text, normalize=True,
                      why="uniformity averages over pairs i != j", axis_name=axis_name)
  _checks.check_non_negative("alignment_weight", alignment_weight)
  _checks.check_non_negative("uniformity_weight", uniformity_weight)
  _checks.check_positive("t", t)
  _common.check_reduction(reduction, per_anchor=False)
  mask = _common.sample_mask(mask, x.shape[0])
  wa = jnp.asarray(alignment_weight, jnp.float32)
  wu = jnp.asarray(uniformity_weight, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  loss = clip(x, y, logit_scale=logit_scale, normalize=False, mask=mask, impl=impl, axis_name=axis_name)
  align = alignment(x, y, alpha=2, normalize=False, reduction="none", mask=mask)  # (B,), 0 where padded
  loss = loss + wa * _common.reduce_loss(align, "mean", mask, axis_name)
  unif = 0.5 * (_uniformity(x, x, t, impl, mask, axis_name) + _uniformity(y, y, t, impl, mask, axis_name))
  if cross_uniformity:
    unif = unif + _uniformity(x, y, t, impl, mask, axis_name)
  return loss + wu * unif


def _det(g: list[list[jax.Array]]) -> jax.Array:
  """Determinant of a small M×M matrix of broadcastable arrays by cofactor expansion along row 0.

  A polynomial in the entries, so its gradient stays finite at singular matrices (where the LU-based
  gradient of `jnp.linalg.det` is not): the regime GRAM drives its positives towards.
  """
  m = len(g)
  if m == 1:
    return g[0][0]
  total = 0.0
  for col in range(m):
    minor = [[g[r][c] for c in range(m) if c != col] for r in range(1, m)]
    term = g[0][col] * _det(minor)
    total = total + term if col % 2 == 0 else total - term
  return total


_MAX_MODALITIES = 6  # cofactor expansion is M! terms


def _gram_inputs(anchor, others, normalize):
  anchor = _checks.check_array("anchor", anchor, ndim=2)
  if not others:
    raise ValueError("`others` needs at least 1 array of shape (B, D) besides `anchor`, got none.")
  if len(others) + 1 > _MAX_MODALITIES:
    raise ValueError(
        f"at most {_MAX_MODALITIES} modalities (anchor + {_MAX_MODALITIES - 1} others) are supported, "
        f"got {len(others) + 1}."
    )
  others = [_checks.check_array(f"others[{k}]", x, ndim=2) for k, x in enumerate(others)]
  for k, x in enumerate(others[1:], start=1):
    _checks.check_same_shape("others[0]", others[0], f"others[{k}]", x)
  if anchor.shape[1] != others[0].shape[1]:
    raise ValueError(
        f"`anchor` and `others` must have the same feature size, got {anchor.shape} and "
        f"{others[0].shape}."
    )
  f = lambda x: _common.maybe_normalize(x, normalize).astype(jnp.float32)
  return f(anchor), [f(x) for x in others]


def _volumes(a: jax.Array, others: list[jax.Array]) -> jax.Array:
  """V_ij = sqrt |det G_ij| for the anchor row a_i and the other modalities of sample j, (Na, Nb)."""
  m = len(others) + 1
  g = [[None] * m for _ in range(m)]
  g[0][0] = jnp.sum(a * a, axis=1)[:, None]
  for k, x in enumerate(others, start=1):
    g[0][k] = g[k][0] = a @ x.T
    for l, y in enumerate(others, start=1):
      if l >= k:
        g[k][l] = g[l][k] = jnp.sum(x * y, axis=1)[None, :]
  det = _det(g)
  return jnp.sqrt(jnp.maximum(jnp.abs(det), 1e-12))


@_common.keyword_only
def gram_volume(anchor: jax.Array, *others: jax.Array, normalize: bool = True) -> jax.Array:
  r"""Volume of the parallelotope spanned by anchor_i and the other modalities of sample j, (Na, Nb).

  "Gramian Multimodal Representation Learning and Alignment" (Cicchetti et al., ICLR 2025): with
  A_ij = [a_i, m¹_j, ..., m^{k−1}_j] (D × k) and the Gram matrix G_ij = A_ijᵀ A_ij,

      Vol_ij = sqrt( |det G_ij| )

  0 when the k vectors are linearly dependent (perfectly aligned modalities), 1 for orthonormal ones.
  With one other modality and unit vectors it is |sin θ_ij|. Dense (Na, Nb) in float32; the
  determinant is expanded in cofactors (finite gradients at Vol = 0, clipped at 1e-6); k <= 6.

  >>> import jax.numpy as jnp
  >>> float(gram_volume(jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, 0.0]]),
  ...                   jnp.array([[0.0, 0.0, 2.0]]))[0, 0])  # orthonormal after normalising
  1.0
  """
  a, xs = _gram_inputs(anchor, others, normalize)
  return _volumes(a, xs)


@_common.keyword_only
@_common.shardable("anchor", "others", "mask")
def gram(
    anchor: jax.Array,
    *others: jax.Array,
    temperature: float | jax.Array = 0.07,
    label_smoothing: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""GRAM: contrastive loss with the Gramian volume across k >= 2 modalities as the (negative) score.

  "Gramian Multimodal Representation Learning and Alignment" (Cicchetti et al., ICLR 2025). The anchor
  modality (text in the paper) of sample i is scored against all other modalities of sample j by the
  volume of the parallelotope they span (`gram_volume`), and the loss is a symmetric cross-entropy
  over the logits −Vol/τ:

      z_ij  = −Vol_ij / τ
      L_D2A = mean_i [ log Σ_j exp z_ij − (1 − ε) z_ii − (ε/B) Σ_j z_ij ]   (anchor i against every sample j)
      L_A2D = mean_j [ log Σ_i exp z_ij − (1 − ε) z_jj − (ε/B) Σ_i z_ij ]   (sample j against every anchor i)
      loss  = ½ (L_D2A + L_A2D)

  following the authors' code (github.com/ispamm/GRAM, `model/gram.py`: `volume_computation*` and the
  symmetric cross-entropy of −volume/τ with `label_smoothing=0.1` = ε; τ = 0.07, learnable there).
  With ε = 0 it is the plain symmetric cross-entropy, and for k = 2 the score is −|sin θ_ij|/τ. The paper's data–anchor matching (DAM) term needs a
  classification head on fused features and is not part of this function (its hard negatives are
  `gram_negatives`; the trainer's clip method adds the term: `jaxcl.train.methods.image_text`). Embeddings are
  L2-normalised (the paper's setting) unless `normalize=False`.

  Engines: the volume is a determinant of inner products, not a scaled dot product, so the B×B logits
  are built densely; `impl` accepts "dense" and "auto" on one device. Sharded (`axis_name` / `mesh`,
  `impl` "allgather", "ring" or "auto"), every modality is gathered and each device builds the
  (B/n, B) rows of its anchors and the (B, B/n) columns of its samples densely: ring gathers the
  inputs too (the formula needs every pair).

  Args:
    anchor: (B, D) anchor modality. *others: k − 1 >= 1 arrays (B, D), row-aligned with `anchor`.
    temperature: τ > 0 (may be traced).
    label_smoothing: ε in [0, 1) (the targets (1 − ε) one-hot + ε/B).
    normalize: L2-normalise every modality first.
    reduction: "mean", "sum" or "none": the (2B,) per-anchor terms, the B anchor rows i of L_D2A, then
      the B samples j of L_A2D (this device's B/n of each under `axis_name`), whose mean is the loss.
    mask: None or bool (B,): False marks padding samples (all modalities), which are neither anchors nor
      negatives; B above is then the number of valid samples.
    impl: "dense" or "auto"; "allgather" | "ring" with `axis_name` / `mesh` (see above).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32, or (2B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # Vol_ii = 0 (clipped to 1e-6), Vol_ij = 1 for i ≠ j
  >>> round(float(gram(x, x, temperature=1.0, label_smoothing=0.0)), 4)  # log(1 + e^-1)
  0.3133
  >>> round(float(gram(x, x, temperature=1.0)), 4)  # + ε/B · 1 = 0.05
  0.3633
  """
  a, xs = _gram_inputs(anchor, others, normalize)
  _common.check_global_batch("anchor", a, 2, axis_name, why="a contrastive loss needs a negative")
  for k, x in enumerate(xs):
    if x.shape[0] != a.shape[0]:
      raise ValueError(
          f"`others[{k}]` must have as many rows as `anchor` ({a.shape[0]}), got shape {x.shape}."
      )
  _checks.check_choice("impl", impl, ("auto", "dense") + (engines.SHARDED_IMPLS if axis_name else ()))
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
  _common.check_reduction(reduction)
  b = a.shape[0]
  mask = _common.sample_mask(mask, b)
  inv_t = _common.inverse_temperature(temperature)
  eps = float(label_smoothing)
  gather = lambda x: _common.gather_batch(x, axis_name)  # noqa: E731
  # rows: this device's anchors i against every sample j; cols: every anchor against its samples j
  rows = -inv_t * _volumes(a, [gather(x) for x in xs])  # (B/n, B)
  cols = rows.T if axis_name is None else (-inv_t * _volumes(gather(a), xs)).T  # (B/n, B), [j, i]
  ids = _common.batch_ids(b, axis_name)
  diagonal = rows[jnp.arange(b), ids]
  all_mask = gather(mask)

  def smoothed_ce(logits):  # (B/n,) per anchor, each row's logits against the whole batch
    if mask is None:
      lse, mean_logit = jax.nn.logsumexp(logits, axis=1), jnp.mean(logits, axis=1)
    else:  # padding rows and columns out of every sum; B is the number of valid samples
      pairs = mask[:, None] & all_mask[None, :]
      same = mask[:, None] == all_mask[None, :]  # a padding row keeps the padding columns: finite, zeroed after
      lse = jax.nn.logsumexp(jnp.where(same, logits, -jnp.inf), axis=1)
      n_valid = jnp.maximum(_common.batch_sum(mask.astype(jnp.float32), axis_name), 1.0)
      mean_logit = jnp.sum(jnp.where(pairs, logits, 0.0), axis=1) / n_valid
    return _common.zero_invalid(lse, mask) - (1.0 - eps) * diagonal - eps * mean_logit

  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(jnp.concatenate([smoothed_ce(rows), smoothed_ce(cols)]), reduction, valid,
                             axis_name)


# The weight every candidate keeps besides its softmax share (the authors' `+ 1e-4`), so that a batch of
# near-identical volumes still spreads its draws.
GRAM_NEGATIVE_FLOOR = 1e-4


class GramNegatives(NamedTuple):
  """What `gram_negatives` returns: global sample indices, (B,) int32 each (this device's rows under
  `axis_name`). `data[i]`: the hard-negative data sample (the other modalities) of anchor i;
  `anchor[j]`: the hard-negative anchor of data sample j."""

  data: jax.Array
  anchor: jax.Array


@_common.keyword_only
@_common.shardable("anchor", "others", "mask",
                   out_specs=lambda batch_spec, reduction: GramNegatives(data=batch_spec, anchor=batch_spec))
def gram_negatives(
    anchor: jax.Array,
    *others: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 0.07,
    normalize: bool = True,
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> GramNegatives:
  r"""GRAM's hard negatives for its data–anchor matching (DAM) term, drawn by volume.

  "Gramian Multimodal Representation Learning and Alignment" (Cicchetti et al., ICLR 2025). Besides the
  volume contrast (`gram`), GRAM trains a binary matching head on fused (anchor, data) features to tell
  each true pair from two hard negatives, a wrong data sample for the anchor and a wrong anchor for the
  data, drawn where the volume is small (the pair looks aligned). With z_ij = −Vol_ij/τ (`gram_volume`
  of anchor i and the other modalities of sample j) over the valid samples of the global batch:

      w_ij  = softmax_j(z_ij) + 10⁻⁴,  w_ii = 0       data[i]   ~ Categorical(w_i· / Σ_j w_ij)
      w'_ji = softmax_i(z_ij) + 10⁻⁴,  w'_jj = 0      anchor[j] ~ Categorical(w'_j· / Σ_i w'_ji)

  following the authors' code (github.com/ispamm/GRAM, `model/gram.py`, `forward_ret`: `weights_t2cond`
  and `weights_cond2t`, the softmax over the row including the sample itself, then + 1e-4, then the
  sample's own entry zeroed, one `torch.multinomial` draw per row). The matching loss itself is the
  caller's: a 2-way cross-entropy of the head's logits on the 3B pairs (anchor_i, data_i) → 1,
  (anchor_i, data_{data[i]}) → 0, (anchor_{anchor[j]}, data_j) → 0, weighted by `itm_ratio` there (in training:
  `jaxcl.train.methods.image_text.gram_matching_loss`, weight `config.gram.dam_weight`).

  No gradient flows (the draws are integers; the authors' weights are computed under `no_grad`). Each
  global row r draws with its own key `fold_in(fold_in(key, direction), r)` (direction 0: data, 1:
  anchor), so the draws are the same whatever the number of devices. Padding samples (`mask` False)
  are never drawn; a padding row still draws (ignore its entry).

  Engines: the volumes are built densely like `gram`'s ("dense" and "auto" on one device; under
  `axis_name` / `mesh` every modality is gathered and each device draws for its own rows).

  Args:
    anchor: (B, D). *others: k − 1 >= 1 arrays (B, D), row-aligned with `anchor`.
    key: a JAX PRNG key (the same on every device).
    temperature: τ > 0, GRAM's (learnable) temperature of the volume logits.
    normalize: L2-normalise every modality first.
    mask: None or bool (B,): False marks padding samples.
    impl: "dense" or "auto"; "allgather" | "ring" with `axis_name` / `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    `GramNegatives(data, anchor)`, (B,) int32 global indices (this device's rows under `axis_name`).

  >>> import jax, jax.numpy as jnp
  >>> x = jnp.eye(3)  # every other sample at volume 1: the draw is uniform over the two others
  >>> out = gram_negatives(x, x, key=jax.random.key(0))
  >>> [int(j) != i for i, j in enumerate(out.data)], [int(i) != j for j, i in enumerate(out.anchor)]
  ([True, True, True], [True, True, True])
  """
  a, xs = _gram_inputs(anchor, others, normalize)
  _common.check_global_batch("anchor", a, 2, axis_name, why="a hard negative needs another sample")
  for k, x in enumerate(xs):
    if x.shape[0] != a.shape[0]:
      raise ValueError(f"`others[{k}]` must have as many rows as `anchor` ({a.shape[0]}), got shape {x.shape}.")
  _checks.check_choice("impl", impl, ("auto", "dense") + (engines.SHARDED_IMPLS if axis_name else ()))
  b = a.shape[0]
  mask = _common.sample_mask(mask, b)
  inv_t = jax.lax.stop_gradient(_common.inverse_temperature(temperature))
  a, xs = jax.lax.stop_gradient(a), [jax.lax.stop_gradient(x) for x in xs]
  gather = lambda x: _common.gather_batch(x, axis_name)  # noqa: E731
  rows = -inv_t * _volumes(a, [gather(x) for x in xs])  # (B/n, B): this device's anchors i, every sample j
  cols = rows.T if axis_name is None else (-inv_t * _volumes(gather(a), xs)).T  # (B/n, B): [j, i]
  ids = _common.batch_ids(b, axis_name)
  candidates = jnp.ones((1, rows.shape[1]), bool) if mask is None else gather(mask)[None, :]

  def draw(logits, direction):
    p = jax.nn.softmax(jnp.where(candidates, logits, -jnp.inf), axis=1)
    others_only = candidates & (jnp.arange(logits.shape[1])[None, :] != ids[:, None])
    log_w = jnp.where(others_only, jnp.log(p + GRAM_NEGATIVE_FLOOR), -jnp.inf)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, direction), r))(ids)
    return jax.vmap(jax.random.categorical)(keys, log_w).astype(jnp.int32)

  return GramNegatives(data=draw(rows, 0), anchor=draw(cols, 1))
