"""FILIP: token-wise late interaction between image patches and text tokens.

The (B, B, T_img, T_txt) tensor of all token similarities across the batch is never built outside the
`dense` reference engine: the `blockwise` engine scans over blocks of `tile` texts, each step computing
the (B, tile, T_img, T_txt) token similarities of every image against the block's texts under
`jax.checkpoint` (recomputed in the backward pass instead of stored), so peak memory is
O(B · tile · T_img · T_txt).

On a batch split over devices (`axis_name=` / `mesh=` with `impl="allgather" | "ring"`) each device
gathers the image and text tokens of the global batch (both engines: the token-wise max needs every
pair of samples) and computes its own images' rows and its own texts' columns on the local engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl.ops import engines
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.losses import _common

_TILE_ELEMENTS = 1 << 24  # default block: about 64 MiB of float32 token similarities per step


def _check_tokens(name: str, x, mask_name: str, mask, samples=None):
  """(B, T, D) tokens and their (B, T) validity; every row whose sample is valid (`samples`: None, or a
  concrete bool (B,)) needs a valid token."""
  x = _checks.check_array(name, x, ndim=3)
  if mask is None:
    return x, jnp.ones(x.shape[:2], bool)
  mask = jnp.asarray(mask)
  if mask.shape != x.shape[:2]:
    raise ValueError(f"`{mask_name}` must have shape {x.shape[:2]} like `{name}`'s (B, T), got {mask.shape}.")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"`{mask_name}` must be a boolean array, got dtype {mask.dtype}.")
  m = _checks.concrete_value(mask)
  has_token = None if m is None else m.any(axis=1) | (False if samples is None else ~samples)
  if m is not None and not np.all(has_token):
    row = int(np.argmin(has_token))
    raise ValueError(f"every row of `{mask_name}` needs at least one valid token; row {row} has none.")
  return x, mask


def _inputs(image_tokens, text_tokens, image_mask, text_mask, normalize, samples=None):
  x, xm = _check_tokens("image_tokens", image_tokens, "image_mask", image_mask, samples)
  y, ym = _check_tokens("text_tokens", text_tokens, "text_mask", text_mask, samples)
  if x.shape[2] != y.shape[2]:
    raise ValueError(
        f"`image_tokens` and `text_tokens` must have the same feature size, got {x.shape} and {y.shape}."
    )
  return _common.maybe_normalize(x, normalize), xm, _common.maybe_normalize(y, normalize), ym


def _masked_mean_of_max(s, max_axis, max_mask, mean_axis, mean_mask):
  """mean over `mean_axis` (valid entries) of the max over `max_axis` (valid entries) of s."""
  m = jnp.max(jnp.where(max_mask, s, -jnp.inf), axis=max_axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # an all-padding block column: discarded by the caller
  mean_mask = jnp.squeeze(mean_mask, axis=max_axis)
  count = jnp.maximum(jnp.sum(mean_mask, axis=mean_axis), 1)
  return jnp.sum(jnp.where(mean_mask, m, 0.0), axis=mean_axis) / count


def _pair_scores(x, xm, y, ym):
  """FILIP's two token-wise scores for every image i (rows of x) and text j (rows of y).

  i2t[i, j] = mean_k max_r <x_ik, y_jr>,   t2i[i, j] = mean_r max_k <x_ik, y_jr>, float32 (Bx, By).
  """
  s = jnp.einsum("ikd,jrd->ijkr", x, y, preferred_element_type=jnp.float32)
  xm4 = xm[:, None, :, None]
  ym4 = ym[None, :, None, :]
  i2t = _masked_mean_of_max(s, 3, ym4, 2, xm4)
  t2i = _masked_mean_of_max(s, 2, xm4, 2, ym4)
  return i2t, t2i


def _diagonal_scores(x, xm, y, ym):
  """The positives i2t[i, i] and t2i[i, i] from the per-sample (T_img, T_txt) similarities only."""
  one = lambda a, am, b, bm: tuple(v[0, 0] for v in _pair_scores(a[None], am[None], b[None], bm[None]))
  return jax.vmap(one)(x, xm, y, ym)


def _tile(tile, b, t_img, t_txt) -> int:
  if tile is None:
    return max(1, min(b, _TILE_ELEMENTS // max(1, b * t_img * t_txt)))
  if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
    raise ValueError(f"`tile` must be a positive int or None, got {tile!r}.")
  return min(tile, b)


def _blocks(y, ym, tile):
  """Texts padded to a multiple of `tile` and split into blocks, plus the validity of each column."""
  b = y.shape[0]
  n = -(-b // tile)
  pad = n * tile - b
  y = jnp.pad(y, [(0, pad), (0, 0), (0, 0)]).reshape((n, tile) + y.shape[1:])
  ym = jnp.pad(ym, [(0, pad), (0, 0)], constant_values=True).reshape((n, tile) + ym.shape[1:])
  valid = (jnp.arange(n * tile) < b).reshape(n, tile)
  return y, ym, valid


@_common.keyword_only
def filip_similarity(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    *,
    image_mask: jax.Array | None = None,
    text_mask: jax.Array | None = None,
    normalize: bool = True,
    tile: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""FILIP's token-wise similarities of every image with every text: (i2t, t2i), each (Bi, Bt).

  "FILIP: Fine-grained Interactive Language-Image Pre-Training" (Yao et al., ICLR 2022), eqs. (4)-(5):
  with image tokens x_i = (x_ik)_k and text tokens y_j = (y_jr)_r,

      i2t[i, j] = (1/n_i) Σ_k max_r <x_ik, y_jr>        (each image token to its best text token)
      t2i[i, j] = (1/m_j) Σ_r max_k <x_ik, y_jr>        (each text token to its best image token)

  over the valid tokens of each (padding masked out; n_i, m_j the numbers of valid tokens). Texts are
  processed `tile` at a time (`lax.map`), so no (Bi, Bt, T_img, T_txt) tensor is formed; the outputs
  are (Bi, Bt) — use them for retrieval; the loss `filip` never forms them.

  Args:
    image_tokens: (Bi, T_img, D). text_tokens: (Bt, T_txt, D).
    image_mask, text_mask: boolean (B, T) validity (True = a real token), or None for all valid.
    normalize: L2-normalise every token first (FILIP's setting).
    tile: texts per block; None picks about 2^24 token similarities per block.
  Returns:
    (i2t, t2i), float32 (Bi, Bt) each.

  >>> import jax.numpy as jnp
  >>> image = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # two tokens
  >>> text = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])   # both tokens match image token 0 only
  >>> i2t, t2i = filip_similarity(image, text)
  >>> float(i2t[0, 0]), float(t2i[0, 0])  # image: (1 + 0) / 2; text: (1 + 1) / 2
  (0.5, 1.0)
  """
  x, xm, y, ym = _inputs(image_tokens, text_tokens, image_mask, text_mask, normalize)
  bt = y.shape[0]
  tile = _tile(tile, x.shape[0], x.shape[1], y.shape[1])
  yb, ymb, _ = _blocks(y, ym, tile)
  i2t, t2i = jax.lax.map(lambda blk: _pair_scores(x, xm, *blk), (yb, ymb))
  to_matrix = lambda s: jnp.moveaxis(s, 0, 1).reshape(x.shape[0], -1)[:, :bt]
  return to_matrix(i2t), to_matrix(t2i)


def _resolve(impl: str, n_img: int, n_txt: int, t_img: int, t_txt: int) -> str:
  _checks.check_choice("impl", impl, ("auto", "dense", "blockwise"))
  if impl != "auto":
    return impl
  return "dense" if engines.is_dense(impl, n_img * t_img, n_txt * t_txt) else "blockwise"


def _same_validity(x_samples, y_samples):
  """The pairs (i, j) that enter the log-sum-exps: both real samples, or both padding (a padding row's
  terms stay finite, and are dropped by the reduction)."""
  return x_samples[:, None] == y_samples[None, :]


@jax.checkpoint
def _filip_step(x, xm, x_samples, y_blk, ym_blk, y_samples, valid, inv_t):
  """One block of texts: the block's part of each image row's log-sum-exp, and its columns' LSEs."""
  i2t, t2i = _pair_scores(x, xm, y_blk, ym_blk)
  keep = _same_validity(x_samples, y_samples)
  rows = jax.nn.logsumexp(jnp.where(keep & valid[None, :], inv_t * i2t, -jnp.inf), axis=1)
  cols = jax.nn.logsumexp(jnp.where(keep, inv_t * t2i, -jnp.inf), axis=0)
  return rows, cols


def _filip_lse_blockwise(x, xm, x_samples, y, ym, y_samples, inv_t, tile):
  b = y.shape[0]
  yb, ymb, valid = _blocks(y, ym, tile)
  n_blocks = yb.shape[0]
  yv = jnp.pad(y_samples, (0, n_blocks * tile - b), constant_values=True).reshape(n_blocks, tile)

  def step(acc, blk):
    y_blk, ym_blk, y_blk_samples, valid_blk = blk
    rows, cols = _filip_step(x, xm, x_samples, y_blk, ym_blk, y_blk_samples, valid_blk, inv_t)
    return jnp.logaddexp(acc, rows), cols

  init = jnp.full_like(x[:, 0, 0], -jnp.inf, dtype=jnp.float32)  # device-varying like x inside shard_map
  rows, cols = jax.lax.scan(step, init, (yb, ymb, yv, valid))
  return rows, cols.reshape(-1)[:b]


def _filip_lse(x, xm, x_samples, y, ym, y_samples, scale, impl, tile):
  """Each image's (row of x) log-sum-exp of s·i2t over the texts y and each text's of s·t2i over the
  images x, on the "dense" or "blockwise" engine; pairs enter when both samples are valid (or both
  padding)."""
  if impl == "dense":
    i2t, t2i = _pair_scores(x, xm, y, ym)
    keep = _same_validity(x_samples, y_samples)
    rows = jax.nn.logsumexp(jnp.where(keep, scale * i2t, -jnp.inf), axis=1)
    cols = jax.nn.logsumexp(jnp.where(keep, scale * t2i, -jnp.inf), axis=0)
    return rows, cols
  tile = min(_tile(tile, x.shape[0], x.shape[1], y.shape[1]), y.shape[0])
  return _filip_lse_blockwise(x, xm, x_samples, y, ym, y_samples, scale, tile)


@_common.keyword_only
@_common.shardable("image_tokens", "text_tokens", "image_mask", "text_mask", "mask")
def filip(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    *,
    logit_scale: float | jax.Array = 1 / 0.07,
    image_mask: jax.Array | None = None,
    text_mask: jax.Array | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
    tile: int | None = None,
) -> jax.Array:
  r"""FILIP: symmetric contrastive loss on token-wise late-interaction similarities.

  "FILIP: Fine-grained Interactive Language-Image Pre-Training" (Yao et al., ICLR 2022). With the
  token-wise scores of `filip_similarity` and s = logit_scale (CLIP's initialisation 1/0.07; FILIP
  learns it):

      L_I = mean_i [ −s·i2t[i, i] + log Σ_j exp(s·i2t[i, j]) ]     (image i against every text j)
      L_T = mean_j [ −s·t2i[j, j] + log Σ_i exp(s·t2i[i, j]) ]     (text j against every image i)
      loss = ½ (L_I + L_T)

  Each direction uses its own token-wise score, as in the paper. Padding tokens (mask False) are left
  out of both the max and the mean (FILIP also drops padding). With one token per image and per text
  both scores are the cosine similarity and the loss is `clip`.

  Engines: `dense` builds the (B, B, T_img, T_txt) token similarities (the reference); `blockwise`
  scans over blocks of `tile` texts under `jax.checkpoint`, accumulating each image row's
  log-sum-exp online and finishing each text column's inside its block, so neither the
  (B, B, T_img, T_txt) tensor nor the B×B score matrices are formed: memory O(B · tile · T_img · T_txt)
  in the forward and backward passes. The positives come from the B per-sample (T_img, T_txt) blocks.
  "auto" is dense while B²·T_img·T_txt <= 4096², else blockwise. There is no fused `pallas` kernel.
  Over devices ("allgather" | "ring" with `axis_name` / `mesh`; the ring gathers the tokens too: the
  token-wise max needs every pair of samples) each device gathers the global batch's tokens and
  computes its images' rows and its texts' columns on the local engine ("auto" on the local block).

  Args:
    image_tokens: (B, T_img, D) patch embeddings. text_tokens: (B, T_txt, D) token embeddings, B >= 2.
    logit_scale: > 0, may be traced.
    image_mask, text_mask: boolean (B, T) validity, or None (all tokens valid).
    normalize: L2-normalise every token first.
    reduction: "mean", "sum" or "none": the (2B,) per-anchor terms, the B images i of L_I, then the B
      texts j of L_T, whose mean is the loss (this device's images, then its texts, under `axis_name`).
    mask: None or bool (B,): False marks padding pairs (sample mask, unlike the token masks above),
      which are neither anchors nor negatives; their token masks are not checked.
    impl: "dense", "blockwise" or "auto"; "allgather" | "ring" with `axis_name` / `mesh`: the batch
      (tokens, token masks, mask) split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
    tile: texts per block (blockwise), None = automatic.
  Returns:
    Scalar float32, or (2B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)[:, None, :]  # one token each: FILIP is CLIP
  >>> round(float(filip(x, x, logit_scale=1.0)), 4)  # log(e + 1) - 1
  0.3133
  """
  n_pairs = _checks.check_array("image_tokens", image_tokens, ndim=3).shape[0]
  _common.check_reduction(reduction)
  if axis_name is not None:
    _checks.check_choice("impl", impl, ("auto",) + SHARDED_IMPLS)
  mask = _common.sample_mask(mask, n_pairs)
  samples = None if mask is None else _checks.concrete_value(mask)
  x, xm, y, ym = _inputs(image_tokens, text_tokens, image_mask, text_mask, normalize, samples)
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"`image_tokens` and `text_tokens` must hold the same number of pairs, got {x.shape[0]} and "
        f"{y.shape[0]}."
    )
  _common.check_global_batch("image_tokens", x, 2, axis_name, why="a contrastive loss needs a negative")
  scale = _common.logit_scale(logit_scale)
  b, t_img, t_txt = x.shape[0], x.shape[1], y.shape[1]
  n_all = _common.global_size(b, axis_name)
  # The local engine: for the (b, B) block of pairs (the whole batch on one device).
  impl = _resolve("auto" if axis_name is not None else impl, b, n_all, t_img, t_txt)
  _tile(tile, b, t_img, t_txt)  # checked before any compute; each block of pairs sizes its own
  pos_i2t, pos_t2i = _diagonal_scores(x, xm, y, ym)
  valid = jnp.ones((b,), bool) if mask is None else mask
  if axis_name is None:
    rows, cols = _filip_lse(x, xm, valid, y, ym, valid, scale, impl, tile)
  else:  # every sample's tokens: this device's images against all texts, all images against its texts
    gather = lambda v: _common.gather_batch(v, axis_name)  # noqa: E731
    rows, _ = _filip_lse(x, xm, valid, gather(y), gather(ym), gather(valid), scale, impl, tile)
    _, cols = _filip_lse(gather(x), gather(xm), gather(valid), y, ym, valid, scale, impl, tile)
  per_anchor = jnp.concatenate([rows - scale * pos_i2t, cols - scale * pos_t2i])
  valid_anchors = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(per_anchor, reduction, valid_anchors, axis_name)
