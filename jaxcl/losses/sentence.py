"""Sentence-embedding objectives: SimCSE and the losses built on it (DiffCSE, miCSE, MCSE), Quick-Thoughts.

Each is a row loss over cosine (or dot-product) similarities of a batch of sentence embeddings, so the
contrastive part runs on every engine (`impl=`) and on the sharded ones (`axis_name=` / `mesh=`); the
extra terms (replaced-token detection, attention correlation, visual grounding) are per-sentence sums.

Unsupervised SimCSE is `simcse(z1, z2)` with z1, z2 the same sentences encoded twice with different
dropout masks: the same number as `infonce(z1, z2, temperature=0.05)`. CLEAR ("CLEAR: Contrastive
Learning for Sentence Representation", Wu et al., 2020; no code released) is NT-Xent (`nt_xent`) over two
augmentations of a sentence (word / span deletion, reordering, synonym substitution): a choice of views,
not a loss of its own.

| paper | function | engines |
|---|---|---|
| SimCSE: Simple Contrastive Learning of Sentence Embeddings | simcse | all, allgather, ring |
| DiffCSE: Difference-based Contrastive Learning for Sentence Embeddings | diffcse | all, allgather, ring |
| miCSE: Mutual Information Contrastive Learning for Low-shot Sentence Embeddings | micse | all, allgather, ring |
| MCSE: Multimodal Contrastive Learning of Sentence Embeddings | mcse | all, allgather, ring |
| An efficient framework for learning sentence representations (Quick-Thoughts) | quick_thoughts | all, allgather, ring |
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common

# The floor of 1 − ρ² before its log (miCSE): a perfectly correlated row gives a finite
# −½ log(1e-6) ≈ 6.9 instead of inf (the released code replaces a NaN loss by 100).
_MI_EPS = 1e-6


# --------------------------------------------------------------------------------------------- SimCSE
def _simcse_per_anchor(a, p, n, inv_t, hard_negative_weight, mask, impl, axis_name):
  """ℓ_i = −s(a_i, p_i) + log(Σ_j e^{s(a_i, p_j)} + Σ_j e^{s(a_i, n_j) + w [j = i]}) on normalised
  (B, D) batches; n may be None (no hard negatives). 0 where `mask` is False."""
  positive = inv_t * _common.rowwise_dot(a, p)
  lse = ops.logsumexp(a, p, scale=inv_t, row_valid=mask, col_valid=mask, impl=impl, axis_name=axis_name).rows
  if n is not None:
    ids = _common.batch_ids(a.shape[0], axis_name)
    others = ops.logsumexp(a, n, scale=inv_t, exclude=(ids, ids), row_valid=mask, col_valid=mask, impl=impl,
                           axis_name=axis_name).rows
    own = inv_t * _common.rowwise_dot(a, n) + hard_negative_weight
    lse = jnp.logaddexp(lse, jnp.logaddexp(others, own))
  return _common.zero_invalid(lse - positive, mask)


def _sentence_pair(name_a, a, name_b, b, normalize, axis_name):
  """Validates a row-aligned (B, D) pair whose global batch has at least two sentences."""
  return _common.pair(name_a, a, name_b, b, normalize=normalize, axis_name=axis_name,
                      why="the other sentences of the batch are the negatives")


def _hard_negatives(hard_negatives, a, normalize):
  """None, or the (B, D) hard negatives row-aligned with the anchors `a`, normalised if asked."""
  if hard_negatives is None:
    return None
  n = _checks.check_array("hard_negatives", hard_negatives, ndim=2)
  if n.shape != a.shape:
    raise ValueError(f"`hard_negatives` must have shape {a.shape} like `anchor` (one per anchor), got {n.shape}.")
  return _common.maybe_normalize(n, normalize)


@_common.keyword_only
@_common.shardable("anchor", "positive", "hard_negatives", "mask")
def simcse(
    anchor: jax.Array,
    positive: jax.Array,
    hard_negatives: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 0.05,
    hard_negative_weight: float = 0.0,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""SimCSE, unsupervised (dropout views) and supervised (entailment positives, contradiction hard negatives).

  "SimCSE: Simple Contrastive Learning of Sentence Embeddings" (Gao, Yao & Chen, EMNLP 2021). With
  s(x, y) = cos(x, y) / τ, anchors h_i, positives h_i⁺ and (supervised) hard negatives h_i⁻:

      ℓ_i = −s(h_i, h_i⁺) + log( Σ_j e^{s(h_i, h_j⁺)} + Σ_j e^{s(h_i, h_j⁻) + w·[j = i]} )
      loss = mean_i ℓ_i

  Every sentence's hard negative is a negative of every anchor; w (`hard_negative_weight`) is added to
  the logit of the anchor's own hard negative, the paper's weight α = e^w (the released code,
  princeton-nlp/SimCSE `cl_forward`, takes w, "the logit of weight", default 0; the paper's best α is 1).
  Without hard negatives the second sum is absent: unsupervised SimCSE, where h_i and h_i⁺ are the
  same sentence encoded twice with different dropout masks, is `infonce(h, h⁺, temperature=0.05)`
  (the same cross-entropy over one direction); with w = 0 this is `infonce(h, h⁺, negatives=h⁻)`.
  τ = 0.05 is the released default (`--temp`).

  Args:
    anchor: (B, D) h_i. positive: (B, D) h_i⁺ (the second dropout pass, or the entailed sentence).
    hard_negatives: None or (B, D) h_i⁻ (the contradiction of sentence i).
    temperature: τ > 0 (scalar, may be traced).
    hard_negative_weight: w, added to the logit of each anchor's own hard negative.
    normalize: L2-normalise every batch first (cosine similarities, as SimCSE).
    reduction: "mean", "sum" or "none" (the (B,) ℓ_i, 0 where masked; this device's under `axis_name`).
    mask: None or bool (B,); False marks padding sentences (anchor, positive and hard negative i),
      which are neither anchors nor negatives.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(simcse(x, x, temperature=1.0)), 4)  # log(e + 2) - 1
  0.5514
  >>> round(float(simcse(x, x, x[::-1], temperature=1.0)), 4)  # hard negatives add e + 2: log(2e + 4) - 1
  1.2446
  """
  a, p = _sentence_pair("anchor", anchor, "positive", positive, normalize, axis_name)
  n = _hard_negatives(hard_negatives, a, normalize)
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_finite("hard_negative_weight", hard_negative_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  per_anchor = _simcse_per_anchor(a, p, n, inv_t, hard_negative_weight, mask, impl, axis_name)
  return _common.reduce_loss(per_anchor, reduction, mask, axis_name)


def _sentence_terms(name: str, x, b: int):
  """A float array (B, ...) of rank 2 to 7 with one leading row per sentence."""
  x = _checks.check_array(name, x, ndim=tuple(range(2, 8)))
  if x.shape[0] != b:
    raise ValueError(f"`{name}` must have one row per sentence, leading size {b}, got shape {x.shape}.")
  return x


def _per_sentence_mean(totals, counts, mask, axis_name):
  """Per sentence, its Σ_t of terms over the mean number of counted terms per valid sentence: the mean
  over the valid sentences of the (global) batch is then the mean over every counted term (0 if none)."""
  if mask is None:
    n_sentences = jnp.asarray(_common.global_size(counts.size, axis_name), jnp.float32)
  else:
    n_sentences = _common.batch_sum(mask.astype(jnp.float32), axis_name)
  mean_count = _common.batch_sum(_common.zero_invalid(counts, mask), axis_name) / jnp.maximum(n_sentences, 1.0)
  return _common.zero_invalid(totals, mask) / jnp.maximum(mean_count, 1e-30)


# -------------------------------------------------------------------------------------------- DiffCSE
@_common.keyword_only
@_common.shardable("z1", "z2", "rtd_logits", "replaced", "token_mask", "mask")
def diffcse(
    z1: jax.Array,
    z2: jax.Array,
    rtd_logits: jax.Array,
    replaced: jax.Array,
    *,
    temperature: float | jax.Array = 0.05,
    rtd_weight: float = 0.005,
    token_mask: jax.Array | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""DiffCSE: SimCSE plus λ times a conditional replaced-token-detection loss.

  "DiffCSE: Difference-based Contrastive Learning for Sentence Embeddings" (Chuang et al., NAACL 2022).
  A generator (a small masked LM, outside this loss) replaces some tokens of each sentence; a
  discriminator conditioned on the sentence embedding predicts, per token t, whether it was replaced
  (y_t = 1). With x_t the discriminator's logit (`rtd_logits`) and m_t the counted tokens:

      L_RTD = Σ_t m_t BCE(x_t, y_t) / Σ_t m_t,   BCE(x, y) = softplus(x) − y·x
      loss  = simcse(z1, z2) + λ · L_RTD

  Defaults follow the released code (voidism/DiffCSE, `cl_forward` and `run_diffcse.sh`): τ = 0.05,
  λ = 0.005 (`--lambda_weight` of the BERT STS run; train.py's default is 0.1). The code's 2-way head
  with cross-entropy is this BCE on the logit difference x = l₁ − l₀; it averages over every position
  of both views' sequences, padding included (labelled "not replaced"): `token_mask=None`. Pass the
  attention mask as `token_mask` to count real tokens only.

  Args:
    z1, z2: (B, D) the two dropout views of each sentence (the SimCSE pair).
    rtd_logits: (B, ...) float, the discriminator's logit per token of sentence i (e.g. (B, 2, L): the
      corrupted sequences of both views, as the released code runs the discriminator on both).
    replaced: bool, the shape of `rtd_logits`: True where the generator replaced the token.
    temperature: τ > 0 of the SimCSE term. rtd_weight: λ >= 0 (λ = 0: `simcse`).
    token_mask: None (every position counts) or bool, the shape of `rtd_logits`.
    normalize, impl, axis_name, mesh: as in `simcse`.
    reduction: "mean", "sum" or "none": the (B,) ℓ_i + λ Σ_{t ∈ i} m_t BCE_t / n̄ (n̄ the mean number
      of counted tokens per sentence), whose mean is the loss.
    mask: None or bool (B,); False marks padding sentences (their tokens do not count either).
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> logits, replaced = jnp.zeros((3, 4)), jnp.zeros((3, 4), bool)
  >>> round(float(diffcse(x, x, logits, replaced, temperature=1.0, rtd_weight=1.0)), 4)  # + log 2
  1.2446
  """
  a, p = _sentence_pair("z1", z1, "z2", z2, normalize, axis_name)
  b = a.shape[0]
  x = _sentence_terms("rtd_logits", rtd_logits, b)
  y = jnp.asarray(replaced)
  if y.shape != x.shape or y.dtype != jnp.bool_:
    raise ValueError(f"`replaced` must be a boolean array of shape {x.shape} like `rtd_logits`, got "
                     f"{y.dtype} {y.shape}.")
  if token_mask is not None:
    token_mask = jnp.asarray(token_mask)
    if token_mask.shape != x.shape or token_mask.dtype != jnp.bool_:
      raise ValueError(f"`token_mask` must be None or a boolean array of shape {x.shape} like `rtd_logits`, "
                       f"got {token_mask.dtype} {token_mask.shape}.")
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_non_negative("rtd_weight", rtd_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  per_anchor = _simcse_per_anchor(a, p, None, inv_t, 0.0, mask, impl, axis_name)
  x = x.astype(jnp.float32)
  bce = jax.nn.softplus(x) - jnp.where(y, x, 0.0)
  counted = jnp.ones(x.shape, jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
  bce = jnp.where(counted > 0, bce, 0.0)
  axes = tuple(range(1, x.ndim))
  rtd = _per_sentence_mean(jnp.sum(bce, axis=axes), jnp.sum(counted, axis=axes), mask, axis_name)
  return _common.reduce_loss(per_anchor + rtd_weight * rtd, reduction, mask, axis_name)


# ---------------------------------------------------------------------------------------------- miCSE
@jax.jit  # called eagerly too: one program, not thirty
def _attention_information(attention1: jax.Array, attention2: jax.Array):
  """Per sentence (axis 0) and row (the middle axes flattened), I = −½ log max(1 − ρ², ε) with ρ the
  Pearson correlation of log a1 and log a2 over the entries (last axis) where both are > 0; and per
  sentence the number of such entries. Returns ((B, R) I, (B,) counts)."""
  rows = (attention1.shape[0], -1, attention1.shape[-1])
  a1 = jnp.reshape(attention1.astype(jnp.float32), rows)
  a2 = jnp.reshape(attention2.astype(jnp.float32), rows)
  valid = (a1 > 0) & (a2 > 0)
  count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  x = jnp.log(jnp.where(valid, a1, 1.0))
  y = jnp.log(jnp.where(valid, a2, 1.0))
  center = lambda v: jnp.where(valid, v - jnp.sum(v, axis=-1, keepdims=True) / jnp.maximum(count, 1.0), 0.0)
  x, y = center(x), center(y)
  norm = lambda v: jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v), axis=-1) + 1e-30), _MI_EPS)
  rho = jnp.sum(x * y, axis=-1) / (norm(x) * norm(y))
  information = -0.5 * jnp.log(jnp.maximum(1.0 - jnp.square(rho), _MI_EPS))
  return information, jnp.sum(count, axis=(1, 2))


@_common.keyword_only
@_common.shardable("z1", "z2", "attention1", "attention2", "mask")
def micse(
    z1: jax.Array,
    z2: jax.Array,
    attention1: jax.Array,
    attention2: jax.Array,
    *,
    temperature: float | jax.Array = 0.05,
    mi_weight: float = 0.011,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""miCSE: SimCSE plus an attention mutual-information regulariser between the two dropout views.

  "miCSE: Mutual Information Contrastive Learning for Low-shot Sentence Embeddings" (Klein & Nabi,
  ACL 2023). The attention probabilities of a sentence's two dropout passes should have the same
  structure. Per row r of attention entries (a sentence, a head, a group of layers), over the entries
  V_r where both views' probabilities are > 0, x = log a1, y = log a2 (log-normal → normal) and

      ρ_r = <x − x̄, y − ȳ>_{V_r} / (‖x − x̄‖ ‖y − ȳ‖)       (Pearson correlation)
      I_r = −½ log max(1 − ρ_r², ε)                         (the mutual information of two Gaussians)
      R   = −c · mean_r I_r,    c = (Σ_r |V_r| / Σ_r P)² + 1e-6  (the squared fraction of valid entries)
      loss = simcse(z1, z2) + λ · R

  As the released code (SAP-samples/acl2023-micse, `cl_forward`, style "miCSE"): the correlation of
  log-attentions, the Gaussian mutual information, c, and λ = 0.011 (`--task_lambda`'s default; the
  README's low-shot runs use 0.0005 to 0.001), τ = 0.05, both views differentiated. Deviations: the
  code correlates 150 entries drawn at random among V_r per row (dropping rows with fewer); here every
  entry of V_r counts (deterministic), and ε = 1e-6 keeps I finite (with no gradient where 1 − ρ² < ε)
  where the code replaces a NaN loss by 100. Norms are floored at 1e-6 (a constant row has ρ = 0), as the code's cosine similarity.

  The code's rows: attentions (2B, L, H, T, T) of layers 7..10 are rearranged
  `"(b v) (j m) h t s -> (b h m) v (j t s)"` (m = 2): for each sentence, head and parity of the layer,
  the T² entries of two layers. Pass them here as `attention1`, `attention2` of shape (B, H·2, 2·T²)
  (any (B, ..., P): the last axis holds the entries of a row, the middle axes are separate rows).

  Args:
    z1, z2: (B, D) the two dropout views of each sentence.
    attention1, attention2: (B, ..., P) attention probabilities of the two views, entry-aligned.
    temperature: τ > 0 of the SimCSE term. mi_weight: λ >= 0 (λ = 0: `simcse`).
    normalize, impl, axis_name, mesh: as in `simcse`.
    reduction: "mean", "sum" or "none": the (B,) ℓ_i + λ R_i with R_i = −c · mean of sentence i's I_r,
      whose mean is the loss.
    mask: None or bool (B,); False marks padding sentences (nor do their rows count in R and c).
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> att = jnp.array([[[0.5, 0.3, 0.2]]] * 3)  # identical views: ρ = 1, I = −½ log(1e-6)
  >>> round(float(micse(x, x, att, att, temperature=1.0, mi_weight=1.0)), 4)  # log(e + 2) - 1 - 6.9078
  -6.3563
  """
  a, p = _sentence_pair("z1", z1, "z2", z2, normalize, axis_name)
  b = a.shape[0]
  att1 = _sentence_terms("attention1", attention1, b)
  att2 = _sentence_terms("attention2", attention2, b)
  _checks.check_same_shape("attention1", att1, "attention2", att2)
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_non_negative("mi_weight", mi_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  per_anchor = _simcse_per_anchor(a, p, None, inv_t, 0.0, mask, impl, axis_name)
  information, kept = _attention_information(att1, att2)  # (B, R), (B,)
  n_entries = np.prod(att1.shape[1:])
  sentences = (jnp.asarray(_common.global_size(b, axis_name), jnp.float32) if mask is None
               else _common.batch_sum(mask.astype(jnp.float32), axis_name))
  fraction = _common.batch_sum(_common.zero_invalid(kept, mask), axis_name) / jnp.maximum(sentences * n_entries, 1.0)
  scale = jax.lax.stop_gradient(jnp.square(fraction) + 1e-6)
  regulariser = -scale * jnp.mean(information, axis=1)
  return _common.reduce_loss(per_anchor + mi_weight * _common.zero_invalid(regulariser, mask), reduction, mask,
                             axis_name)


# ----------------------------------------------------------------------------------------------- MCSE
@_common.keyword_only
@_common.shardable("z1", "z2", "grounding1", "grounding2", "image", "mask")
def mcse(
    z1: jax.Array,
    z2: jax.Array,
    grounding1: jax.Array,
    grounding2: jax.Array,
    image: jax.Array,
    *,
    temperature: float | jax.Array = 0.05,
    grounding_temperature: float | jax.Array = 0.05,
    grounding_weight: float = 0.01,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MCSE: SimCSE on the sentences plus λ times a sentence → image contrastive grounding term.

  "MCSE: Multimodal Contrastive Learning of Sentence Embeddings" (Zhang et al., NAACL 2022). Captions
  with their images: each sentence's two dropout views are projected into a grounding space (g¹_i,
  g²_i) and contrasted with the projected image features v_j of the batch (temperature τ_vl):

      L_vl = ½ [ infonce(g¹, v; τ_vl) + infonce(g², v; τ_vl) ]      (sentence → image, one direction)
      loss = simcse(z1, z2; τ) + λ · L_vl

  As the released code (uds-lsv/MCSE, `MCSE.compute_loss` and train.py): cosine similarities, one
  direction (not CLIP's symmetric loss), τ = τ_vl = 0.05, λ = 0.01 (`--lbd`). Batches of text without
  images (MCSE mixes Wikipedia sentences in) are plain `simcse`.

  Args:
    z1, z2: (B, D) the two dropout views of each caption (the SimCSE pair).
    grounding1, grounding2: (B, G) the two views projected into the grounding space.
    image: (B, G) the projected image feature of caption i's image.
    temperature: τ of the SimCSE term. grounding_temperature: τ_vl. grounding_weight: λ >= 0.
    normalize, impl, axis_name, mesh: as in `simcse` (normalize applies to every batch).
    reduction: "mean", "sum" or "none": the (B,) ℓ_i + λ ½ (ℓ¹_i + ℓ²_i), whose mean is the loss.
    mask: None or bool (B,); False marks padding pairs, which are neither anchors nor negatives.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> loss = mcse(x, x, x, x, x, temperature=1.0, grounding_temperature=1.0, grounding_weight=1.0)
  >>> round(float(loss), 4)  # twice log(e + 2) - 1
  1.1029
  """
  a, p = _sentence_pair("z1", z1, "z2", z2, normalize, axis_name)
  g1, g2 = _sentence_pair("grounding1", grounding1, "grounding2", grounding2, normalize, axis_name)
  v = _checks.check_array("image", image, ndim=2)
  _checks.check_same_shape("grounding1", g1, "image", v)
  if g1.shape[0] != a.shape[0]:
    raise ValueError(f"`grounding1` must have one row per sentence ({a.shape[0]}), got shape {g1.shape}.")
  v = _common.maybe_normalize(v, normalize)
  inv_t = _common.inverse_temperature(temperature)
  inv_t_vl = _common.inverse_temperature(grounding_temperature, "grounding_temperature")
  _checks.check_non_negative("grounding_weight", grounding_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  sentences = _simcse_per_anchor(a, p, None, inv_t, 0.0, mask, impl, axis_name)
  grounding = [_simcse_per_anchor(g, v, None, inv_t_vl, 0.0, mask, impl, axis_name) for g in (g1, g2)]
  per_anchor = sentences + grounding_weight * 0.5 * (grounding[0] + grounding[1])
  return _common.reduce_loss(per_anchor, reduction, mask, axis_name)


# --------------------------------------------------------------------------------------- Quick-Thoughts
def _with_context_rows(x: jax.Array, c: int, axis_name) -> jax.Array:
  """x (n, ...) with the c rows before and after it in the global batch: (n + 2c, ...), zeros beyond
  the batch's ends. Under `axis_name` the neighbouring devices' edge rows arrive by `ppermute`."""
  zeros = jnp.zeros((c,) + x.shape[1:], x.dtype)
  n_devices = _common.global_size(1, axis_name)
  if n_devices == 1:
    before = after = zeros
  else:
    before = jax.lax.ppermute(x[-c:], axis_name, [(d, d + 1) for d in range(n_devices - 1)])
    after = jax.lax.ppermute(x[:c], axis_name, [(d + 1, d) for d in range(n_devices - 1)])
  return jnp.concatenate([before, x, after])


@functools.partial(jax.jit, static_argnums=(3, 4))  # called eagerly too: one program, not twenty
def _neighbour_mean(f: jax.Array, g: jax.Array, valid: jax.Array, c: int, axis_name):
  """(<f_i, mean_{j ∈ C(i)} g_j>, |C(i)|) per local row i: C(i) the valid rows at i ± 1..c of the
  global batch (0 and 0 where there is none)."""
  b = f.shape[0]
  # Beyond the global batch the padded rows are 0: they are neither in C(i) nor counted.
  in_batch = _with_context_rows(valid, c, axis_name)
  rows = _with_context_rows(g, c, axis_name)
  window = lambda x, o: jax.lax.dynamic_slice_in_dim(x, c + o, b)
  offsets = [o for o in range(-c, c + 1) if o != 0]
  count = sum(window(in_batch, o) for o in offsets)
  target = sum(window(in_batch, o)[:, None] * window(rows, o).astype(jnp.float32) for o in offsets)
  return jnp.einsum("id,id->i", f.astype(jnp.float32), target) / jnp.maximum(count, 1.0), count


@_common.keyword_only
@_common.shardable("inputs", "contexts", "mask")
def quick_thoughts(
    inputs: jax.Array,
    contexts: jax.Array,
    *,
    context_size: int = 1,
    temperature: float | jax.Array = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Quick-Thoughts: classify each sentence's neighbours among the batch's sentences.

  "An efficient framework for learning sentence representations" (Logeswaran & Lee, ICLR 2018). The
  batch is consecutive sentences of a text; an input encoder f and a context encoder g embed them
  (`inputs` f_i, `contexts` g_j), and sentence i's context C(i) is the sentences within `context_size`
  c of it (i ± 1 .. c, inside the batch). With s_ij = <f_i, g_j> / τ:

      s'_ij = s_ij for j ≠ i,  s'_ii = 0
      ℓ_i = −(1/|C(i)|) Σ_{j ∈ C(i)} s_ij + log Σ_j exp s'_ij,   loss = mean_i ℓ_i

  As the released code (lajanugen/S2V, `s2v_model.build_loss`): raw dot products (`normalize=False`,
  τ = 1), the diagonal set to the logit 0 (the sentence itself stays in the softmax with e⁰ = 1) and
  uniform targets over the neighbours, c = 1 (`--context_size`).

  Engine form: the linear term is <f_i, mean_{j ∈ C(i)} g_j> (the neighbours' rows, which cross device
  edges under `axis_name` by `ppermute`), the log-sum-exp the engines' with the diagonal excluded,
  log-added to 0.

  Args:
    inputs: (B, D) f(s_i), consecutive sentences in order. contexts: (B, D) g(s_j), the same sentences.
    context_size: c >= 1; under `axis_name`, at most the per-device batch size.
    temperature: τ > 0 (the released code: 1). normalize: L2-normalise both first (the code does not).
    reduction: "mean", "sum" or "none" (the (B,) ℓ_i; this device's under `axis_name`).
    mask: None or bool (B,); False marks padding sentences: neither anchors, targets nor candidates
      (neighbours are by position, so pad at the ends of a text). A sentence with no valid neighbour is
      not an anchor.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> round(float(quick_thoughts(x, x)), 4)  # every s_ij with j ≠ i is 0: log 3
  1.0986
  """
  f, g = _common.pair("inputs", inputs, "contexts", contexts, normalize=normalize, axis_name=axis_name,
                      why="a sentence needs a neighbour")
  if isinstance(context_size, bool) or not isinstance(context_size, (int, np.integer)) or context_size < 1:
    raise ValueError(f"`context_size` must be an integer >= 1, got {context_size!r}.")
  b = f.shape[0]
  if axis_name is not None and context_size > b:
    raise ValueError(f"`context_size` must be at most the per-device batch size {b} under `axis_name`, got "
                     f"{context_size}.")
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  c = int(context_size)
  valid = jnp.ones((b,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  neighbours, count = _neighbour_mean(f, g, valid, c, axis_name)
  positive = inv_t * neighbours
  anchor = count > 0 if mask is None else mask & (count > 0)
  ids = _common.batch_ids(b, axis_name)
  lse = ops.logsumexp(f, g, scale=inv_t, exclude=(ids, ids), row_valid=anchor, col_valid=mask, impl=impl,
                      axis_name=axis_name).rows
  per_anchor = _common.zero_invalid(jnp.logaddexp(_common.zero_invalid(lse, anchor), 0.0) - positive, anchor)
  return _common.reduce_loss(per_anchor, reduction, anchor, axis_name)
