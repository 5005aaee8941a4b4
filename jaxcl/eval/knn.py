"""Weighted k-nearest-neighbour classification of embeddings (the SimCLR/MoCo kNN monitor)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.eval import _common
from jaxcl.losses._common import l2_normalize


def _top_k_neighbours(q, train, k, train_chunk):
  """(values, indices) of the k largest cosine similarities of each row of q, both (m, k).

  With `train_chunk`, the training set is streamed in blocks with a running top-k merge, so the
  similarity block is (m, train_chunk) instead of (m, N).
  """
  n = train.shape[0]
  if train_chunk is None or train_chunk >= n:
    s = jnp.einsum("md,nd->mn", q, train, preferred_element_type=jnp.float32)
    return jax.lax.top_k(s, k)
  c = train_chunk
  n_blocks = -(-n // c)
  padded = jnp.pad(train, [(0, n_blocks * c - n), (0, 0)])
  blocks = padded.reshape(n_blocks, c, train.shape[1])
  starts = jnp.arange(n_blocks, dtype=jnp.int32) * c

  def merge(carry, block_and_start):
    vals, idx = carry
    block, start = block_and_start
    s = jnp.einsum("md,cd->mc", q, block, preferred_element_type=jnp.float32)
    col = start + jnp.arange(c, dtype=jnp.int32)
    s = jnp.where(col < n, s, -jnp.inf)
    # The running best come first, so ties keep the lower training index, as a single top_k does.
    cand_v = jnp.concatenate([vals, s], axis=1)
    cand_i = jnp.concatenate([idx, jnp.broadcast_to(col, s.shape)], axis=1)
    vals, pos = jax.lax.top_k(cand_v, k)
    return (vals, jnp.take_along_axis(cand_i, pos, axis=1)), None

  m = q.shape[0]
  init = (jnp.full((m, k), -jnp.inf, jnp.float32), jnp.zeros((m, k), jnp.int32))
  (vals, idx), _ = jax.lax.scan(merge, init, (blocks, starts))
  return vals, idx


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk", "train_chunk"))
def _knn_scores(train, labels, query, inv_t, *, num_classes, k, chunk, train_chunk):
  train = l2_normalize(train)

  def scores(q):
    vals, idx = _top_k_neighbours(l2_normalize(q), train, k, train_chunk)
    # exp(s / t) up to the per-query factor exp(s_max / t): the same argmax, and no overflow at small t.
    w = jnp.exp((vals - vals[:, :1]) * inv_t)
    nb = labels[idx]
    return jax.vmap(lambda ys, ws: jnp.zeros((num_classes,), jnp.float32).at[ys].add(ws))(nb, w)

  return _common.map_chunks(scores, query, chunk)


def _scores(
    train_emb, train_labels, query_emb, query_name, num_classes, k, temperature, chunk, train_chunk
):
  """Validates the arguments (naming the query argument `query_name`) and computes the class scores."""
  train_emb = _common.check_embeddings("train_emb", train_emb)
  query_emb = _common.check_embeddings(query_name, query_emb)
  _common.check_same_dim("train_emb", train_emb, query_name, query_emb)
  num_classes = _common.check_positive_int("num_classes", num_classes)
  n = train_emb.shape[0]
  train_labels = _common.check_class_labels("train_labels", train_labels, n, num_classes)
  k = min(_common.check_positive_int("k", k), n)
  _checks.check_positive("temperature", temperature)
  chunk = _common.check_positive_int("chunk", chunk)
  if train_chunk is not None:
    train_chunk = _common.check_positive_int("train_chunk", train_chunk)
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  return _knn_scores(
      train_emb, train_labels, query_emb, inv_t,
      num_classes=num_classes, k=k, chunk=chunk, train_chunk=train_chunk,
  )


def knn_class_scores(
    train_emb: jax.Array,
    train_labels: jax.Array,
    query_emb: jax.Array,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
    train_chunk: int | None = None,
) -> jax.Array:
  r"""Weighted kNN class scores, (Q, num_classes) float32, each row scaled by exp(−s_max / t).

  "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (Wu et al., 2018), with
  s_(1) >= s_(2) >= ... the cosine similarities of the k nearest training examples:

      score_c(q) = Σ_{j <= k, y_(j) = c} exp((s_(j) − s_(1)) / t)

  the score of `knn_predict` divided by the largest weight exp(s_(1) / t), so the best neighbour
  weighs 1 and nothing overflows at small t; the ranking of the classes is unchanged. Useful for top-5
  accuracy. Arguments as in `knn_predict`.

  >>> import jax.numpy as jnp
  >>> train = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
  >>> s = knn_class_scores(train, jnp.array([0, 1, 1]), jnp.array([[1.0, 0.0]]), num_classes=2, k=2,
  ...                      temperature=1.0)
  >>> [round(float(v), 4) for v in s[0]]  # class 0: exp(0); class 1: exp(0.8 - 1)
  [1.0, 0.8187]
  """
  return _scores(
      train_emb, train_labels, query_emb, "query_emb", num_classes, k, temperature, chunk, train_chunk
  )


def knn_predict(
    train_emb: jax.Array,
    train_labels: jax.Array,
    query_emb: jax.Array,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
    train_chunk: int | None = None,
) -> jax.Array:
  r"""Weighted kNN prediction: the class with the largest sum of exp(similarity / t) over the k nearest.

  "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (Wu et al., CVPR 2018),
  the kNN monitor of SimCLR/MoCo evaluation. With ẑ = z / ‖z‖ and N_k(q) the k training examples of
  largest cosine similarity s_j = <q̂, ẑ_j>:

      score_c(q) = Σ_{j ∈ N_k(q), y_j = c} exp(s_j / t),      prediction = argmax_c score_c(q)

  k is clipped to the number of training examples. Ties between classes go to the lower class index.
  Queries are processed `chunk` rows at a time, so at most (chunk, N) similarities exist at once
  ((chunk, train_chunk + k) with `train_chunk`, which streams the training set with a running top-k).

  Args:
    train_emb: (N, D) training embeddings. train_labels: (N,) integers in [0, num_classes).
    query_emb: (Q, D) embeddings to classify.
    num_classes: number of classes C. k: neighbours (>= 1). temperature: t > 0.
    chunk: query rows per step. train_chunk: None (all N at once) or training rows per step.
  Returns:
    (Q,) int32 predicted classes.

  >>> import jax.numpy as jnp
  >>> train = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
  >>> knn_predict(train, jnp.array([0, 0, 1]), jnp.array([[0.2, 1.0], [1.0, 0.3]]), num_classes=2, k=1)
  Array([1, 0], dtype=int32)
  """
  scores = _scores(
      train_emb, train_labels, query_emb, "query_emb", num_classes, k, temperature, chunk, train_chunk
  )
  return jnp.argmax(scores, axis=1).astype(jnp.int32)


def knn_accuracy(
    train_emb: jax.Array,
    train_labels: jax.Array,
    test_emb: jax.Array,
    test_labels: jax.Array,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
    train_chunk: int | None = None,
) -> jax.Array:
  r"""Fraction of `test_emb` whose weighted-kNN prediction (`knn_predict`) equals `test_labels`.

  "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (Wu et al., 2018):

      accuracy = mean_i [ argmax_c Σ_{j ∈ N_k(x_i), y_j = c} exp(<x̂_i, ẑ_j> / t) = y_i ]

  Returns a float32 scalar in [0, 1].

  >>> import jax.numpy as jnp
  >>> train = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> float(knn_accuracy(train, jnp.array([0, 1]), train, jnp.array([0, 0]), num_classes=2, k=1))
  0.5
  """
  test_emb = _common.check_embeddings("test_emb", test_emb)
  num_classes = _common.check_positive_int("num_classes", num_classes)
  test_labels = _common.check_class_labels("test_labels", test_labels, test_emb.shape[0], num_classes)
  scores = _scores(
      train_emb, train_labels, test_emb, "test_emb", num_classes, k, temperature, chunk, train_chunk
  )
  pred = jnp.argmax(scores, axis=1)
  return jnp.mean((pred == test_labels).astype(jnp.float32))
