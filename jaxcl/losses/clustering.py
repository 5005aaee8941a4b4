"""Clustering: losses in which clusters of the batch (or learned cluster centres) define the positives
and negatives.

The family of objectives built on a clustering: SBCL splits every class into k-means subclasses
(`subclass_kmeans`, on device) and contrasts at both granularities; MCL restricts each anchor's
negatives to its cluster in the earlier stages (`mcl_cluster_ids`, `mcl_nt_xent`); MLCD classifies
against many cluster centres with its positive and negative centres in separate sums (`mlcd`); PAMC
contrasts graph neighbours against the clusters' meta-nodes instead of every node (`pamc`).

| paper | function | engines |
|---|---|---|
| Subclass-balancing Contrastive Learning for Long-tailed Recognition | subclass_kmeans, sbcl | sbcl: all, allgather, ring |
| Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning | mcl_cluster_ids, mcl_nt_xent | all, allgather, ring |
| Multi-label Cluster Discrimination for Visual Representation Learning | mlcd | dense, blockwise, auto; centres split over devices (allgather, ring) |
| Efficient block contrastive learning via parameter-free meta-node approximation | pamc | — (edges and K×K) |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.ops import engines
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.losses import _common
from jaxcl.losses import _tiled


def _pair_ids(a: jax.Array, b: jax.Array) -> jax.Array:
  """Ids in [0, n) equal exactly when both (a_i, b_i) pairs are equal (lexicographic ranks)."""
  order = jnp.lexsort((b, a))
  sa, sb = a[order], b[order]
  new = jnp.concatenate([jnp.ones((1,), bool), (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])])
  group = jnp.cumsum(new.astype(jnp.int32)) - 1
  return jnp.zeros_like(group).at[order].set(group)


# ------------------------------------------------------------------------------------------ k-means
@_common.keyword_only
def subclass_kmeans(
    features: jax.Array,
    labels: jax.Array,
    *,
    subclass_size: int,
    iterations: int = 10,
    max_subclasses: int | None = None,
    key: jax.Array | None = None,
    normalize: bool = True,
) -> jax.Array:
  r"""Splits every class into subclasses of about `subclass_size` samples by k-means, on device.

  The clustering step of SBCL ("Subclass-balancing Contrastive Learning for Long-tailed Recognition",
  Hou et al., ICCV 2023): class c with n_c samples gets k_c = max(1, ⌊n_c / M⌋) subclasses (M =
  `subclass_size`, the paper's tail-class-sized threshold), found by spherical k-means (cosine
  similarity, L2-normalised centres) restricted to the class's own samples. Initial centres are k_c of
  the class's samples (the first ones in index order, or a random choice with `key`: Forgy init);
  `iterations` Lloyd steps run in a `lax.fori_loop`. A centre that loses all its samples keeps its
  position. Everything has static shapes (one slot per possible subclass), so it runs under `jit`;
  each step forms the (N, max_subclasses) similarity to the centres (O(N²) memory with the default
  max_subclasses = N: pass a smaller bound, e.g. C + N // M, for a whole dataset).

  The authors' recipe (JackHck/SBCL, `SimCLR/main.py`, `cluster()`, re-run on the whole training set
  every 10 epochs): M = max(smallest class size, 10) on CIFAR (`--cluster 10`; max(smallest class
  size, 20) on ImageNet-LT, `moco/sbcl.py`), so pass `subclass_size=max(min(class_sizes), 10)`.
  Their k-means (`SimCLR/kmeans_gpu.py`, cosine distance, Forgy init) stops when (Σ_c ‖Δμ_c‖₂)², the
  squared total centre shift, drops below 1e-3 or after 35 iterations (CIFAR; no cap on ImageNet-LT),
  and re-seeds an empty cluster at a randomly drawn sample. Here the number of steps is fixed (no
  tolerance: a static-shape loop) and an empty cluster keeps its old centre instead. Their centre is
  the plain mean of the model's (already L2-normalised) features, the same direction as our
  normalised mean, so a Lloyd step assigns the samples alike.

  Args:
    features: (N, D) embeddings (a batch, or the whole training set as SBCL does every few epochs).
    labels: (N,) integer class labels.
    subclass_size: M >= 1.
    iterations: Lloyd iterations (>= 0).
    max_subclasses: number of centre slots (static); None means N. A class whose subclasses do not fit
      gets fewer (the slots go to classes in label order).
    key: optional PRNG key for the initial centres.
    normalize: L2-normalise the features first (spherical k-means).
  Returns:
    (N,) int32 subclass ids, unique across classes (a subclass lies inside one class), in
    [0, max_subclasses).

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 1.0]])
  >>> subclass_kmeans(x, jnp.array([0, 0, 0, 0, 1]), subclass_size=2).tolist()
  [0, 0, 1, 1, 2]
  """
  x = _checks.check_array("features", features, ndim=2)
  n = x.shape[0]
  labels = _checks.check_labels("labels", labels, n)
  if not isinstance(subclass_size, (int, np.integer)) or subclass_size < 1:
    raise ValueError(f"`subclass_size` must be an integer >= 1, got {subclass_size!r}.")
  if not isinstance(iterations, (int, np.integer)) or iterations < 0:
    raise ValueError(f"`iterations` must be an integer >= 0, got {iterations!r}.")
  slots = n if max_subclasses is None else max_subclasses
  if not isinstance(slots, (int, np.integer)) or slots < 1:
    raise ValueError(f"`max_subclasses` must be an integer >= 1 or None, got {max_subclasses!r}.")
  x = _common.maybe_normalize(x, normalize).astype(jnp.float32)
  cls = _common.compact_ids(labels)
  tiebreak = jnp.arange(n) if key is None else jax.random.permutation(key, n)
  order = jnp.lexsort((tiebreak, cls))
  sorted_cls = cls[order]
  rank_sorted = jnp.arange(n) - jnp.searchsorted(sorted_cls, sorted_cls, side="left")
  rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  n_c = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), cls, num_segments=n)
  k_c = jnp.where(n_c > 0, jnp.maximum(1, n_c // subclass_size), 0)
  offset = jnp.cumsum(k_c) - k_c  # exclusive: first slot of each class id
  seed = rank < k_c[cls]
  slot_of_seed = jnp.where(seed, offset[cls] + rank, slots)  # out of range -> dropped
  centres = jnp.zeros((slots, x.shape[1]), jnp.float32).at[slot_of_seed].set(x, mode="drop")
  slot_class = jnp.full((slots,), -1, jnp.int32).at[slot_of_seed].set(cls, mode="drop")

  def assign(c):
    sim = x @ c.T
    return jnp.argmax(jnp.where(slot_class[None, :] == cls[:, None], sim, -jnp.inf), axis=1)

  def step(_, c):
    a = assign(c)
    total = jax.ops.segment_sum(x, a, num_segments=slots)
    count = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), a, num_segments=slots)
    mean = _common.l2_normalize(total) if normalize else total / jnp.maximum(count, 1.0)[:, None]
    return jnp.where(count[:, None] > 0, mean, c)

  centres = jax.lax.fori_loop(0, iterations, step, centres)
  return assign(centres).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- SBCL
@_common.keyword_only
@_common.shardable("features", "labels", "subclass_labels", "mask")
def sbcl(
    features: jax.Array,
    labels: jax.Array,
    subclass_labels: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    class_temperature: float | jax.Array | None = None,
    beta: float | jax.Array = 0.25,
    own_views_in_class_term: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""SBCL: the bi-granularity (subclass + class) supervised contrastive loss.

  "Subclass-balancing Contrastive Learning for Long-tailed Recognition" (Hou, Zhang, Wang & Zhou, ICCV
  2023). Head classes are split into subclasses of tail-class size (`subclass_kmeans`). Over the M = N·V
  rows (samples × views), with s_ab = <z_a, z_b>, S(i) the other rows of i's subclass (i's own other
  views included), C(i) the rows of i's class and O(i) the other views of i's own sample:

      ℓ¹_i = −1/|S(i)| Σ_{p ∈ S(i)} log [ exp(s_ip/τ₁) / Σ_{a ≠ i} exp(s_ia/τ₁) ]
      P²(i) = (C(i) \ S(i)) ∪ O(i)        D²(i) = {a : a ∉ S(i) ∪ {i}} ∪ O(i)
      ℓ²_i = −1/|P²(i)| Σ_{p ∈ P²(i)} log [ exp(s_ip/τ₂) / Σ_{a ∈ D²(i)} exp(s_ia/τ₂) ]
      loss = mean_{i: S(i) ≠ ∅} ℓ¹_i + β · mean_{i: P²(i) ≠ ∅} ℓ²_i

  ℓ¹ pulls a sample towards its own subclass against everything; ℓ² pulls it towards the other
  subclasses of its class (and its own other views) against every *other subclass* plus its own views.
  This follows the authors' CIFAR code (JackHck/SBCL, `SimCLR/loss.py`, `SupConLoss_rank`, 2 views):
  its `ad_mask` adds the anchor's other view to both the positives and the denominator of ℓ², and
  `loss.mean()` averages over every anchor. With V >= 2 every anchor has S(i) ⊇ O(i) ≠ ∅ and P²(i) ≠ ∅,
  so both means run over all M rows: tail-class anchors (one subclass) still contribute an ℓ² term, their
  own views against the other subclasses. (With V > 2 we take all V − 1 other views; the authors' mask
  holds one.) With V = 1, O(i) is empty and anchors without such positives are left out of each mean
  (a term is 0 when no anchor has one). `own_views_in_class_term=False` drops O(i) from P² and D², the
  formula of earlier versions of this library (identical for V = 1).

  Defaults: τ₁ = 0.1 and β = 0.25 are the authors' CIFAR recipe (`--temperature`, `grama`); their
  ImageNet-LT / MoCo recipe (`moco/loss.py`) uses τ₁ = 0.07, β = 0.2 and a scalar τ₂ = 0.12. τ₂ may be
  one temperature per class (`class_temperature` of shape (C,), indexed by the label values 0..C−1;
  None means τ₁). The authors' CIFAR per-class τ₂ (`SimCLR/main.py`, `cluster()`): d_c = mean over
  class c of ‖f − μ_c‖₂ / log(n_c + 10), clipped to its 20th–80th percentiles over the classes,
  τ₂,c = τ₁ · d_c / mean_c d_c (of the clipped d), and τ₂,c = τ₁ for a class with one subclass. Their
  CIFAR loss also scales ℓ¹ by τ₁/0.07 (the SupCon `base_temperature`); this function does not, but
  the authors' value is (τ₁/0.07) · sbcl(..., beta=0.07·β/τ₁): at τ₁ = 0.1, β = 0.25 that is
  (10/7) · sbcl(..., beta=0.175).

  Both log-sum-exps are id masks (exclude the diagonal; exclude same-subclass pairs), so every engine
  runs them; the own-view part of D²(i) is V − 1 row-wise dot products per row, joined to the
  other-subclass log-sum-exp by a logaddexp; the positive terms are segment sums. Identities: with one
  subclass per class (subclass ids = labels) and V = 1 (or `own_views_in_class_term=False`) ℓ² vanishes
  and the loss is `supcon(features, labels, temperature=τ₁)`; with every sample its own subclass
  (subclass ids = arange(N)) and V >= 2 it is `supcon(features, arange(N), temperature=τ₁) + β ·
  supcon(features, labels, temperature=τ₂)`.

  Sharded (`axis_name` / `mesh`): both log-sum-exps run on the sharded engines; the class and subclass
  sums are `jaxcl.ops.sharded.matched_sum` over the global batch, and the (N,) labels are gathered to
  number the (label, subclass) pairs globally.

  Args:
    features: (N, D), or (N, V, D) with V views per sample (views share label and subclass).
    labels: (N,) integer class labels. subclass_labels: (N,) integer subclass ids (only equality of
      (label, subclass) pairs matters).
    temperature: τ₁ > 0. class_temperature: None, a scalar τ₂ > 0, or a (C,) vector of per-class τ₂.
    beta: β >= 0, the weight of the class-level term.
    own_views_in_class_term: put each row's own other views into ℓ²'s positives and denominator (the
      authors' code); False leaves them out of ℓ².
    normalize: L2-normalise the features first.
    reduction: "mean" (the loss above), "sum" or "none": the (N·V,) per-anchor terms
      [i ∈ A¹] ℓ¹_i + β [i ∈ A²] ℓ²_i in view-major order (row v·N + s is view v of sample s), where
      A¹ = {i : S(i) ≠ ∅} and A² = {i : P²(i) ≠ ∅}; "sum" is their sum, Σ_{A¹} ℓ¹ + β Σ_{A²} ℓ². Each
      term of "mean" is averaged over its own anchor set, so "mean" is the mean of "none" whenever
      A¹ = A² = every row (always with V >= 2). Under `axis_name`, "none" gives this device's rows,
      view-major over its own samples.
    mask: None or bool (N,): False marks padding samples, whose views are neither anchors, positives
      nor negatives, in either term, nor count in any class or subclass.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the samples split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; `features`, `labels`, `subclass_labels` and
      `mask` are split along the samples; `class_temperature` is replicated.
  Returns:
    Scalar float32 loss, or (N·V,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  >>> round(float(sbcl(x, jnp.array([0, 0, 1, 1]), jnp.array([0, 0, 1, 1]), temperature=1.0)), 4)
  0.5514
  >>> # One class, two subclasses, two identical views per sample: ℓ¹ = log(e + 2) − 1 and
  >>> # ℓ² = log(e + 2) − 1/3 (positives: two other-subclass rows at s = 0 and the own view at s = 1),
  >>> # loss = ℓ¹ + 0.25 · ℓ² = 0.85597.
  >>> v = jnp.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
  >>> round(float(sbcl(v, jnp.array([0, 0]), jnp.array([0, 1]), temperature=1.0)), 4)
  0.856
  >>> round(float(sbcl(v, jnp.array([0, 0]), jnp.array([0, 1]), temperature=1.0,
  ...                  own_views_in_class_term=False)), 4)  # ℓ² = log 2
  0.7247
  """
  z, labels, views = _common.views_to_rows("features", features, labels, axis_name)
  n = labels.shape[0]
  subclass_labels = _checks.check_labels("subclass_labels", subclass_labels, n)
  _common.check_reduction(reduction)
  mask, valid = _common.row_mask(mask, n, views)
  inv_t1 = _common.inverse_temperature(temperature)
  _checks.check_non_negative("beta", beta)
  if not isinstance(own_views_in_class_term, (bool, np.bool_)):
    raise TypeError(f"`own_views_in_class_term` must be a bool, got {own_views_in_class_term!r}.")
  if class_temperature is None:
    inv_t2 = inv_t1
  else:
    tau2 = jnp.asarray(class_temperature)
    _checks.check_temperature("class_temperature", tau2)
    if tau2.ndim == 0:
      inv_t2 = 1.0 / tau2.astype(jnp.float32)
    elif tau2.ndim == 1:
      lab = _checks.concrete_value(labels)
      kept = None if mask is None else _checks.concrete_value(mask)
      if lab is not None and mask is not None:  # padding labels are not indexed into τ₂
        lab = None if kept is None else lab[kept]
      if lab is not None and lab.size and (lab.min() < 0 or lab.max() >= tau2.shape[0]):
        raise ValueError(
            f"per-class `class_temperature` of shape {tau2.shape} needs labels in [0, {tau2.shape[0]}), "
            f"got labels in [{lab.min()}, {lab.max()}]."
        )
      inv_t2 = jnp.tile(1.0 / tau2.astype(jnp.float32)[labels], views)
    else:
      raise ValueError(f"`class_temperature` must be a scalar or a (C,) vector, got shape {tau2.shape}.")

  z = _common.maybe_normalize(z, normalize)
  m = z.shape[0]
  z32 = _common.zero_invalid(z.astype(jnp.float32), None if valid is None else valid[:, None])
  self_dot = _common.rowwise_dot(z32, z32)
  if axis_name is None:
    cls = jnp.tile(_common.compact_ids(labels), views)
    sub = jnp.tile(_pair_ids(labels, subclass_labels), views)
    class_sum, class_size = _common.segment_stats(z32, cls, valid)
    sub_sum, sub_size = _common.segment_stats(z32, sub, valid)
  else:  # subclass ids numbered over the gathered (N,) labels; sums over the global batch
    gathered = [jax.lax.all_gather(y, axis_name, tiled=True) for y in (labels, subclass_labels)]
    sub = jnp.tile(_pair_ids(*gathered)[_common.batch_ids(n, axis_name)], views)
    ones = jnp.ones((m, 1), jnp.float32) if valid is None else valid[:, None].astype(jnp.float32)
    with_ones = jnp.concatenate([z32, ones], axis=1)
    class_stats, sub_stats = (ops.sharded.matched_sum(ids, with_ones, axis_name=axis_name, impl=impl)
                              for ids in (jnp.tile(labels, views), sub))
    class_sum, class_size = class_stats[:, :-1], class_stats[:, -1]
    sub_sum, sub_size = sub_stats[:, :-1], sub_stats[:, -1]

  n1 = sub_size - 1.0
  pos1 = inv_t1 * (_common.rowwise_dot(z32, sub_sum) - self_dot) / jnp.maximum(n1, 1.0)
  rows = jnp.concatenate([_common.batch_ids(n, axis_name) + v * _common.global_size(n, axis_name)
                          for v in range(views)])  # global row ids: view v of sample i is v·N + i
  lse1 = ops.logsumexp(z, z, scale=inv_t1, exclude=(rows, rows), row_valid=valid, col_valid=valid,
                       impl=impl, axis_name=axis_name).rows
  has1 = _common.and_valid(n1 > 0, valid)
  l1 = jnp.where(has1, lse1 - pos1, 0.0)

  # ℓ²: the other subclasses (an id mask on every engine), plus, optionally, the row's own other views.
  lse2 = ops.logsumexp(z, z, scale=inv_t2, exclude=(sub, sub), row_valid=valid, col_valid=valid,
                       impl=impl, axis_name=axis_name).rows
  lse2 = _common.zero_invalid(lse2, valid)
  pos2_dot = _common.rowwise_dot(z32, class_sum - sub_sum)
  n2 = class_size - sub_size
  if own_views_in_class_term and views > 1:
    per_sample = jnp.reshape(z32, (views, n, -1))  # view-major rows: row v·N + s is view v of sample s
    own = jnp.einsum("vsd,wsd->svw", per_sample, per_sample)  # (N, V, V) own-view similarities
    own = jnp.reshape(jnp.swapaxes(own, 0, 1), (m, views))  # row v·N + s: its dots with views w of s
    other_view = jnp.repeat(jnp.arange(views), n)[:, None] != jnp.arange(views)[None, :]  # (M, V)
    own_logits = jnp.where(other_view, jnp.broadcast_to(inv_t2, (m,))[:, None] * own, -jnp.inf)
    lse2 = jax.nn.logsumexp(jnp.concatenate([lse2[:, None], own_logits], axis=1), axis=1)
    pos2_dot = pos2_dot + jnp.sum(jnp.where(other_view, own, 0.0), axis=1)
    n2 = n2 + (views - 1)
  pos2 = inv_t2 * pos2_dot / jnp.maximum(n2, 1.0)
  has2 = _common.and_valid(n2 > 0, valid)
  l2 = jnp.where(has2, lse2 - pos2, 0.0)
  beta = jnp.asarray(beta, jnp.float32)
  if reduction == "none":
    return l1 + beta * l2
  return (_common.reduce_loss(l1, reduction, has1, axis_name)
          + beta * _common.reduce_loss(l2, reduction, has2, axis_name))


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
    joint = _common.compact_ids(joint * b + _common.compact_ids(row))
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


# --------------------------------------------------------------------------------------------- MLCD
@_common.keyword_only
@_common.shardable("centers", split_output=False)
def mlcd(
    features: jax.Array,
    centers: jax.Array,
    positives: jax.Array,
    *,
    scale: float | jax.Array = 32.0,
    margin: float | jax.Array = 0.0,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MLCD: multi-label classification against many cluster centres, positives and negatives apart.

  "Multi-label Cluster Discrimination for Visual Representation Learning" (An et al., ECCV 2024). Each
  image has k positive centres Ω⁺(i) (its k nearest of N cluster centres; the rest Ω⁻(i) are negatives).
  With cos_ij = <f̂_i, ĉ_j>, scale s and margin m:

      loss_i = log(1 + Σ_{j ∈ Ω⁺(i)} exp(−s (cos_ij − m))) + log(1 + Σ_{j ∈ Ω⁻(i)} exp(s cos_ij))

  Separating the two sums (instead of one softmax over all labels) is the point of the paper: no
  positive competes with another positive, and 0 acts as the decision threshold. s = 32 and m = 0 are
  our defaults (the paper's scale and margin are training hyper-parameters; its negative-centre
  sub-sampling is left to the caller, who can pass a sampled `centers`).

  The negative sum is a log-sum-exp over the centres with the k positives masked out. A set of k
  columns per row is not an id-pair mask, so it runs as this library's own row reduction: dense
  (`impl="dense"`, the B×N matrix) or tiled (`"blockwise"`, O(B·tile) memory; `"auto"` picks by size).

  Sharded centres (`axis_name`): inside `jax.shard_map` with the centres split along `axis_name`
  (device d holding global centres [d·N_local, (d+1)·N_local)) and the features replicated on it,
  `positives` hold *global* centre ids; each device reduces its own centres and the per-device sums
  are combined exactly with `lax.pmax` (the shift) and `lax.psum`:

      LSE = M + log Σ_d exp(LSE_d − M),   M = pmax_d LSE_d,

  so the result equals the single-device loss on all N centres. The centres are never gathered, for
  `impl="allgather"` and `"ring"` alike: each device reduces its own block (dense or tiled, as "auto"
  picks). On global arrays (`mesh=`, or `jax.set_mesh`) the decorator splits `centers` over the mesh
  axis and replicates the rest; the result, "none" included, is the same on every device.

  Args:
    features: (B, D) image embeddings. centers: (N, D) cluster centres (learned classifier weights in
      MLCD; the local shard under `axis_name`).
    positives: (B, k) integer ids of each row's positive centres (global ids under `axis_name`),
      distinct within a row.
    scale: s > 0. margin: m (finite).
    normalize: L2-normalise features and centres first (cosine similarities).
    reduction: "mean", "sum" or "none": the (B,) loss_i, in the order of `features`.
    mask: None or bool (B,): False marks padding rows of `features` (and of `positives`, which are then
      not checked), left out of the loss; the centres are never masked.
    impl: "auto", "dense" or "blockwise"; "allgather" | "ring" (or "auto") with `axis_name` / `mesh`.
    axis_name: the mesh axis the centres are sharded over, or None.
    mesh: the device mesh for `centers` given as a global array (see "Sharded batches" in
      `jaxcl.losses`; here the centres, not the batch, are split).
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> f, c = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> round(float(mlcd(f, c, jnp.array([[0]]), scale=1.0)), 4)  # log(1 + e^-1) + log(1 + e^0)
  1.0064
  """
  f = _checks.check_array("features", features, ndim=2)
  c = _checks.check_array("centers", centers, ndim=2)
  if f.shape[1] != c.shape[1]:
    raise ValueError(
        f"`features` and `centers` must have the same feature size, got {f.shape} and {c.shape}."
    )
  _checks.check_min_batch("features", f, 1, why="the mean needs a sample")
  _checks.check_int32("positives", positives)
  positives = jnp.asarray(positives)
  if positives.ndim != 2 or positives.shape[0] != f.shape[0]:
    raise ValueError(f"`positives` must have shape ({f.shape[0]}, k), got {positives.shape}.")
  if not jnp.issubdtype(positives.dtype, jnp.integer):
    raise TypeError(f"`positives` must have an integer dtype, got {positives.dtype}.")
  local_impls = ("auto", "dense", "blockwise")
  _checks.check_choice("impl", impl, local_impls if axis_name is None else local_impls + SHARDED_IMPLS)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, f.shape[0])
  _checks.check_positive("scale", scale)
  _checks.check_finite("margin", margin)
  n_local = c.shape[0]
  if axis_name is None:
    p = _checks.concrete_value(positives)
    kept = None if mask is None else _checks.concrete_value(mask)
    if p is not None and mask is not None:  # padding rows' positives are not used
      p = None if kept is None else p[kept]
    if p is not None and p.size and (p.min() < 0 or p.max() >= n_local):
      raise ValueError(f"`positives` must hold centre ids in [0, {n_local}), got [{p.min()}, {p.max()}].")
    offset = 0
  else:
    offset = jax.lax.axis_index(axis_name) * n_local
  s = jnp.asarray(scale, jnp.float32)
  margin = jnp.asarray(margin, jnp.float32)
  f = _common.maybe_normalize(f, normalize)
  c = _common.maybe_normalize(c, normalize)
  local = positives.astype(jnp.int32) - offset
  here = (local >= 0) & (local < n_local)  # (B, k): positives held by this shard

  # Positive sum of exp(−s(cos − m)) over the positives held here (a gather: B·k·D).
  pos_cos = jnp.einsum(
      "bd,bkd->bk", f.astype(jnp.float32), c.astype(jnp.float32)[jnp.clip(local, 0, n_local - 1)]
  )
  pos_logit = jnp.where(here, -s * (pos_cos - margin), -jnp.inf)
  pos_lse = jax.nn.logsumexp(pos_logit, axis=1)  # -inf when none is here

  def not_positive(col_ids):
    return jnp.all(local[:, :, None] != col_ids[None, None, :], axis=1)

  dense = engines.is_dense("auto" if impl in SHARDED_IMPLS else impl, f.shape[0], n_local)
  neg_lse = _tiled.row_logsumexp(f, c, s, not_positive, dense=dense)
  if axis_name is not None:
    pos_lse = _combine_lse(pos_lse, axis_name)
    neg_lse = _combine_lse(neg_lse, axis_name)
  # log(1 + Σ exp) = softplus(LSE), 0 for an empty sum (LSE = -inf).
  per_row = jax.nn.softplus(pos_lse) + jax.nn.softplus(neg_lse)
  return _common.reduce_loss(per_row, reduction, mask)  # the features are replicated over `axis_name`


def _combine_lse(lse: jax.Array, axis_name) -> jax.Array:
  """log Σ_d exp(lse_d) over the devices of `axis_name`, exact and differentiable."""
  big = jax.lax.pmax(jax.lax.stop_gradient(lse), axis_name)  # the shift: no gradient needed
  big = jnp.where(jnp.isfinite(big), big, 0.0)
  total = jax.lax.psum(jnp.exp(lse - big), axis_name)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, big + jnp.log(safe), -jnp.inf)


# --------------------------------------------------------------------------------------------- PAMC
PAMC_EPS = 1e-10  # added inside both logs, as in the released code


@_common.keyword_only
def pamc(
    features: jax.Array,
    edges: jax.Array,
    cluster_ids: jax.Array,
    *,
    num_clusters: int,
    edge_weights: jax.Array | None = None,
    scale: float | jax.Array = 1.0,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""PAMC: graph neighbours as positives, cluster meta-nodes standing in for all the negatives.

  "Efficient block contrastive learning via parameter-free meta-node approximation" (Kulatilleke,
  Portmann & Chandra, arXiv 2209.14067, 2022), the Proxy approximated meta-node Contrastive (PamC)
  loss, code github.com/gayanku/PAMC (train.py, `NcontrastCCSP`). The issue names this loss only
  "pamc"; searching code, papers and pages for it found this one contrastive loss of that name (no
  other), so this is the one implemented.

  The positives of node i are its graph neighbours (the sparse, possibly multi-hop, adjacency A of the
  caller: `edges` with `edge_weights`); its negatives, all N nodes in Graph-MLP's contrastive loss,
  are replaced by K meta-nodes, the sums m_k = Σ_{i: y_i = k} z_i of the nodes of each cluster. With
  c(a, b) the cosine similarity, set to 0 between a vector and itself, and s = `scale`:

      pos_i = Σ_j A_ij exp(s c(z_i, z_j)),      neg_k = Σ_l exp(s c(m_k, m_l))
      loss = −mean_i log(pos_i + ε) + mean_k log(neg_k + ε),      ε = 1e-10

  so the negative term costs O(K²) instead of O(N²). As in the code: `scale` multiplies the cosine
  (its `tau`, default 1.0; the README's runs use 0.25 to 1.5), the self-similarity is 0 rather than
  left out (a self-loop A_ii adds A_ii, each meta-node's own term adds 1), ε is inside both logs, and
  the cluster ids are the argmax of the caller's (detached) soft assignments q (the paper speaks of
  soft assignments; the code sums z under their one-hot argmax), while gradients flow into the
  meta-nodes through z. A cluster with no node has no meta-node here (the code's zero
  meta-node would give 0/0), and the mean runs over the non-empty clusters. With every node its own
  cluster (y = arange(N)) this is Graph-MLP's Ncontrast loss over all N nodes (tested).

  No similarity matrix is formed (edges: O(E·D); meta-nodes: K×K), so there is no `impl=`.

  Args:
    features: (N, D) node embeddings z (not normalised: the cosines normalise).
    edges: (2, E) integer [rows; cols] of A's non-zero entries (torch's `adj._indices()`), in [0, N).
    cluster_ids: (N,) integer cluster of each node, in [0, num_clusters).
    num_clusters: K, a Python int.
    edge_weights: None (all 1) or (E,) non-negative A_ij (the code's `adj._values()`: sums of powers of
      the normalised k-NN adjacency).
    scale: s, the multiplier of the cosines.
    reduction: "mean" (the loss above), "sum" or "none": the (N,) per-node
      ℓ_i = −log(pos_i + ε) + mean_k log(neg_k + ε), whose mean is the loss.
    mask: None or bool (N,); False marks padding nodes: neither anchors nor members of any meta-node,
      and their edges are dropped.
  Returns:
    Float32 loss reduced by `reduction` (a scalar, or (N,) for "none").

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two clusters: {0, 1} and {2}
  >>> e = jnp.array([[0, 1, 2], [1, 0, 2]])  # 0 and 1 are neighbours; 2 has a self-loop
  >>> round(float(pamc(z, e, jnp.array([0, 0, 1]), num_clusters=2)), 4)  # −(1 + 1 + 0) / 3 + log 2
  0.0265
  """
  z = _checks.check_array("features", features, ndim=2)
  n = z.shape[0]
  e = _checks.check_array("edges", edges, ndim=2, floating=False)
  if e.shape[0] != 2 or not jnp.issubdtype(e.dtype, jnp.integer):
    raise ValueError(f"`edges` must be an integer (2, E) array of [rows; cols], got {e.dtype} {e.shape}.")
  y = _checks.check_labels("cluster_ids", cluster_ids, n).astype(jnp.int32)
  if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
    raise ValueError(f"`num_clusters` must be a positive Python int, got {num_clusters!r}.")
  _check_within("edges", e, n)
  _check_within("cluster_ids", y, num_clusters)
  w = _edge_weights(edge_weights, e.shape[1])
  s = _checks.check_scalar("scale", scale)
  _checks.check_finite("scale", scale)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, n)
  zn = _common.l2_normalize(z).astype(jnp.float32)
  rows, cols = e[0].astype(jnp.int32), e[1].astype(jnp.int32)
  if mask is not None:
    w = w * (mask[rows] & mask[cols])
  cos = jnp.where(rows == cols, 0.0, jnp.sum(zn[rows] * zn[cols], axis=1))
  pos = jax.ops.segment_sum(w * jnp.exp(s * cos), rows, num_segments=n)
  member = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  meta = jax.ops.segment_sum(z.astype(jnp.float32) * member[:, None], y, num_segments=num_clusters)
  present = jax.ops.segment_sum(member, y, num_segments=num_clusters) > 0
  neg_term = _meta_node_term(meta, present, s)
  per_node = -jnp.log(pos + PAMC_EPS) + neg_term
  return _common.reduce_loss(per_node, reduction, mask)


def _meta_node_term(meta: jax.Array, present: jax.Array, s: jax.Array) -> jax.Array:
  """mean over the present k of log(Σ_{l present} exp(s c(m_k, m_l)) + ε), c(m_k, m_k) = 0."""
  mn = _common.l2_normalize(meta)
  cos = jnp.einsum("kd,ld->kl", mn, mn)
  cos = jnp.where(jnp.eye(meta.shape[0], dtype=bool), 0.0, cos)
  both = present[:, None] & present[None, :]
  neg = jnp.sum(jnp.where(both, jnp.exp(s * cos), 0.0), axis=1)
  logs = jnp.where(present, jnp.log(neg + PAMC_EPS), 0.0)
  return jnp.sum(logs) / jnp.maximum(jnp.sum(present), 1)


def _edge_weights(edge_weights, n_edges: int) -> jax.Array:
  if edge_weights is None:
    return jnp.ones((n_edges,), jnp.float32)
  w = _checks.check_array("edge_weights", edge_weights, ndim=1)
  if w.shape != (n_edges,):
    raise ValueError(f"`edge_weights` must have shape ({n_edges},), one per edge, got {w.shape}.")
  _checks.check_non_negative("edge_weights", edge_weights)
  return w.astype(jnp.float32)


def _check_within(name: str, ids: jax.Array, n: int) -> None:
  v = _checks.concrete_value(ids)
  if v is not None and v.size and (v.min() < 0 or v.max() >= n):
    raise ValueError(f"`{name}` must lie in [0, {n}), got values in [{v.min()}, {v.max()}].")
