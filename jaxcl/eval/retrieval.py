"""Cross-modal retrieval Recall@K (image → text and text → image)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl.eval import _common
from jaxcl.losses._common import l2_normalize


def _ranks(queries, items, query_ids, item_ids, chunk):
  """Per query: how many non-matching items are at least as similar as its best matching item.

  A query with no matching item gets the largest int32 (never a hit).
  """
  items = l2_normalize(items)

  def rank(rows):
    q, ids = rows
    s = jnp.einsum("nd,md->nm", l2_normalize(q), items, preferred_element_type=jnp.float32)
    match = ids[:, None] == item_ids[None, :]
    best = jnp.max(jnp.where(match, s, -jnp.inf), axis=1, keepdims=True)
    r = jnp.sum((s >= best) & ~match, axis=1, dtype=jnp.int32)
    return jnp.where(jnp.any(match, axis=1), r, jnp.iinfo(jnp.int32).max)

  return _common.map_chunks(rank, (queries, query_ids), chunk)


@functools.partial(jax.jit, static_argnames=("ks", "chunk"))
def _recall(image_emb, text_emb, image_ids, text_ids, *, ks, chunk):
  out = {}
  for direction, ranks in (
      ("image_to_text", _ranks(image_emb, text_emb, image_ids, text_ids, chunk)),
      ("text_to_image", _ranks(text_emb, image_emb, text_ids, image_ids, chunk)),
  ):
    for k in ks:
      out[f"{direction}_R@{k}"] = jnp.mean((ranks < k).astype(jnp.float32))
  return out


def _check_ids(name, ids, n, other_name, other_ids):
  ids = _checks.check_labels(name, ids, n)
  mine, theirs = _checks.concrete_value(ids), _checks.concrete_value(other_ids)
  if mine is not None and theirs is not None:
    missing = ~np.isin(mine, theirs)
    if missing.any():
      i = int(np.argmax(missing))
      raise ValueError(
          f"every entry of `{name}` needs a match in `{other_name}`: {name}[{i}] = {mine[i]} has none."
      )
  return ids.astype(jnp.int32)


def retrieval_recall(
    image_emb: jax.Array,
    text_emb: jax.Array,
    *,
    ks: Sequence[int] = (1, 5, 10),
    image_ids: jax.Array | None = None,
    text_ids: jax.Array | None = None,
    chunk: int = 1024,
) -> dict[str, jax.Array]:
  r"""Recall@K of cross-modal retrieval by cosine similarity, in both directions.

  The image–text retrieval protocol of "Learning Transferable Visual Models From Natural Language
  Supervision" (Radford et al., 2021) and "Deep Visual-Semantic Alignments for Generating Image
  Descriptions" (Karpathy & Fei-Fei, 2015). With P(i) the texts that match image i (same index, or
  equal ids when `image_ids`/`text_ids` are given, e.g. the 5 captions of a COCO image):

      rank_i = #{ j ∉ P(i) : s_ij >= max_{p ∈ P(i)} s_ip },   s_ij = <x̂_i, t̂_j>
      image_to_text_R@k = mean_i [ rank_i < k ]     (a hit if any match is in the top k)

  and the same with the roles of images and texts swapped. Ties count against the match (collapsed
  embeddings score R@k ≈ k / N, not 1). Queries are processed `chunk` rows at a time.

  Args:
    image_emb: (N, D). text_emb: (M, D); M = N when no ids are given.
    ks: the k values (positive ints).
    image_ids, text_ids: both None (row i matches row i) or both integer arrays (N,) and (M,); every
      image must share an id with some text and vice versa.
    chunk: query rows per step.
  Returns:
    {"image_to_text_R@k": float32 scalar, "text_to_image_R@k": ..., for each k}.

  >>> import jax.numpy as jnp
  >>> images = jnp.eye(3)
  >>> texts = jnp.array([[1.0, 0.0, 0.0], [0.1, 0.5, 1.0], [0.0, 1.0, 0.3]])  # images 1, 2: 2nd
  >>> r = retrieval_recall(images, texts, ks=(1, 2))
  >>> [round(float(r[key]), 4) for key in ("image_to_text_R@1", "image_to_text_R@2")]
  [0.3333, 1.0]
  """
  image_emb = _common.check_embeddings("image_emb", image_emb)
  text_emb = _common.check_embeddings("text_emb", text_emb)
  _common.check_same_dim("image_emb", image_emb, "text_emb", text_emb)
  if isinstance(ks, int):
    ks = (ks,)
  if not len(ks):
    raise ValueError("`ks` must be a non-empty sequence of positive ints, got ().")
  ks = tuple(_common.check_positive_int(f"ks[{i}]", k) for i, k in enumerate(ks))
  chunk = _common.check_positive_int("chunk", chunk)
  n, m = image_emb.shape[0], text_emb.shape[0]
  if (image_ids is None) != (text_ids is None):
    given = "image_ids" if text_ids is None else "text_ids"
    raise ValueError(f"`image_ids` and `text_ids` must be given together, got only `{given}`.")
  if image_ids is None:
    if n != m:
      raise ValueError(
          f"without ids, image i matches text i, so `image_emb` and `text_emb` need the same number of "
          f"rows, got {n} and {m}; pass `image_ids` and `text_ids`."
      )
    image_ids = text_ids = jnp.arange(n, dtype=jnp.int32)
  else:
    image_ids_raw = image_ids
    image_ids = _check_ids("image_ids", image_ids, n, "text_ids", text_ids)
    text_ids = _check_ids("text_ids", text_ids, m, "image_ids", image_ids_raw)
  return _recall(image_emb, text_emb, image_ids, text_ids, ks=ks, chunk=chunk)
