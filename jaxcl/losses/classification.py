"""Classification-style objectives: a caption or an identity becomes class labels (CatLIP), or negatives
come from class proxies and the batch together (UNPG)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common
from jaxcl.ops.engines import SHARDED_IMPLS


# ------------------------------------------------------------------------------------------- CatLIP
def _softplus(x: jax.Array) -> jax.Array:
  """log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)), finite for every float32 x."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@_common.keyword_only
def catlip(
    logits: jax.Array,
    targets: jax.Array,
    *,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""CatLIP: multi-label binary cross-entropy of image logits against the synsets of the caption's nouns.

  "CatLIP: CLIP-level Visual Recognition Accuracy with 2.7x Faster Pre-training on Web-scale Image-Text
  Data" (Mehta et al., Apple, 2024). Pre-training as classification: the caption of each image is
  turned into the set of WordNet synsets of its nouns, a multi-hot target t_i over a vocabulary of C
  synsets, and the image encoder's C logits z_i are trained with binary cross-entropy, no text encoder
  and no pairwise similarities:

      ℓ_i = Σ_c [ softplus(z_ic) − t_ic z_ic ] = −Σ_c [ t_ic log σ(z_ic) + (1 − t_ic) log σ(−z_ic) ]
      loss = mean_i ℓ_i

  The mean is over images and the sum over the vocabulary, as the released pre-training configs do
  (apple/corenet, projects/catlip/pretraining/*.yaml: `binary_cross_entropy` with reduction
  "batch_mean", the summed BCE divided by the batch size). Soft targets in [0, 1] are accepted too.

  What is the caller's, done once over the captions with NLTK in corenet's
  `WordnetTaggedClassificationDataset`, not here: tokenising and part-of-speech tagging each caption,
  lemmatising each word, mapping it to its first noun synset `{word}.n.01`, and the vocabulary (the
  synsets ordered by their frequency in the data, the first C kept: C = 24,320 in the released configs
  for DataComp-1.3B). `catlip_targets` turns captions already mapped to word ids into the multi-hot t.
  No similarity matrix is formed, so there is no `impl=`: the logits are the caller's classifier
  output.

  Args:
    logits: (B, C) image logits over the vocabulary.
    targets: (B, C) multi-hot (bool, integer or float in [0, 1]) targets.
    reduction: "mean" (the loss above), "sum" or "none": the (B,) per-image ℓ_i.
    mask: None or bool (B,); False marks padding images, left out of the mean.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (B,) for "none").

  >>> import jax.numpy as jnp
  >>> round(float(catlip(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]))), 4)  # 2 log 2
  1.3863
  """
  z = _checks.check_array("logits", logits, ndim=2)
  t = _multi_hot_targets(targets, z.shape)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, z.shape[0])
  z32 = z.astype(jnp.float32)
  per_image = jnp.sum(_softplus(z32) - t * z32, axis=1)
  return _common.reduce_loss(_common.zero_invalid(per_image, mask), reduction, mask)


def _multi_hot_targets(targets, shape: tuple[int, ...]) -> jax.Array:
  t = _checks.check_array("targets", targets, ndim=2, floating=False)
  if t.shape != tuple(shape):
    raise ValueError(f"`targets` must have the shape of `logits` {tuple(shape)}, got {t.shape}.")
  if not (t.dtype == jnp.bool_ or jnp.issubdtype(t.dtype, jnp.number)):
    raise TypeError(f"`targets` must be a boolean or numeric array, got {t.dtype}.")
  v = _checks.concrete_value(t)
  if v is not None and v.size and not (v.min() >= 0 and v.max() <= 1):
    raise ValueError(f"`targets` must lie in [0, 1], got values in [{v.min()}, {v.max()}].")
  return t.astype(jnp.float32)


@_common.keyword_only
def catlip_targets(token_ids: jax.Array, vocabulary: jax.Array, *, num_classes: int) -> jax.Array:
  r"""CatLIP's multi-hot targets from captions as word ids: t_ic = 1 if some word of caption i maps to c.

      t_ic = max_l [ vocabulary[token_ids_il] = c ]

  `vocabulary` maps each word id to its class (its noun synset's index in the CatLIP vocabulary), or −1
  for a word that is in no class (padding, words that are not nouns, synsets cut by the frequency
  threshold). Building that map is the caller's (see `catlip`: noun tagging, lemmatising, the `.n.01`
  synset and the frequency-ordered vocabulary are NLTK/WordNet work done once offline); this function
  only applies it, so it needs no NLTK at run time and runs under `jit`. A word repeated in a caption
  counts once, as in corenet (`targets[labels] = 1`).

  Args:
    token_ids: (B, L) integer word ids of each caption, each in [0, len(vocabulary)).
    vocabulary: (V,) integer class of each word id, in [−1, num_classes).
    num_classes: C, the vocabulary size of the classifier.
  Returns:
    (B, C) float32 multi-hot targets for `catlip`.

  >>> import jax.numpy as jnp
  >>> catlip_targets(jnp.array([[0, 2, 2]]), jnp.array([1, -1, 0]), num_classes=3).tolist()
  [[1.0, 1.0, 0.0]]
  """
  ids = _checks.check_array("token_ids", token_ids, ndim=2, floating=False)
  vocab = _checks.check_array("vocabulary", vocabulary, ndim=1, floating=False)
  for name, x in (("token_ids", ids), ("vocabulary", vocab)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"`{name}` must have an integer dtype, got {x.dtype}.")
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"`num_classes` must be a positive Python int, got {num_classes!r}.")
  _check_range("token_ids", ids, 0, vocab.shape[0] - 1)
  _check_range("vocabulary", vocab, -1, num_classes - 1)
  classes = vocab[ids]
  classes = jnp.where(classes < 0, num_classes, classes)  # out of range: dropped by the scatter
  rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
  return jnp.zeros((ids.shape[0], num_classes), jnp.float32).at[rows, classes].set(1.0, mode="drop")


def _check_range(name: str, x: jax.Array, low: int, high: int) -> None:
  v = _checks.concrete_value(x)
  if v is not None and v.size and (v.min() < low or v.max() > high):
    raise ValueError(f"`{name}` must lie in [{low}, {high}], got values in [{v.min()}, {v.max()}].")


# --------------------------------------------------------------------------------------------- UNPG
MARGINS = ("arcface", "cosface")


@_common.keyword_only
@_common.shardable("features", "labels", "mask")
def unpg(
    features: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    scale: float | jax.Array = 64.0,
    margin: float | jax.Array = 0.5,
    margin_type: str = "arcface",
    whisker: float | None = 1.5,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""UNPG: a margin softmax over class proxies whose denominator also holds the batch's negative pairs.

  "Unified Negative Pair Generation toward Well-discriminative Feature Space for Face Recognition" (Jung
  et al., BMVC 2022). With x̂_i the normalised features, ŵ_c the normalised class weights (proxies),
  cos_ic = <x̂_i, ŵ_c>, the margin target φ_i = cos(θ_iy + m) (ArcFace) or cos_iy − m (CosFace), and
  the in-batch negative pairs N = {<x̂_a, x̂_b> : a < b, y_a ≠ y_b} (IPG) kept by the filter F:

      ℓ_i = −s φ_i + log( exp(s φ_i) + Σ_{c ≠ y_i} exp(s cos_ic) + Σ_{n ∈ F(N)} exp(s n) )
      loss = mean_i ℓ_i

  The proxy negatives (MPG) are those of ArcFace/CosFace; the pair negatives are one pool shared by
  every row. F, the paper's filtering of noisy negatives, is the box-and-whisker rule of the released
  code: with N sorted ascending (|N| = n), q₁ = N[⌊n/4⌋], q₃ = N[⌊3n/4⌋] and w = `whisker`, keep
  q₁ − w (q₃ − q₁) ≤ n ≤ q₃ + w (q₃ − q₁); `whisker=None` keeps every pair. With no negative pair (one
  label in the batch) the loss is ArcFace / CosFace.

  Defaults from github.com/jung-jun-uk/UNPG (recognition/models/build.py and head.py,
  data/head.zoo.yaml): s = 64, m = 0.5 for ArcFace (the file gives CosFace m = 0.5 too; CosFace's own
  paper uses 0.35), w = 1.5; the margin is cos(θ + m) without ArcFace's easy-margin threshold, as there.

  Engines: the class term Σ_{c ≠ y_i} exp(s cos_ic) is a log-sum-exp over the proxies with the target
  excluded by ids, so `impl` applies to it; the pair term goes through the engines only with
  `whisker=None` (Σ_{a<b, y_a≠y_b} = ½ Σ_a Σ_{b: y_b≠y_a}, a log-sum-exp of the row log-sum-exps). The
  filter's quartiles sort all B(B − 1)/2 pair similarities, so with a whisker the pair term is dense
  (B × B).

  Over a mesh (`axis_name` / `mesh`) the examples are split over the devices and the pairs are those of
  the global batch, as the released code pools the pairs of its (DataParallel-gathered) batch: the class
  weights are replicated and the class term is each device's rows (a one-device engine); with
  `whisker=None` the pair term runs on the sharded engine ("allgather" or "ring"), with a whisker the
  filter needs every pair, so the features are gathered for "ring" too and every device sorts the
  global batch's B(B − 1)/2 pairs.

  Args:
    features: (B, D) embeddings (normalised here).
    labels: (B,) integer class of each example, in [0, C).
    class_weights: (C, D) class proxies, the classifier's weights (normalised here).
    scale: s > 0.
    margin: m, the additive angular (ArcFace) or cosine (CosFace) margin.
    margin_type: "arcface" or "cosface".
    whisker: w ≥ 0 of the box-and-whisker filter, or None (no filter).
    reduction: "mean" (the loss above), "sum" or "none": the (B,) per-example ℓ_i.
    mask: None or bool (B,); False marks padding examples, neither anchors nor part of any pair.
    impl: similarity engine of the class term (and of the pair term with `whisker=None`); "allgather" |
      "ring" with `axis_name` / `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; `features`, `labels` and `mask` are split
      over the devices, `class_weights` replicated.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (B,) for "none": this device's examples under
    `axis_name`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # two classes, proxies equal to the features; one negative pair, <x_0, x_1> = 0
  >>> round(float(unpg(x, jnp.array([0, 1]), x, scale=1.0, margin=0.0)), 4)  # log(e + 1 + 1) - 1
  0.5514
  """
  x = _common.embeddings("features", features, min_batch=1)
  w = _common.embeddings("class_weights", class_weights, min_batch=1)
  if x.shape[1] != w.shape[1]:
    raise ValueError(f"`features` and `class_weights` must have the same feature size, got {x.shape} and {w.shape}.")
  y = _checks.check_labels("labels", labels, x.shape[0]).astype(jnp.int32)
  _check_range("labels", jnp.asarray(labels), 0, w.shape[0] - 1)
  s = _common.logit_scale(scale, "scale")
  m = _checks.check_scalar("margin", margin)
  _checks.check_choice("margin_type", margin_type, MARGINS)
  if whisker is not None:
    _checks.check_non_negative("whisker", whisker)
  _common.check_reduction(reduction)
  if axis_name is not None:
    _checks.check_choice("impl", impl, ("auto",) + SHARDED_IMPLS)
  mask = _common.sample_mask(mask, x.shape[0])
  classes = jnp.arange(w.shape[0], dtype=jnp.int32)
  class_impl = "auto" if axis_name is not None else impl  # the proxies are replicated: this device's rows
  others = ops.logsumexp(x, w, scale=s, exclude=(y, classes), row_valid=mask, impl=class_impl).rows
  target = _margin_target(jnp.einsum("bd,bd->b", x, w[y], preferred_element_type=jnp.float32), m, margin_type)
  pairs = _pair_negatives_logsumexp(x, y, s, whisker, mask, impl, axis_name)
  denominator = jnp.logaddexp(jnp.logaddexp(s * target, others), pairs)
  return _common.reduce_loss(_common.zero_invalid(denominator - s * target, mask), reduction, mask, axis_name)


def _margin_target(cos: jax.Array, m: jax.Array, margin_type: str) -> jax.Array:
  """cos(θ + m) = cos θ cos m − sin θ sin m (sin θ ≥ 0; kept off 0 so its gradient stays finite), or
  cos θ − m."""
  if margin_type == "cosface":
    return cos - m
  sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 1e-12))
  return cos * jnp.cos(m) - sin * jnp.sin(m)


def _pair_negatives_logsumexp(x, y, s, whisker, mask, impl, axis_name=None) -> jax.Array:
  """log Σ_{a<b, y_a ≠ y_b, kept} exp(s <x_a, x_b>), a scalar (−inf with no pair), over the global batch
  under `axis_name` (x, y and mask this device's shards): without a filter, this device's rows against
  every column by the sharded engine; with one, the gathered batch's pairs."""
  if whisker is None:
    rows = ops.logsumexp(x, x, scale=s, exclude=(y, y), row_valid=mask, col_valid=mask, impl=impl,
                         axis_name=axis_name).rows
    rows = jnp.where(mask if mask is not None else True, rows, -jnp.inf)
    return _masked_logsumexp(rows, jnp.isfinite(rows), axis_name) - jnp.log(2.0)
  # The quartiles need every pair: the whole batch on every device (ring too).
  x, y, mask = (_common.gather_batch(v, axis_name) for v in (x, y, mask))
  sim = jnp.einsum("ad,bd->ab", x, x, preferred_element_type=jnp.float32)
  n = x.shape[0]
  valid = (jnp.arange(n)[:, None] < jnp.arange(n)[None, :]) & (y[:, None] != y[None, :])
  if mask is not None:
    valid = valid & mask[:, None] & mask[None, :]
  keep = jax.lax.stop_gradient(valid & _inside_whiskers(sim, valid, whisker))
  return _masked_logsumexp(s * sim, keep)


def _inside_whiskers(values: jax.Array, valid: jax.Array, whisker: float) -> jax.Array:
  """The box-and-whisker rule over the valid entries: q₁ − w·IQR ≤ v ≤ q₃ + w·IQR, q₁ and q₃ the
  entries at ⌊n/4⌋ and ⌊3n/4⌋ of the n valid values sorted ascending."""
  flat = jnp.sort(jnp.where(valid, values, jnp.inf).ravel())
  count = jnp.sum(valid)
  q1 = flat[jnp.minimum(count // 4, flat.size - 1)]
  q3 = flat[jnp.minimum((3 * count) // 4, flat.size - 1)]
  spread = whisker * (q3 - q1)
  return (values >= q1 - spread) & (values <= q3 + spread)


def _masked_logsumexp(z: jax.Array, keep: jax.Array, axis_name=None) -> jax.Array:
  """log Σ_{keep} exp z over every entry (of every device's z under `axis_name`), −inf with zero
  gradient when nothing is kept. The shift by the largest kept entry has no gradient (the result does
  not depend on it)."""
  top = jax.lax.stop_gradient(jnp.max(jnp.where(keep, z, -jnp.inf)))
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
  total = _common.batch_sum(jnp.where(keep, jnp.exp(jnp.where(keep, z, safe_top) - safe_top), 0.0), axis_name)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + safe_top, -jnp.inf)
