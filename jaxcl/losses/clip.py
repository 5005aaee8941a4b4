"""Symmetric image–text losses: CLIP (softmax) and SigLIP (sigmoid)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
@_common.shardable("image", "text", "mask")
def clip(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""CLIP: symmetric cross-entropy over the image–text similarity matrix.

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021).
  With S = logit_scale · image @ textᵀ (logit_scale is the multiplier, initialised to 1/0.07 in CLIP):

      loss = ½ mean_i [ −S_ii + log Σ_j exp S_ij ] + ½ mean_j [ −S_jj + log Σ_i exp S_ij ]

  Both directions come from one pass over S (row and column log-sum-exp together).

  `label_smoothing` ε ∈ [0, 1) replaces each one-hot target by (1 − ε) one-hot + ε/B uniform, as
  torch's `CrossEntropyLoss(label_smoothing=ε)` does:

      ℓ_i(image) = log Σ_j exp S_ij − (1 − ε) S_ii − (ε/B) Σ_j S_ij,   (ε/B) Σ_j S_ij = ε · <x_i, t̄> · scale

  with t̄ the mean text embedding (the mean image for the text direction): the uniform term is linear in
  S and never needs it.

  `reduction`: "mean", "sum" or "none": the (2B,) per-anchor ℓ (B image anchors, then B text
  anchors; this device's under `axis_name`), whose mean is the loss above. `mask`: None or bool (B,);
  False marks padding pairs (image i and text i), which are neither anchors nor negatives; B is then
  the number of valid pairs.

  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(4)
  >>> round(float(clip(x, x, logit_scale=1.0)), 4)  # log(e + 3) - 1
  0.7437
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  scale = _common.logit_scale(logit_scale)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, i.shape[0])
  _check_label_smoothing(label_smoothing)
  lse = ops.logsumexp(i, t, scale=scale, rows=True, cols=True, row_valid=mask, col_valid=mask, impl=impl,
                      axis_name=axis_name)
  positive = scale * _common.rowwise_dot(i, t)
  rows = _common.zero_invalid(lse.rows, mask) - positive
  cols = _common.zero_invalid(lse.cols, mask) - positive
  if label_smoothing:
    eps = jnp.asarray(label_smoothing, jnp.float32)
    rows = rows + eps * (positive - scale * _uniform_target_dot(i, t, mask, axis_name))
    cols = cols + eps * (positive - scale * _uniform_target_dot(t, i, mask, axis_name))
  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(jnp.concatenate([rows, cols]), reduction, valid, axis_name)


def _check_label_smoothing(value) -> None:
  v = _checks.concrete_value(value)
  if v is None or v.shape != () or v.dtype.kind not in "fiu" or not 0.0 <= float(v) < 1.0:
    raise ValueError(f"`label_smoothing` must be a number in [0, 1), got {value!r}.")


def _uniform_target_dot(a: jax.Array, b: jax.Array, mask, axis_name) -> jax.Array:
  """<a_i, b̄>, b̄ the mean of the (valid) rows of b over the global batch: (1/B) Σ_j <a_i, b_j>."""
  b32 = _common.zero_invalid(b.astype(jnp.float32), None if mask is None else mask[:, None])
  total = jnp.sum(b32, axis=0)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  if mask is None:
    count = jnp.float32(_common.global_size(b.shape[0], axis_name))
  else:
    count = _common.batch_sum(mask.astype(jnp.float32), axis_name)
  return jnp.einsum("id,d->i", a, total / jnp.maximum(count, 1.0), preferred_element_type=jnp.float32)


@_common.keyword_only
@_common.shardable("image", "text", "mask")
def siglip(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array,
    logit_bias: float | jax.Array,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""SigLIP: independent binary classification of every image–text pair.

  "Sigmoid Loss for Language Image Pre-Training" (Zhai et al., 2023). With z_ij = +1 on the diagonal and
  −1 elsewhere, t = logit_scale (SigLIP initialises t = 10, b = −10):

      ℓ_i = Σ_j −log σ( z_ij (t <x_i, y_j> + b) ),   loss = mean_i ℓ_i

  `reduction`: "mean", "sum" or "none" (the (B,) per-image ℓ_i; this device's under `axis_name`).
  `mask`: None or bool (B,); False marks padding pairs, which are neither anchors nor negatives (the
  sums run over the valid texts, the mean over the valid images).

  Sharded, each device holds a chunk of images and the text chunks pass by (SigLIP §3.3).
  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> round(float(siglip(x, x, logit_scale=1.0, logit_bias=0.0)), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  scale = _common.logit_scale(logit_scale)
  bias = _common.logit_bias(logit_bias)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, i.shape[0])
  per_image = ops.sigmoid_sum(i, t, scale=scale, bias=bias, row_valid=mask, col_valid=mask, impl=impl,
                              axis_name=axis_name)
  return _common.reduce_loss(per_image, reduction, mask, axis_name)


@_common.keyword_only
@_common.shardable("image", "text", "group_ids", "mask")
def grouped_itc(
    image: jax.Array,
    text: jax.Array,
    group_ids: jax.Array,
    *,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Grouped image–text contrastive loss: CLIP within each group of the batch, averaged over the batch.

  "M2-Encoder: Advancing Bilingual Image-Text Understanding by Large-scale Efficient Pretraining" (Guo et
  al., Ant Group, 2024), its grouped aggregation for the image-text contrastive loss. The batch is
  split into groups (the ranks of a few nodes, in the released config's terms); an image contrasts only
  with the texts of its own group and a text only with the images of its group, so the features are
  gathered within a group, not over every device. With g the group ids and
  S = logit_scale · image @ textᵀ:

      ℓ_i(image) = −S_ii + log Σ_{j: g_j = g_i} exp S_ij
      ℓ_j(text)  = −S_jj + log Σ_{i: g_i = g_j} exp S_ij
      loss = ½ mean_i ℓ_i(image) + ½ mean_j ℓ_j(text)

  With equal groups this is the mean over the groups of each group's CLIP loss (what data-parallel
  training of the paper's per-rank losses averages); with one group it is `clip`. The restriction is an
  `include` id mask, so every engine applies.

  Source: the released code (github.com/alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder) is the
  inference model only: it keeps the training switch `aggregate_nodes` ("aggregate nodes num for
  compute_itc, default -1 is for all nodes") but not the grouped loss itself, and the paper's method
  section could not be read here (only its abstract: a "grouped aggregation approach for image-text
  contrastive loss computation, which reduces the communication overhead and GPU memory demands"). So
  this is the loss those two describe: groups of nodes, features aggregated within a group, the CLIP
  loss of each group. Which examples form a group is the caller's `group_ids` (groups of n consecutive
  examples of the global batch, as n ranks' shards: `jnp.arange(B) // n`).

  Under `axis_name` the communication is still over the whole axis (the engines gather or pass every
  block and mask the other groups out); to save it as the paper does, put the groups on their own mesh
  axis and call `clip` with `axis_name` the within-group axis.

  Args:
    image, text: (B, D) paired embeddings.
    group_ids: (B,) integer group of each pair (global ids under `axis_name`, as every id mask).
    logit_scale: the multiplier of the similarities (CLIP's 1/0.07 at initialisation).
    normalize: L2-normalise first.
    reduction: "mean" (the loss above), "sum" or "none": the (2B,) per-anchor ℓ (B image anchors, then
      B text anchors; this device's under `axis_name`).
    mask: None or bool (B,); False marks padding pairs, neither anchors nor negatives.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh` ("Sharded batches" in
      `jaxcl.losses`).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (2B,) for "none").

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(4)
  >>> round(float(grouped_itc(x, x, jnp.array([0, 0, 1, 1]), logit_scale=1.0)), 4)  # log(e + 1) - 1
  0.3133
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  groups = _checks.check_labels("group_ids", group_ids, i.shape[0]).astype(jnp.int32)
  scale = _common.logit_scale(logit_scale)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, i.shape[0])
  lse = ops.logsumexp(i, t, scale=scale, rows=True, cols=True, include=(groups, groups), row_valid=mask,
                      col_valid=mask, impl=impl, axis_name=axis_name)
  positive = scale * _common.rowwise_dot(i, t)
  rows = _common.zero_invalid(lse.rows, mask) - positive
  cols = _common.zero_invalid(lse.cols, mask) - positive
  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(jnp.concatenate([rows, cols]), reduction, valid, axis_name)
