"""jaxcl.eval: kNN, linear probe, zero-shot, retrieval and geometry against float64 NumPy and sklearn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import eval as ev
from jaxcl.eval import geometry, knn, linear_probe, retrieval, zero_shot
from tests.helpers import randn


# ------------------------------------------------------------------ float64 NumPy references (no jaxcl)
def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def ref_knn(train, labels, query, num_classes, k, t):
  """Weighted kNN by brute force: (predictions, scores Σ exp(s/t), k-th/(k+1)-th similarity gap, margin)."""
  s = _unit(query) @ _unit(train).T
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


def ref_recall(image, text, ks, image_ids=None, text_ids=None):
  """R@k by sorting every row: a hit if some match is among the first k of the descending order."""
  n, m = len(image), len(text)
  image_ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
  text_ids = np.arange(m) if text_ids is None else np.asarray(text_ids)
  s = _unit(image) @ _unit(text).T
  out = {}
  for name, sim, q_ids, i_ids in (
      ("image_to_text", s, image_ids, text_ids),
      ("text_to_image", s.T, text_ids, image_ids),
  ):
    for k in ks:
      hits = [np.any(q_ids[i] == i_ids[np.argsort(-row, kind="stable")[:k]]) for i, row in enumerate(sim)]
      out[f"{name}_R@{k}"] = float(np.mean(hits))
  return out


def ref_uniformity(z, t):
  """log of the mean over pairs i < j of exp(−t ‖z_i − z_j‖²), like torch.pdist in Wang & Isola's code."""
  z = _unit(z)
  vals = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(len(z)) for j in range(i + 1, len(z))]
  return np.log(np.mean(vals))


def ref_effective_rank(x):
  sigma = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  p = sigma / sigma.sum()
  p = p[p > 0]
  return np.exp(-np.sum(p * np.log(p)))


def blobs(seed, n_per_class, num_classes, d, spread):
  """Gaussian clusters around random unit centres; returns (x, y) shuffled."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.standard_normal((num_classes, d)))
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = centres[y] + spread * rng.standard_normal((len(y), d))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm].astype(np.int32)


# ------------------------------------------------------------------------------------------------- kNN
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
  s_max = np.max(_unit(query) @ _unit(train).T, axis=1, keepdims=True)
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
  nearest = labels[np.argmax(_unit(query) @ _unit(train).T, axis=1)]
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


# ---------------------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_data_is_perfect():
  x, y = blobs(9, 30, 4, 12, spread=0.05)
  test_acc, train_acc = linear_probe.linear_probe_accuracy(
      x[:80], y[:80], x[80:], y[80:], num_classes=4, return_train_accuracy=True
  )
  assert float(test_acc) == 1.0 and float(train_acc) == 1.0


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(0).permutation(len(y))
  x, y = x[perm].astype(np.float32), y[perm].astype(np.int32)
  return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.mark.parametrize("l2", [1e-4, 1e-2])
def test_linear_probe_matches_sklearn_logistic_regression_on_digits(digits, l2):
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  train_x, train_y, test_x, test_y = digits
  scaler = StandardScaler().fit(train_x.astype(np.float64))
  z_train, z_test = scaler.transform(train_x), scaler.transform(test_x)
  clf = LogisticRegression(C=1.0 / (l2 * len(train_y)), max_iter=10_000, tol=1e-10).fit(z_train, train_y)
  probe = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10, l2=l2)
  got = np.asarray(probe.predict(test_x))
  want = clf.predict(z_test)
  assert abs(np.mean(got == test_y) - np.mean(want == test_y)) <= 0.03
  assert np.mean(got == want) >= 0.98
  assert np.mean(got == test_y) > 0.9

  # Same objective (mean cross-entropy + l2/2 ‖W‖², bias free) evaluated in float64 at both solutions.
  def objective(w, b):
    logits = z_train @ w + b
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return np.mean(lse - logits[np.arange(len(train_y)), train_y]) + 0.5 * l2 * np.sum(w * w)

  np.testing.assert_allclose(np.asarray(probe.mean), scaler.mean_, rtol=1e-5, atol=1e-5)
  ours = objective(np.asarray(probe.weights, np.float64), np.asarray(probe.bias, np.float64))
  theirs = objective(clf.coef_.T, clf.intercept_)
  assert ours <= theirs * (1 + 1e-4) + 1e-6


def test_linear_probe_is_deterministic_and_adam_agrees(digits):
  train_x, train_y, test_x, test_y = digits
  a = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10)
  b = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  # Blank pixels have zero variance: their scale is 1, not 0 (no NaN).
  blank = train_x.std(0) == 0
  assert blank.any() and np.all(np.asarray(a.scale)[blank] == 1.0) and np.all(np.isfinite(a.weights))
  lbfgs = float(linear_probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10))
  adam = float(linear_probe.linear_probe_accuracy(
      train_x, train_y, test_x, test_y, num_classes=10, optimizer="adam", steps=300, learning_rate=0.01
  ))
  assert abs(lbfgs - adam) <= 0.05


def test_linear_probe_bf16_features():
  x, y = blobs(10, 30, 4, 12, spread=0.3)
  lo = linear_probe.linear_probe_accuracy(
      jnp.asarray(x[:80], jnp.bfloat16), y[:80], jnp.asarray(x[80:], jnp.bfloat16), y[80:], num_classes=4
  )
  hi = linear_probe.linear_probe_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4)
  assert lo.dtype == jnp.float32 and abs(float(lo) - float(hi)) <= 0.05


# ------------------------------------------------------------------------------------------- zero-shot
class FakeTextEncoder:
  """A fixed random embedding per prompt string; records the calls."""

  def __init__(self, dim=6):
    self.dim, self.table, self.calls = dim, {}, []

  def vector(self, text):
    if text not in self.table:
      self.table[text] = np.random.default_rng(len(self.table)).standard_normal(self.dim)
    return self.table[text]

  def __call__(self, texts):
    self.calls.append(list(texts))
    return jnp.asarray(np.stack([self.vector(t) for t in texts]), jnp.float32)


def test_class_embeddings_is_clip_prompt_ensembling():
  enc = FakeTextEncoder()
  names = ["cat", "dog", "car"]
  templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}", "{} in the wild"]
  got = zero_shot.class_embeddings(enc, names, templates)
  assert got.shape == (3, 6) and got.dtype == jnp.float32
  assert enc.calls[1] == ["a photo of a dog.", "a drawing of a dog", "dog in the wild"]
  for c, name in enumerate(names):
    prompts = [f"a photo of a {name}.", f"a drawing of a {name}", f"{name} in the wild"]
    want = _unit(np.mean(_unit(np.stack([enc.table[p] for p in prompts])), axis=0)[None])[0]
    np.testing.assert_allclose(got[c], want, rtol=1e-5, atol=1e-6)
  # One template: the normalised embedding of the bare name.
  single = zero_shot.class_embeddings(enc, ["cat"])
  np.testing.assert_allclose(single[0], _unit(enc.table["cat"][None])[0], rtol=1e-5, atol=1e-6)


def test_zero_shot_accuracy_on_constructed_embeddings():
  rng = np.random.default_rng(11)
  classes = _unit(rng.standard_normal((5, 16)))
  labels = rng.integers(0, 5, 64).astype(np.int32)
  images = (classes[labels] + 0.35 * rng.standard_normal((64, 16))).astype(np.float32)
  s = _unit(images) @ classes.T
  order = np.argsort(-s, axis=1)
  for k in (1, 2, 5):
    want = np.mean([labels[i] in order[i, :k] for i in range(64)])
    got = zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels, top_k=k)
    assert float(got) == pytest.approx(want, abs=1e-6), k
    chunked = zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels, top_k=k, chunk=5)
    assert float(chunked) == float(got)
  top1 = float(zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels))
  assert 0.5 < top1 < 1.0
  np.testing.assert_allclose(zero_shot.zero_shot_logits(images, classes.astype(np.float32)), s, atol=1e-5)
  # Collapsed embeddings (all scores tied) are not counted as correct.
  assert float(zero_shot.zero_shot_accuracy(np.ones((4, 3)), np.ones((3, 3)), np.array([0, 1, 2, 0]))) == 0.0
  # bf16 images: same accuracy up to a few borderline rows.
  lo = zero_shot.zero_shot_accuracy(jnp.asarray(images, jnp.bfloat16), classes.astype(np.float32), labels)
  assert lo.dtype == jnp.float32 and abs(float(lo) - top1) <= 3 / 64


def test_zero_shot_end_to_end_with_encoder():
  enc = FakeTextEncoder(dim=8)
  names = ["red", "green", "blue", "grey"]
  class_emb = zero_shot.class_embeddings(enc, names, ["a {} thing", "the colour {}"])
  labels = np.array([3, 0, 2, 1, 1, 0], np.int32)
  images = np.asarray(class_emb)[labels] * 3.0  # scale does not matter: cosine similarity
  assert float(zero_shot.zero_shot_accuracy(images, class_emb, labels)) == 1.0


# ------------------------------------------------------------------------------------------- retrieval
def test_retrieval_recall_known_ranks():
  # Image i is e_i; text rows are permutations of (4, 3, 2, 1) (equal norms), so s_ij ∝ texts[j, i].
  # The matching text's value in each column is 4, 1, 3, 4 -> image→text ranks 0, 3, 1, 0; by rows
  # text→image ranks are also 0, 3, 1, 0.
  images = np.eye(4, dtype=np.float32)
  texts = np.array([[4, 3, 2, 1], [2, 1, 4, 3], [1, 4, 3, 2], [3, 2, 1, 4]], np.float32)
  got = retrieval.retrieval_recall(images, texts, ks=(1, 2, 3, 4))
  want = {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
  for k, v in want.items():
    assert float(got[f"image_to_text_R@{k}"]) == v
    assert float(got[f"text_to_image_R@{k}"]) == v
  assert set(got) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in want}


def test_retrieval_recall_with_ids_is_a_hit_if_any_match_is_in_top_k():
  images = np.eye(2, dtype=np.float32)
  texts = np.array([[1.0, 0.0], [0.2, 1.0], [0.0, 1.0]], np.float32)  # captions 0, 1 of image 0; 2 of 1
  got = retrieval.retrieval_recall(images, texts, ks=(1, 2), image_ids=[0, 1], text_ids=[0, 0, 1])
  assert float(got["image_to_text_R@1"]) == 1.0  # image 0 finds caption 0 first
  # caption 1 looks like image 1 (0.98 vs 0.196): rank 1; the other two rank 0.
  assert float(got["text_to_image_R@1"]) == pytest.approx(2 / 3)
  assert float(got["text_to_image_R@2"]) == 1.0


@pytest.mark.parametrize("chunk", [1024, 3])
def test_retrieval_recall_matches_numpy_reference(chunk):
  rng = np.random.default_rng(12)
  image = rng.standard_normal((20, 8)).astype(np.float32)
  text = (image + 0.8 * rng.standard_normal((20, 8))).astype(np.float32)
  got = retrieval.retrieval_recall(image, text, ks=(1, 3, 5, 10), chunk=chunk)
  want = ref_recall(image, text, (1, 3, 5, 10))
  assert {key: float(v) for key, v in got.items()} == pytest.approx(want, abs=1e-6)
  assert 0 < want["image_to_text_R@1"] < 1
  # Five captions per image, shuffled.
  text_ids = rng.permutation(np.repeat(np.arange(20), 5)).astype(np.int32)
  captions = (image[text_ids] + 1.2 * rng.standard_normal((100, 8))).astype(np.float32)
  got = retrieval.retrieval_recall(
      image, captions, ks=(1, 5), image_ids=np.arange(20), text_ids=text_ids, chunk=chunk
  )
  want = ref_recall(image, captions, (1, 5), np.arange(20), text_ids)
  assert {key: float(v) for key, v in got.items()} == pytest.approx(want, abs=1e-6)


def test_retrieval_recall_ties_count_against_the_match_and_bf16():
  same = np.ones((5, 3), np.float32)
  got = retrieval.retrieval_recall(same, same, ks=(1, 4, 5))
  assert [float(got[f"image_to_text_R@{k}"]) for k in (1, 4, 5)] == [0.0, 0.0, 1.0]
  rng = np.random.default_rng(13)
  image = rng.standard_normal((32, 16)).astype(np.float32)
  text = image + 0.5 * rng.standard_normal((32, 16)).astype(np.float32)
  hi = retrieval.retrieval_recall(image, text, ks=(1, 5))
  lo = retrieval.retrieval_recall(jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16), ks=(1, 5))
  for key in hi:
    assert lo[key].dtype == jnp.float32 and abs(float(lo[key]) - float(hi[key])) <= 2 / 32


# -------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("alpha,t", [(2.0, 2.0), (1.0, 1.0), (3.0, 0.5)])
def test_alignment_uniformity_match_numpy(alpha, t):
  x, y = randn(14, 17, 6), randn(15, 17, 6)
  got = geometry.alignment_uniformity(x, y, alpha=alpha, t=t)
  want_align = np.mean(np.linalg.norm(_unit(x) - _unit(y), axis=1) ** alpha)
  want_unif = 0.5 * (ref_uniformity(x, t) + ref_uniformity(y, t))
  np.testing.assert_allclose(float(got["alignment"]), want_align, rtol=1e-5)
  np.testing.assert_allclose(float(got["uniformity"]), want_unif, rtol=1e-5)
  chunked = geometry.alignment_uniformity(x, y, alpha=alpha, t=t, chunk=4)
  np.testing.assert_allclose(float(chunked["uniformity"]), float(got["uniformity"]), rtol=1e-5)  # chunked: another summation order


def test_alignment_uniformity_agree_with_the_loss_module():
  # A second implementation: the training losses of jaxcl.losses.alignment_uniformity (engine log-sum-exp).
  losses_geometry = pytest.importorskip("jaxcl.losses.alignment_uniformity")
  x, y = randn(24, 12, 5), randn(25, 12, 5)
  got = geometry.alignment_uniformity(x, y, alpha=1.5, t=3.0, chunk=5)
  np.testing.assert_allclose(float(got["alignment"]), float(losses_geometry.alignment(x, y, alpha=1.5)), rtol=1e-5)
  want = 0.5 * (losses_geometry.uniformity(x, t=3.0) + losses_geometry.uniformity(y, t=3.0))
  np.testing.assert_allclose(float(got["uniformity"]), float(want), rtol=1e-5)


def test_alignment_uniformity_extremes_and_bf16():
  x = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
  out = geometry.alignment_uniformity(x, x * 5.0)
  assert float(out["alignment"]) == 0.0 and float(out["uniformity"]) == pytest.approx(-8.0)
  collapsed = geometry.alignment_uniformity(np.ones((6, 3)), np.ones((6, 3)))
  assert float(collapsed["uniformity"]) == pytest.approx(0.0, abs=1e-6)
  a, b = randn(16, 24, 8), randn(17, 24, 8)
  hi = geometry.alignment_uniformity(a, b)
  lo = geometry.alignment_uniformity(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  for key in hi:
    assert lo[key].dtype == jnp.float32
    np.testing.assert_allclose(float(lo[key]), float(hi[key]), rtol=2e-2)


def test_effective_rank():
  for n in (1, 4, 9):
    assert float(geometry.effective_rank(np.eye(n, dtype=np.float32))) == pytest.approx(n, rel=1e-5)
  rank1 = np.outer(randn(18, 50), randn(19, 12)).astype(np.float32)
  assert float(geometry.effective_rank(rank1)) == pytest.approx(1.0, abs=1e-3)
  x = randn(20, 40, 10) * np.linspace(0.1, 3.0, 10, dtype=np.float32)
  np.testing.assert_allclose(float(geometry.effective_rank(x)), ref_effective_rank(x), rtol=1e-5)
  np.testing.assert_allclose(float(geometry.effective_rank(7.0 * x)), ref_effective_rank(x), rtol=1e-5)
  assert float(geometry.effective_rank(np.zeros((3, 4), np.float32))) == 0.0
  assert 1.0 <= float(geometry.effective_rank(x)) <= 10.0
  lo = geometry.effective_rank(jnp.asarray(x, jnp.bfloat16))
  assert lo.dtype == jnp.float32 and float(lo) == pytest.approx(ref_effective_rank(x), rel=2e-2)


def test_modality_gap():
  x, y = randn(21, 30, 5), randn(22, 12, 5) + 2.0
  want = np.linalg.norm(_unit(x).mean(0) - _unit(y).mean(0))
  np.testing.assert_allclose(float(geometry.modality_gap(x, y)), want, rtol=1e-5)
  assert float(geometry.modality_gap(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)
  opposite = geometry.modality_gap(np.array([[1.0, 0.0]]), np.array([[-2.0, 0.0]]))
  assert float(opposite) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ summary, exports
def test_evaluate_embeddings():
  x, y = blobs(23, 30, 4, 12, spread=0.45)
  out = ev.evaluate_embeddings(x[:80], y[:80], x[80:], y[80:], num_classes=4, knn_k=10)
  assert set(out) == {"knn_accuracy", "linear_probe_accuracy"}
  assert all(isinstance(v, float) for v in out.values())
  knn_acc = knn.knn_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4, k=10)
  probe_acc = linear_probe.linear_probe_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4)
  assert out == {"knn_accuracy": float(knn_acc), "linear_probe_accuracy": float(probe_acc)}
  assert 0.4 < out["knn_accuracy"] <= 1.0 and 0.4 < out["linear_probe_accuracy"] <= 1.0


def test_package_exports():
  for name in ev.__all__:
    assert getattr(ev, name) is not None
  assert ev.knn_predict is knn.knn_predict and ev.retrieval_recall is retrieval.retrieval_recall


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
        (lambda: linear_probe.linear_probe_accuracy(E, L, np.ones((2, 3)), L[:2], num_classes=3), r"`train_x` and `test_x` must have the same feature size"),
        (lambda: linear_probe.linear_probe_accuracy(E, L, E, L, num_classes=2), r"`test_y` must lie in \[0, 2\)"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, l2=-1.0), r"`l2` must be non-negative"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, optimizer="sgd"), r"`optimizer` must be one of"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, steps=0), r"`steps` must be a positive integer"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=0), r"`num_classes` must be a positive integer"),
        (lambda: linear_probe.linear_probe_fit(E.astype(np.int32), L, num_classes=3), r"`train_x` must be a floating-point array"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), ["a"], ["no placeholder"]), r"`templates\[0\]` must be a str containing"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), [], ["{}"]), r"`class_names` must be a non-empty"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), "cat", ["{}"]), r"`class_names` must be a non-empty sequence of str"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), ["a"], []), r"`templates` must be a non-empty"),
        (lambda: zero_shot.class_embeddings(lambda t: jnp.ones((len(t) + 1, 3)), ["a"], ["{}"]), r"`encode_text` must return shape \(1, D\)"),
        (lambda: zero_shot.class_embeddings(lambda t: jnp.ones((1, 2 + len(t[0]))), ["a", "bb"]), r"must return shape \(1, 3\).*'bb', got \(1, 4\)"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 4)), L + 1), r"`labels` must lie in \[0, 3\)"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 5)), L), r"`image_emb` and `class_emb` must have the same feature size"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 4)), L, top_k=0), r"`top_k` must be a positive integer"),
        (lambda: retrieval.retrieval_recall(E, np.ones((5, 4))), r"need the same number of rows, got 6 and 5"),
        (lambda: retrieval.retrieval_recall(E, np.ones((6, 3))), r"`image_emb` and `text_emb` must have the same feature size"),
        (lambda: retrieval.retrieval_recall(E, E, ks=(1, 0)), r"`ks\[1\]` must be a positive integer, got 0"),
        (lambda: retrieval.retrieval_recall(E, E, ks=()), r"`ks` must be a non-empty"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L), r"must be given together, got only `image_ids`"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L, text_ids=L + 1), r"`image_ids\[0\] = 0 has none|image_ids\[0\] = 0"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L, text_ids=L[:5]), r"`text_ids` must have shape \(6,\)"),
        (lambda: geometry.alignment_uniformity(E, np.ones((5, 4))), r"`x` and `y` must have the same shape"),
        (lambda: geometry.alignment_uniformity(E[:1], E[:1]), r"`x` needs at least 2 examples"),
        (lambda: geometry.alignment_uniformity(E, E, t=-1.0), r"`t` must be positive"),
        (lambda: geometry.alignment_uniformity(E, E, alpha=0.0), r"`alpha` must be positive"),
        (lambda: geometry.effective_rank(np.ones(4)), r"`x` must have rank 2"),
        (lambda: geometry.modality_gap(E, np.ones((3, 5))), r"`x` and `y` must have the same feature size"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
