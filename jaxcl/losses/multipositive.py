"""Several positives per anchor: 1-to-K cross-lingual contrast and the poly-view critics.

| paper | function | engines |
|---|---|---|
| Improving the Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive Learning | one_to_k_clip | all, allgather, ring |
| Poly-View Contrastive Learning | poly_view | all, allgather, ring |

(The multi-view objectives of Koromilas et al. 2025 are `jaxcl.losses.multiview_infonce` / `mv_dhel`.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
@_common.shardable("image", "texts", "mask", batch_axis={"texts": 1})
def one_to_k_clip(
    image: jax.Array,
    texts: jax.Array,
    *,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""1-to-K contrastive loss: each image against its K captions (one per language) at once.

  "Improving the Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive Learning"
  (Nie et al., KDD 2024). Image i has K positive texts t_{i,1..K} (the same caption in K languages);
  every language of every other image is a negative, all in ONE softmax so that no language is ranked
  against the image separately. With s(a, b) = logit_scale · <a, b>:

      L_i2t = mean_i −(1/K) Σ_k log [ e^{s(v_i, t_ik)} / Σ_{j, k'} e^{s(v_i, t_jk')} ]
            = mean_i [ log Σ_{j,k'} e^{s(v_i, t_jk')} − (1/K) Σ_k s(v_i, t_ik) ]
      L_t2i = mean_{i,k} −log [ e^{s(t_ik, v_i)} / Σ_j e^{s(t_ik, v_j)} ]
      loss  = ½ (L_i2t + L_t2i / K)

  The 1/K on the text-to-image term follows the authors' code (BUAADreamer/CCRK, `models/xvlm.py`
  `get_unialign_contrastive_loss` with its default `need_divm=0`: the i2t sum over the K positives and
  the whole symmetric loss are divided by K). With K = 1 this is `clip`. One engine pass over the (B, K·B) image–text matrix gives both
  directions (row and column log-sum-exp), on the sharded engines too; the positive term is linear in
  S (<v_i, Σ_k t_ik>).

  Args:
    image: (B, D). texts: (K, B, D), texts[k, i] the caption of image i in language k.
    logit_scale: the multiplier 1/τ (> 0, may be traced).
    normalize: L2-normalise first.
    reduction: "mean", "sum" or "none": the (B,) per-image terms
      ℓ_i = ½ [ LSE_{j,k'} s(v_i, t_jk') − (1/K) Σ_k s(v_i, t_ik) + (1/K²) Σ_k (LSE_j s(t_ik, v_j) − s(t_ik, v_i)) ]
      (image i's i2t term and its K captions' t2i terms, this device's under `axis_name`), whose mean
      is the loss.
    mask: None or bool (B,): False marks padding samples: image i and its K captions texts[:, i] are
      neither anchors, positives nor negatives.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the samples split over
      devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; `image`, `mask` and axis 1 of `texts` (the
      samples) are split, every device holding the K captions of its images.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> v = jnp.eye(2)
  >>> round(float(one_to_k_clip(v, jnp.stack([v, v]), logit_scale=1.0)), 4)  # K = 2 identical languages
  0.5815

  (i2t: log(2e + 2) − 1, the 4 texts against the mean positive 1; t2i: log(e + 1) − 1, halved; their mean.)
  """
  v = _checks.check_array("image", image, ndim=2)
  _common.check_global_batch("image", v, 2, axis_name, why="a contrastive loss needs a negative")
  v = _common.maybe_normalize(v, normalize)
  t = _checks.check_array("texts", texts, ndim=3)
  if t.shape[1:] != v.shape:
    raise ValueError(f"`texts` must have shape (K, {v.shape[0]}, {v.shape[1]}) to match `image`, got {t.shape}.")
  t = _common.maybe_normalize(t, normalize)
  k, b, d = t.shape
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  text_valid = None if mask is None else jnp.tile(mask, k)  # flat row k·B + i is texts[k, i]
  scale = _common.logit_scale(logit_scale)
  flat = jnp.reshape(t, (k * b, d))
  lse = ops.logsumexp(v, flat, scale=scale, rows=True, cols=True, row_valid=mask, col_valid=text_valid,
                      impl=impl, axis_name=axis_name)
  v32 = v.astype(jnp.float32)
  pos = scale * jnp.einsum("id,kid->ki", v32, t.astype(jnp.float32))  # (K, B)
  i2t = _common.zero_invalid(lse.rows, mask) - jnp.mean(pos, axis=0)
  t2i = _common.zero_invalid(lse.cols, text_valid).reshape(k, b) - pos
  per_image = 0.5 * (i2t + jnp.mean(t2i, axis=0) / k)
  return _common.reduce_loss(per_image, reduction, mask, axis_name)


def _views(views, normalize, axis_name=None):
  views = _checks.check_array("views", views, ndim=3)
  if views.shape[0] < 2:
    raise ValueError(f"`views` must hold at least 2 views along axis 0 (shape (M, B, D)), got {views.shape}.")
  if axis_name is None:
    _checks.check_min_batch("views", views, 2, axis=1, why="a contrastive loss needs a negative")
  else:
    _common.check_global_batch("views", views[0], 2, axis_name, why="a contrastive loss needs a negative")
  return _common.maybe_normalize(views, normalize)


@_common.keyword_only
@_common.shardable("views", "mask", batch_axis={"views": 1})
def poly_view(
    views: jax.Array,
    *,
    critic: str = "geometric",
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Poly-view contrastive loss (PVC) with the geometric or arithmetic aggregation over positives.

  "Poly-View Contrastive Learning" (Shidani et al., ICLR 2024). Each of B samples has M >= 2 views
  x_{i,1..M}, f(x, y) = <x, y>/τ. For every anchor view α of sample i and every other view β ≠ α of
  the same sample, one softmax runs over the candidates (i, β) and all M views of every other sample
  (their view α included; the other views of sample i are left out):

      ℓ_{iαβ} = −f(x_iα, x_iβ) + log [ e^{f(x_iα, x_iβ)} + Σ_{j≠i} Σ_{γ=1..M} e^{f(x_iα, x_jγ)} ]

  and the M − 1 positives of each anchor are aggregated by the geometric or arithmetic mean of their
  likelihoods e^{−ℓ}:

      geometric:   L_iα = (1/(M−1)) Σ_{β≠α} ℓ_{iαβ}                   (−log of the geometric mean)
      arithmetic:  L_iα = −log (1/(M−1)) Σ_{β≠α} e^{−ℓ_{iαβ}}          (−log of the arithmetic mean)
      loss = mean_{i, α} L_iα

  By the AM–GM inequality arithmetic <= geometric. With M = 2 both are SimCLR's NT-Xent:
  `poly_view(jnp.stack([z1, z2]), temperature=τ) == nt_xent(z1, z2, temperature=τ)`.

  Sources read: the paper's pseudo-code as ported in `PVCLoss` (pakoromilas/Multi-View-CL,
  `models/losses.py`; a second port in another public repository is identical): the candidate set
  above (its mask drops (i, γ) for γ ≠ β), a cross-entropy per (α, β), the mean over β (geometric),
  then the mean over α and samples. Choice where the sources disagree: for the arithmetic aggregation
  the ported pseudo-code computes logsumexp_β(ℓ_{iαβ}) − log K (K the batch size), which is neither
  the arithmetic mean of the likelihoods nor equal to SimCLR at M = 2; this function uses the
  arithmetic mean −log mean_β e^{−ℓ} above, the aggregation the arithmetic critic names and the one
  for which both critics reduce to SimCLR at M = 2, as the paper states.

  Engines: one (MB)² log-sum-exp over all views with the anchor's own sample left out (`exclude` on
  sample ids) gives N_iα = log Σ_{j≠i, γ} e^{f}; then ℓ_{iαβ} = softplus(N_iα − f(x_iα, x_iβ)) from the
  per-sample M×M Gram matrices. Every engine applies, the sharded ones too (sample ids global).

  Args:
    views: (M, B, D), views[α, i] the α-th view of sample i.
    critic: "geometric" or "arithmetic".
    temperature: τ > 0 (may be traced).
    normalize: L2-normalise every view first.
    reduction: "mean" (over the M·B anchors), "sum" or "none": the (M·B,) L_iα in view-major order
      (row α·B + i is view α of sample i; under `axis_name` this device's M·B/n, view-major over its
      own samples).
    mask: None or bool (B,): False marks padding samples, all of whose M views are neither anchors,
      positives nor negatives.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the samples split over
      devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the samples (axis 1 of `views`, and
      `mask`) are split, every device holding all M views of its samples.
  Returns:
    Scalar float32 loss, or (M·B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> v = jnp.stack([jnp.eye(2)] * 3)  # 3 identical views of 2 orthogonal samples
  >>> round(float(poly_view(v, temperature=1.0)), 4)  # log(e + 3) − 1: the positive against 3 views
  0.7437
  """
  _checks.check_choice("critic", critic, ("geometric", "arithmetic"))
  x = _views(views, normalize, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  m, b, d = x.shape
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  valid = None if mask is None else jnp.tile(mask, m)
  sample = jnp.tile(_common.batch_ids(b, axis_name), m)  # global sample ids
  z = jnp.reshape(x, (m * b, d))
  others = ops.logsumexp(z, z, scale=inv_t, exclude=(sample, sample), row_valid=valid, col_valid=valid,
                         impl=impl, axis_name=axis_name).rows  # (M·B,): N_iα
  others = _common.zero_invalid(others, valid)
  x32 = x.astype(jnp.float32)
  pos = inv_t * jnp.einsum("aid,cid->iac", x32, x32)  # (B, M, M): f(x_iα, x_iβ)
  nll = jax.nn.softplus(jnp.reshape(others, (m, b)).T[:, :, None] - pos)  # (B, M, M): ℓ_{iαβ}
  off = ~jnp.eye(m, dtype=bool)[None]  # β ≠ α
  if critic == "geometric":
    per_anchor = jnp.sum(jnp.where(off, nll, 0.0), axis=2) / (m - 1)
  else:
    per_anchor = math.log(m - 1) - jax.nn.logsumexp(-nll, axis=2, where=off)
  return _common.reduce_loss(jnp.reshape(per_anchor.T, (m * b,)), reduction, valid, axis_name)
