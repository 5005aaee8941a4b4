"""jaxcl.eval.knn: weighted kNN against a float64 NumPy brute force and sklearn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.eval import knn
from tests.helpers import blobs, randn, unit


def ref_knn(train, labels, query, num_classes, k, t):
  """Weighted kNN by brute force: (predictions, scores Σ exp(s/t), k-th/(k+1)-th similarity gap, margin)."""
  s = unit(query) @ unit(train).T
  k = min(k, train.shape[0])
  preds, scores, gaps, margins = [], [], [], []
  for row in s:
    order = np.argsort(-row, kind="stable")
    score = np.zeros(num_classes)
    for j in order[:k]:
      score[labels[j]] += np.exp(row[j] / t)
    top = np.sort(score)[::-1]
    preds.append(int(np.argmax(score)))
    scores.append(score)
    gaps.append(row[order[k - 1]] - row[order[k]] if k < len(row) else np.inf)
    margins.append((top[0] - top[1]) / top[0] if num_classes > 1 else np.inf)
  return np.array(preds), np.array(scores), np.array(gaps), np.array(margins)


@pytest.mark.parametrize(
    "n,q,d,c,k,t,chunk,train_chunk",
    [
        (40, 13, 8, 3, 5, 0.1, 1024, None),
        (60, 25, 16, 5, 10, 0.5, 7, None),
        (50, 9, 4, 4, 200, 0.07, 4, 16),  # k clipped to n
        (33, 17, 6, 2, 1, 1.0, 5, 8),
        (45, 20, 12, 6, 15, 0.2, 6, 4),  # train_chunk < k
    ],
)
def test_knn_matches_numpy_reference(n, q, d, c, k, t, chunk, train_chunk):
  train, query = randn(n, n, d), randn(q + 1, q, d)
  labels = np.random.default_rng(k).integers(0, c, n).astype(np.int32)
  want, want_scores, gaps, margins = ref_knn(train, labels, query, c, k, t)
  # Compare only queries whose neighbour set and winner are unambiguous in float32.
  clear = (gaps > 1e-5) & (margins > 1e-4)
  assert clear.mean() >= 0.8
  kw = dict(num_classes=c, k=k, temperature=t, chunk=chunk, train_chunk=train_chunk)
  pred = knn.knn_predict(train, labels, query, **kw)
  assert pred.dtype == jnp.int32 and pred.shape == (q,)
  np.testing.assert_array_equal(np.asarray(pred)[clear], want[clear])
  scores = np.asarray(knn.knn_class_scores(train, labels, query, **kw), np.float64)
  s_max = np.max(unit(query) @ unit(train).T, axis=1, keepdims=True)
  np.testing.assert_allclose(scores[clear], (want_scores * np.exp(-s_max / t))[clear], rtol=1e-4, atol=1e-6)


def test_knn_matches_sklearn_weighted_cosine_knn():
  from sklearn.neighbors import KNeighborsClassifier  # pylint: disable=g-import-not-at-top

  x, y = blobs(0, 40, 4, 8, spread=0.6)
  train_x, train_y, test_x = x[:120], y[:120], x[120:]
  k, t = 15, 0.1
  # exp(s / t) = exp(1 / t) · exp(−d / t) with cosine distance d = 1 − s: the same vote, up to a constant.
  clf = KNeighborsClassifier(
      n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda dist: np.exp(-dist / t)
  ).fit(train_x.astype(np.float64), train_y)
  want = clf.predict(test_x.astype(np.float64))
  got = np.asarray(knn.knn_predict(train_x, train_y, test_x, num_classes=4, k=k, temperature=t))
  np.testing.assert_array_equal(got, want)
  acc = float(knn.knn_accuracy(train_x, train_y, test_x, y[120:], num_classes=4, k=k, temperature=t))
  assert acc == pytest.approx(clf.score(test_x.astype(np.float64), y[120:]), abs=1e-6)
  assert 0.5 < acc < 1.0  # a non-trivial problem


def test_knn_chunked_equals_unchunked():
  train, query = randn(1, 70, 8), randn(2, 31, 8)
  labels = np.random.default_rng(3).integers(0, 5, 70).astype(np.int32)
  kw = dict(num_classes=5, k=12, temperature=0.1)
  full = knn.knn_class_scores(train, labels, query, **kw)
  for chunk, train_chunk in [(1, None), (4, 9), (10, 1), (100, 70)]:
    got = knn.knn_class_scores(train, labels, query, chunk=chunk, train_chunk=train_chunk, **kw)
    # Chunking changes float32 summation order (a few ulp); a wrong chunk join would be off by O(1).
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6, err_msg=f"{chunk}, {train_chunk}")


def test_knn_k_is_clipped_and_tiny_temperature_is_nearest_neighbour():
  train, query = randn(4, 20, 5), randn(5, 30, 5)
  labels = np.random.default_rng(6).integers(0, 3, 20).astype(np.int32)
  big = knn.knn_class_scores(train, labels, query, num_classes=3, k=10_000)
  np.testing.assert_array_equal(big, knn.knn_class_scores(train, labels, query, num_classes=3, k=20))
  # t → 0: the nearest neighbour's weight dominates; exp(s/t) would overflow float32 without rescaling.
  nearest = labels[np.argmax(unit(query) @ unit(train).T, axis=1)]
  scores = knn.knn_class_scores(train, labels, query, num_classes=3, k=10, temperature=1e-4)
  assert np.all(np.isfinite(scores))
  np.testing.assert_array_equal(np.argmax(scores, 1), nearest)


def test_knn_accuracy_on_separated_clusters_and_by_hand():
  x, y = blobs(7, 30, 5, 16, spread=0.05)
  assert float(knn.knn_accuracy(x[:100], y[:100], x[100:], y[100:], num_classes=5, k=20)) == 1.0
  train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]], np.float32)
  query = np.array([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.0], [0.9, -0.1]], np.float32)
  acc = knn.knn_accuracy(train, np.array([0, 1, 2]), query, np.array([0, 1, 1, 0]), num_classes=3, k=1)
  assert float(acc) == 0.75


def test_knn_bf16_and_jit():
  x, y = blobs(8, 30, 3, 16, spread=0.5)
  kw = dict(num_classes=3, k=10, temperature=0.1)
  hi = np.asarray(knn.knn_predict(x[:60], y[:60], x[60:], **kw))
  lo = knn.knn_predict(jnp.asarray(x[:60], jnp.bfloat16), y[:60], jnp.asarray(x[60:], jnp.bfloat16), **kw)
  assert np.mean(np.asarray(lo) == hi) >= 0.9
  scores = knn.knn_class_scores(jnp.asarray(x[:60], jnp.bfloat16), y[:60], x[60:].astype(jnp.bfloat16), **kw)
  assert scores.dtype == jnp.float32
  jitted = jax.jit(functools.partial(knn.knn_predict, **kw, chunk=7))
  np.testing.assert_array_equal(jitted(x[:60], y[:60], x[60:]), hi)


# ------------------------------------------------------------------------------------------ bad inputs
E = np.ones((6, 4), np.float32)


L = np.array([0, 1, 2, 0, 1, 2], np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: knn.knn_predict(E, L, np.ones((3, 5)), num_classes=3), r"`train_emb` and `query_emb` must have the same feature size"),
        (lambda: knn.knn_accuracy(E, L, np.ones((3, 5)), L[:3], num_classes=3), r"`train_emb` and `test_emb` must have the same feature size"),
        (lambda: knn.knn_predict(E, L[:5], E, num_classes=3), r"`train_labels` must have shape \(6,\), got \(5,\)"),
        (lambda: knn.knn_predict(E, L, E, num_classes=3, k=0), r"`k` must be a positive integer, got 0"),
        (lambda: knn.knn_predict(E, L, E, num_classes=3, k=2.5), r"`k` must be a positive integer"),
        (lambda: knn.knn_predict(E, L, E, num_classes=2), r"`train_labels` must lie in \[0, 2\).*got a label 2"),
        (lambda: knn.knn_predict(E, -L, E, num_classes=3), r"`train_labels` must lie in \[0, 3\).*got a label -2"),
        (lambda: knn.knn_predict(E, L, E, num_classes=3, temperature=0.0), r"`temperature` must be positive"),
        (lambda: knn.knn_predict(E, L, E, num_classes=3, chunk=0), r"`chunk` must be a positive integer"),
        (lambda: knn.knn_predict(E, L.astype(np.float32), E, num_classes=3), r"`train_labels` must have an integer dtype"),
        (lambda: knn.knn_predict(E[0], L, E, num_classes=3), r"`train_emb` must have rank 2"),
        (lambda: knn.knn_predict(np.ones((0, 4)), L[:0], E, num_classes=3), r"`train_emb` needs at least 1 examples"),
        (lambda: knn.knn_accuracy(E, L, E, L + 1, num_classes=3), r"`test_labels` must lie in \[0, 3\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
