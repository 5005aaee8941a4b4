"""Dense and sequence objectives: losses over feature maps, patches and positions (CUT's PatchNCE, CPC,
PixPro).

Their inputs are feature maps (B, H, W, D) (`jaxcl.models.ResNet.feature_map`, `ViT.feature_map`), patch
sets (B, P, D) or sequences (B, T, D); the networks on top of the maps (CUT's patch MLP, CPC's context
network and predictions, PixPro's projector and transform) are model code, and their outputs are the
arguments here, so each loss stays a pure function. patch_nce and cpc reduce through
`jaxcl.ops.logsumexp` (any engine, `impl=`, and the sharded ones over a mesh: `axis_name=` / `mesh=`,
the images split over the devices); pixpro is a sum of cosines over the positive pixel pairs
of each image (small dense (H·W)² products, no log-sum-exp).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common
from jaxcl.ops.engines import SHARDED_IMPLS

PATCH_NEGATIVES = ("image", "batch")


# -------------------------------------------------------------------------------------------- PatchNCE
def _layer_list(name: str, feats) -> tuple[list, bool]:
  """The layers of a patch argument (an array, or a list / tuple of arrays) and whether it was a list."""
  if isinstance(feats, (list, tuple)):
    if not feats:
      raise ValueError(f"`{name}` must be an array or a non-empty list of arrays (one per layer), got [].")
    return list(feats), True
  return [feats], False


def _patch_pairs(feat_q, feat_k) -> tuple[list[tuple[jax.Array, jax.Array]], bool]:
  """The (B, P, D) query and key patches of every layer (a (B, H, W, D) map flattened to P = H·W)."""
  qs, q_listed = _layer_list("feat_q", feat_q)
  ks, k_listed = _layer_list("feat_k", feat_k)
  if q_listed != k_listed or len(qs) != len(ks):
    shown = lambda listed, xs: f"a list of {len(xs)}" if listed else "one array"  # noqa: E731
    raise ValueError(
        f"`feat_q` and `feat_k` must have the same layers, got {shown(q_listed, qs)} and {shown(k_listed, ks)}."
    )
  pairs = []
  for n, (q, k) in enumerate(zip(qs, ks)):
    name_q, name_k = (f"feat_q[{n}]", f"feat_k[{n}]") if q_listed else ("feat_q", "feat_k")
    q = _checks.check_array(name_q, q, ndim=(3, 4))
    k = _checks.check_array(name_k, k, ndim=(3, 4))
    _checks.check_same_shape(name_q, q, name_k, k)
    if pairs and q.shape[0] != pairs[0][0].shape[0]:
      raise ValueError(
          f"every layer must have the batch size {pairs[0][0].shape[0]} of `feat_q[0]`, got `{name_q}` of "
          f"shape {q.shape}."
      )
    flat = lambda x: jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))  # noqa: E731
    pairs.append((flat(q), flat(k)))
  return pairs, q_listed


def _sample_patches(pairs, num_patches, rng):
  """CUT's PatchSampleF: per layer, `num_patches` positions drawn without replacement, the same for
  every image and for query and key; every position where the layer has no more."""
  if num_patches is None:
    return pairs
  if isinstance(num_patches, bool) or not isinstance(num_patches, (int, np.integer)) or num_patches < 1:
    raise ValueError(f"`num_patches` must be None or a positive int, got {num_patches!r}.")
  if rng is None:
    raise ValueError("`num_patches` needs `rng`, a jax.random key to draw the patch positions, got None.")
  sampled = []
  for n, (q, k) in enumerate(pairs):
    p = q.shape[1]
    if num_patches < p:
      ids = jax.random.permutation(jax.random.fold_in(rng, n), p)[:num_patches]
      q, k = q[:, ids], k[:, ids]
    sampled.append((q, k))
  return sampled


@_common.keyword_only
@_common.shardable("feat_q", "feat_k", "mask")
def patch_nce(
    feat_q,
    feat_k,
    *,
    temperature: float | jax.Array = 0.07,
    negatives: str = "image",
    num_patches: int | None = None,
    rng: jax.Array | None = None,
    normalize: bool = True,
    detach_key: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
):
  r"""PatchNCE: each query patch against the key patch at the same position, negatives the image's other
  patches, averaged over layers.

  "Contrastive Learning for Unpaired Image-to-Image Translation" (CUT, Park et al., ECCV 2020). For
  image b of a layer with P patches, query patches q_{b,p} (the translated image's features) and key
  patches k_{b,p} (the input image's features at the same positions):

      s(p, p') = <q_{b,p}, sg(k_{b,p'})> / τ
      ℓ_{b,p} = −s(p, p) + log Σ_{p' < P} exp s(p, p')            (negatives="image")
      loss = mean_layers mean_{b, p} ℓ_{b,p}

  With negatives="batch" the sum runs over every patch (b', p') of the batch (CUT's
  `--nce_includes_all_negatives_from_minibatch`, used by single-image SinCUT). Per layer it is InfoNCE
  over the patches: with one image, `infonce(q[0], k[0], temperature=τ)` (`detach_key=False`).
  Defaults from the authors' code (taesungp/contrastive-unpaired-translation, `PatchNCELoss` and
  `calculate_NCE_loss`): τ = `nce_T` = 0.07, the keys detached, each layer's mean averaged over the
  layers, patches L2-normalised (`PatchSampleF`). Their code writes the positive as its own logit and
  sets the diagonal of the negatives to −10/τ, which leaves each row's denominator as above up to
  e^(−10/τ) ≈ 1e−62. CUT's λ_NCE weight is the caller's.

  What is the caller's: the encoder layers (`ResNet.feature_map` gives one map) and CUT's two-layer
  patch MLP (`PatchSampleF`); with the MLP, draw the positions first (`num_patches` positions of H·W,
  the same for query and key), project them, and pass the (B, P, D) results.

  Cost: the patches go through `jaxcl.ops.logsumexp` as B·P rows (`impl=` picks the engine), with
  negatives="image" keeping only same-image pairs (`include=`), so (B·P)² similarities for B·P² used:
  CUT trains with B = 1.

  Over a mesh (`axis_name` / `mesh`) the images are split over the devices. negatives="batch" runs the
  sharded engine ("allgather" or "ring") over every patch of the global batch; negatives="image" needs
  no other device's patches, so each device computes its own images' rows with a one-device engine
  ("auto") for either sharded `impl`, and only the mean is global.

  Args:
    feat_q: queries: (B, P, D) patches or a (B, H, W, D) feature map (P = H·W positions), or a list /
      tuple of them, one per layer (each layer its own P and D, the same B).
    feat_k: keys, the same shapes as `feat_q`, position-aligned with it.
    temperature: τ > 0.
    negatives: "image" (the same image's other patches) or "batch" (every other patch of the batch).
    num_patches: None (every patch), or the number of positions drawn per layer without replacement,
      the same for every image and for query and key (CUT: 256); a layer with fewer keeps them all.
    rng: jax.random key for `num_patches`.
    normalize: L2-normalise every patch first.
    detach_key: no gradient into `feat_k` (as CUT).
    reduction: "mean", "sum" (over layers and patches) or "none": the (B, P) ℓ_{b,p}, a tuple of them
      for a list of layers.
    mask: None or bool (B,): False marks padding images, neither anchors nor negatives.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the images (axis 0 of every layer of
      `feat_q`, `feat_k`, and `mask`) are split over the devices, `rng` replicated (the same positions
      on every device).
  Returns:
    Scalar float32 loss, or the per-patch losses with `reduction="none"` (this device's images under
    `axis_name`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)[None]  # one image, 3 orthogonal patches
  >>> round(float(patch_nce(x, x, temperature=1.0)), 4)  # log(e + 2) - 1
  0.5514
  """
  pairs, listed = _patch_pairs(feat_q, feat_k)
  _checks.check_choice("negatives", negatives, PATCH_NEGATIVES)
  _common.check_reduction(reduction)
  if axis_name is not None:
    _checks.check_choice("impl", impl, ("auto",) + SHARDED_IMPLS)
  b = pairs[0][0].shape[0]
  mask = _common.sample_mask(mask, b)
  inv_t = _common.inverse_temperature(temperature)
  for n, (q, _) in enumerate(pairs):
    name = f"feat_q[{n}]" if listed else "feat_q"
    if negatives == "image" and q.shape[1] < 2:
      raise ValueError(f"`{name}` must have at least 2 patches per image (a negative), got shape {q.shape}.")
    if negatives == "batch" and _common.global_size(b, axis_name) * q.shape[1] < 2:
      raise ValueError(f"`{name}` must have at least 2 patches in the batch (a negative), got shape {q.shape}.")
  pairs = _sample_patches(pairs, num_patches, rng)
  results = []
  for q, k in pairs:
    per_patch, valid = _patch_layer(q, k, mask, inv_t, negatives, normalize, detach_key, impl, axis_name)
    if reduction == "none":
      results.append(jnp.reshape(per_patch, q.shape[:2]))
    else:
      results.append(_common.reduce_loss(per_patch, reduction, valid, axis_name))
  if reduction == "none":
    return tuple(results) if listed else results[0]
  total = sum(results[1:], results[0])
  return total / len(results) if reduction == "mean" else total


@functools.partial(jax.jit, static_argnames=("negatives", "normalize", "detach_key", "impl", "axis_name"))
def _patch_layer(q, k, mask, inv_t, negatives, normalize, detach_key, impl, axis_name):
  """The (B·P,) ℓ_{b,p} of one layer's (B, P, D) patches (0 for a masked image) and their validity
  (None without a mask). One compiled program when called eagerly. Under `axis_name`: this device's
  images, against the global batch's patches with negatives="batch", against their own with "image"
  (a one-device engine: no patch of another device enters)."""
  b, p, d = q.shape
  if detach_key:
    k = jax.lax.stop_gradient(k)
  q = _common.maybe_normalize(jnp.reshape(q, (b * p, d)), normalize)
  k = _common.maybe_normalize(jnp.reshape(k, (b * p, d)), normalize)
  valid = None if mask is None else jnp.repeat(mask, p)
  if negatives == "image":
    image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), p)
    lse = ops.logsumexp(q, k, scale=inv_t, include=(image, image), row_valid=valid, col_valid=valid,
                        impl="auto" if axis_name is not None else impl).rows
  else:
    lse = ops.logsumexp(q, k, scale=inv_t, row_valid=valid, col_valid=valid, impl=impl,
                        axis_name=axis_name).rows
  per_patch = _common.zero_invalid(lse, valid) - inv_t * _common.rowwise_dot(q, k)
  return _common.zero_invalid(per_patch, valid), valid


# ------------------------------------------------------------------------------------------------ CPC
def _offsets(offsets, k: int, length: int) -> np.ndarray:
  """The K prediction offsets as an int array, each in [1, length − 1]; (1, …, K) when None."""
  if offsets is None:
    offsets = tuple(range(1, k + 1))
  values = np.asarray(offsets)
  if values.shape != (k,) or values.dtype.kind not in "iu":
    raise ValueError(
        f"`offsets` must be a sequence of K = {k} ints (one per prediction of `predictions`), got {offsets!r}."
    )
  if np.any(values < 1) or np.any(values >= length):
    raise ValueError(
        f"`offsets` must be in [1, {length - 1}] (a target {length} positions long), got {offsets!r}."
    )
  return values.astype(np.int32)


def _cpc_out_specs(batch_spec, reduction):
  """The (K, B, ...) per-position losses of reduction="none" split along B (axis 1); a scalar loss
  replicated."""
  return PartitionSpec(None, *batch_spec) if reduction == "none" else PartitionSpec()


@_common.keyword_only
@_common.shardable("predictions", "targets", "mask", batch_axis={"predictions": 1}, out_specs=_cpc_out_specs)
def cpc(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    offsets: Sequence[int] | None = None,
    temperature: float | jax.Array = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Contrastive Predictive Coding: predictions of the embeddings `o_k` steps ahead (rows below) against
  every embedding of the batch.

  "Representation Learning with Contrastive Predictive Coding" (van den Oord et al., 2018) on sequences;
  CPC v2 on a grid of image patches ("Data-Efficient Image Recognition with Contrastive Predictive
  Coding", Hénaff et al., ICML 2020), predicting the rows below. With targets z (B, T, D), or a grid
  (B, H, W, D) where t is the row and the column j rides along, and the caller's predictions
  p_{k,b,t} = W_k c_{b,t} of z_{b, t + o_k}:

      s(p, z) = <p, z> / τ
      ℓ_{k,b,t} = −s(p_{k,b,t}, z_{b,t+o_k}) + log Σ_{b', t'} exp s(p_{k,b,t}, z_{b',t'})
      loss = Σ_k mean_{b, t: t + o_k < T} ℓ_{k,b,t}

  The negatives are every other position of every image (sequence) of the batch ("negative samples
  ... from other locations in the image and other images in the mini-batch", CPC v2); positions
  without a target (t + o_k ≥ T) are no anchors. The offsets' means are summed, as CPC v2's pseudo-code
  (its appendix; DeepMind released no code) sums its per-offset cross-entropies; its `emb_scale = 0.1`
  on the predictions is τ = 10, its `steps_to_ignore = 2, steps_to_predict = 3` the single offset
  o = 3. CPC v1 scores exp(zᵀ W_k c) with no scale: τ = 1, `normalize=False`, the defaults. For one
  offset it is `infonce` of the anchors against their targets with the other positions as per-row
  negatives.

  What is the caller's: the encoder of the patches or frames (z), the autoregressive context network
  (CPC v1's GRU, CPC v2's masked PixelCNN: c_{b,t} may only see rows up to t) and the K linear heads
  W_k, evaluated at every position: `predictions[k]` at t (row t, column j) predicts the target
  o_k rows below. Rows that have no target are computed and ignored.

  Args:
    predictions: (K, B, T, D), or (K, B, H, W, D) for a grid: K predictions at every position.
    targets: (B, T, D) or (B, H, W, D) embeddings z, the positives and the negatives.
    offsets: K ints o_k in [1, T − 1] (rows for a grid), one per prediction; (1, …, K) by default.
    temperature: τ > 0.
    normalize: L2-normalise predictions and targets first (cosine scores).
    reduction: "mean" (as above), "sum" (over every anchor) or "none": the (K, B, T) or (K, B, H, W)
      ℓ_{k,b,t}, 0 where there is no target or the image is masked.
    mask: None or bool (B,): False marks padding sequences / images, neither anchors nor negatives.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: every device's anchors against every position of the global batch.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the sequences / images (axis 0 of
      `targets` and `mask`, axis 1 of `predictions`) are split over the devices.
  Returns:
    Scalar float32 loss, or the per-position losses with `reduction="none"` (this device's sequences
    under `axis_name`).

  >>> import jax.numpy as jnp
  >>> z = jnp.eye(2)[None]  # one sequence of two orthogonal steps; predict the next one
  >>> round(float(cpc(z[None], z, temperature=1.0)), 4)  # the prediction at t=0 is z_0: log(e + 1) - 0
  1.3133
  """
  targets = _checks.check_array("targets", targets, ndim=(3, 4))
  predictions = _checks.check_array("predictions", predictions, ndim=targets.ndim + 1)
  if predictions.shape[1:] != targets.shape or predictions.shape[0] < 1:
    raise ValueError(
        f"`predictions` must have shape (K,) + {targets.shape} (K >= 1 predictions at every position of "
        f"`targets`), got {predictions.shape}."
    )
  _common.check_reduction(reduction)
  b, length = targets.shape[:2]
  mask = _common.sample_mask(mask, b)
  steps = _offsets(offsets, predictions.shape[0], length)
  inv_t = _common.inverse_temperature(temperature)
  grid = targets if targets.ndim == 4 else targets[:, :, None]
  preds = predictions if predictions.ndim == 5 else predictions[:, :, :, None]
  per_anchor, valid = _cpc_anchors(preds, grid, mask, inv_t, tuple(int(o) for o in steps), normalize, impl,
                                   axis_name)
  if reduction == "sum":
    return _common.batch_sum(per_anchor, axis_name)
  w = grid.shape[2]
  sizes = [b * (length - int(o)) * w for o in steps]
  pieces = jnp.split(per_anchor, np.cumsum(sizes)[:-1])
  if reduction == "none":
    grids = [jnp.pad(jnp.reshape(x, (b, length - int(o), w)), ((0, 0), (0, int(o)), (0, 0)))
             for x, o in zip(pieces, steps)]
    return jnp.reshape(jnp.stack(grids), predictions.shape[:-1])
  if valid is None:
    counts = [float(_common.global_size(n, axis_name)) for n in sizes]
  else:
    counts = [jnp.maximum(_common.batch_sum(v.astype(jnp.float32), axis_name), 1.0)
              for v in jnp.split(valid, np.cumsum(sizes)[:-1])]
  return sum(_common.batch_sum(x, axis_name) / n for x, n in zip(pieces, counts))


@functools.partial(jax.jit, static_argnames=("steps", "normalize", "impl", "axis_name"))
def _cpc_anchors(preds, grid, mask, inv_t, steps, normalize, impl, axis_name):
  """The ℓ of every anchor with a target, offset by offset (rows t < T − o_k of predictions[k]), and
  their validity (None without a mask). One compiled program when called eagerly. Under `axis_name`:
  this device's anchors against every position of the global batch (the sharded engine)."""
  b, length, w, d = grid.shape
  z = _common.maybe_normalize(grid, normalize)
  p = _common.maybe_normalize(preds, normalize)
  rows = jnp.concatenate([jnp.reshape(p[n, :, :length - o], (-1, d)) for n, o in enumerate(steps)])
  positives = jnp.concatenate([jnp.reshape(z[:, o:], (-1, d)) for o in steps])
  valid = None
  if mask is not None:
    valid = jnp.concatenate([jnp.repeat(mask, (length - o) * w) for o in steps])
  col_valid = None if mask is None else jnp.repeat(mask, length * w)
  lse = ops.logsumexp(rows, jnp.reshape(z, (-1, d)), scale=inv_t, row_valid=valid, col_valid=col_valid,
                      impl=impl, axis_name=axis_name).rows
  per_anchor = _common.zero_invalid(lse, valid) - inv_t * _common.rowwise_dot(rows, positives)
  return _common.zero_invalid(per_anchor, valid), valid


# --------------------------------------------------------------------------------------------- PixPro
def _bin_centres(box: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """(B, h·w, 2) centres (x, y) of the h×w feature bins of each view in the original image's
  coordinates, row-major, and the (B,) diagonals of the bins. A flipped view (x0 > x1) has negative
  bin widths: its columns run right to left."""
  x0, y0, x1, y1 = (box[:, i] for i in range(4))
  bin_w, bin_h = (x1 - x0) / w, (y1 - y0) / h
  cx = x0[:, None, None] + (jnp.arange(w)[None, None, :] + 0.5) * bin_w[:, None, None]
  cy = y0[:, None, None] + (jnp.arange(h)[None, :, None] + 0.5) * bin_h[:, None, None]
  cx, cy = jnp.broadcast_to(cx, (box.shape[0], h, w)), jnp.broadcast_to(cy, (box.shape[0], h, w))
  centres = jnp.reshape(jnp.stack([cx, cy], axis=-1), (box.shape[0], h * w, 2))
  return centres, jnp.sqrt(bin_w**2 + bin_h**2)


def _positive_pixels(query_box, query_grid, key_box, key_grid, threshold) -> jax.Array:
  """(B, N, M) bool: the bins whose centres lie closer than `threshold` × the larger bin diagonal."""
  cq, dq = _bin_centres(query_box, *query_grid)
  ck, dk = _bin_centres(key_box, *key_grid)
  gap = cq[:, :, None, :] - ck[:, None, :, :]
  distance = jnp.sqrt(jnp.sum(gap**2, axis=-1)) / jnp.maximum(dq, dk)[:, None, None]
  return distance < threshold


def _check_box(name: str, box, b: int) -> jax.Array:
  box = _checks.check_array(name, box, ndim=2)
  if box.shape != (b, 4):
    raise ValueError(f"`{name}` must have shape ({b}, 4) (x0, y0, x1, y1 per image), got {box.shape}.")
  return jax.lax.stop_gradient(box.astype(jnp.float32))


def _propagate(x: jax.Array, g: jax.Array, sharpness) -> jax.Array:
  """The pixel propagation module: y_i = Σ_j max(<x_i, x_j>, 0)^γ g_j, x and g unit rows (B, N, D); a
  zero similarity has weight 0 and a zero gradient for any γ > 0."""
  s = jnp.einsum("bnd,bmd->bnm", x, x, preferred_element_type=jnp.float32)
  positive = s > 0
  weight = jnp.where(positive, jnp.where(positive, s, 1.0) ** sharpness, 0.0)
  return jnp.einsum("bnm,bmd->bnd", weight, g.astype(jnp.float32), preferred_element_type=jnp.float32)


@_common.keyword_only
def pixpro(
    query: jax.Array,
    key: jax.Array,
    query_box: jax.Array,
    key_box: jax.Array,
    *,
    value: jax.Array | None = None,
    sharpness: float = 2.0,
    threshold: float = 0.7,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""PixPro: the propagated query pixels regress the momentum key pixels at the same place of the image.

  "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual Representation
  Learning" (Xie et al., CVPR 2021). For image b, with x the query view's projected features, g(x)
  their transform, x' the key view's momentum features (all L2-normalised per pixel):

      y_i = Σ_j max(cos(x_i, x_j), 0)^γ · g(x_j)                   (pixel propagation module)
      A_ij = [ ‖c_i − c'_j‖ / max(d, d') < T ]                      (positive pixel pairs)
      ℓ_b = −Σ_ij A_ij cos(y_i, sg(x'_j)) / Σ_ij A_ij               (0 if no pair)
      loss = mean_b ℓ_b

  c_i, c'_j are the centres of the feature bins in the original image's coordinates (each view's bins
  split its crop box evenly), d, d' the diagonals of a bin of each view. Defaults from the authors' code
  (zdaxie/PixPro, `PixPro.featprop` and `regression_loss`): sharpness γ = 2, threshold T = 0.7, the
  similarity clamped at 0, g's output normalised. Their loss is −2 ℓ summed over both directions: that
  is 2 · (pixpro(x₁, x'₂, box₁, box₂) + pixpro(x₂, x'₁, box₂, box₁)). A horizontally flipped view has
  x0 > x1 in its box (their `RandomHorizontalFlipCoord`), which mirrors its bin centres.

  What is the caller's: the backbone's feature maps (`ResNet.feature_map`), the projector, the momentum
  encoder, and the transform g of the module (PixPro's default, one 1×1 convolution, is a `nn.Dense`
  over the channels), applied to the query features and passed as `value`. With a 1×1 map and equal
  boxes it is `negative_cosine(value, key)` (BYOL / SimSiam).

  Args:
    query: (B, H, W, D) query-view features x (before the propagation module).
    key: (B, H', W', D) key-view momentum features x'; no gradient flows into it.
    query_box, key_box: (B, 4) each view's crop (x0, y0, x1, y1) in the original image, normalised to
      [0, 1]; no gradient.
    value: (B, H, W, D) transformed features g(x); None for g = identity.
    sharpness: γ > 0. threshold: T > 0, in units of the larger bin diagonal.
    reduction: "mean", "sum" or "none" (the (B,) ℓ_b).
    mask: None or bool (B,): False marks padding images, left out of the mean.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((1, 2, 2, 3))  # every pixel the same: cosine 1 at the 4 positive pairs
  >>> box = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  >>> round(float(pixpro(x, x, box, box)), 4)
  -1.0
  """
  query = _checks.check_array("query", query, ndim=4)
  key = _checks.check_array("key", key, ndim=4)
  b, h, w, d = query.shape
  if key.shape[0] != b or key.shape[-1] != d:
    raise ValueError(
        f"`key` must have shape ({b}, H', W', {d}) like `query` in its batch and channels, got {key.shape}."
    )
  if value is not None:
    value = _checks.check_array("value", value, ndim=4)
    _checks.check_same_shape("query", query, "value", value)
  query_box = _check_box("query_box", query_box, b)
  key_box = _check_box("key_box", key_box, b)
  _checks.check_positive("sharpness", sharpness)
  _checks.check_positive("threshold", threshold)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  per_image = _pixpro_per_image(query, key, value, query_box, key_box, sharpness, threshold)
  return _common.reduce_loss(per_image, reduction, mask)


@jax.jit
def _pixpro_per_image(query, key, value, query_box, key_box, sharpness, threshold) -> jax.Array:
  """The (B,) ℓ_b of `pixpro` (one compiled program when called eagerly)."""
  b, h, w, d = query.shape
  x = _common.l2_normalize(jnp.reshape(query.astype(jnp.float32), (b, h * w, d)))
  g = x if value is None else _common.l2_normalize(jnp.reshape(value.astype(jnp.float32), (b, h * w, d)))
  y = _common.l2_normalize(_propagate(x, g, sharpness))
  k = _common.l2_normalize(jnp.reshape(jax.lax.stop_gradient(key).astype(jnp.float32), (b, -1, d)))
  cosine = jnp.einsum("bnd,bmd->bnm", y, k, preferred_element_type=jnp.float32)
  pairs = _positive_pixels(query_box, (h, w), key_box, key.shape[1:3], threshold).astype(jnp.float32)
  return -jnp.sum(pairs * cosine, axis=(1, 2)) / jnp.maximum(jnp.sum(pairs, axis=(1, 2)), 1.0)
