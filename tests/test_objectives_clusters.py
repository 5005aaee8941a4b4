"""SBCL (+ on-device k-means), focal SupCon, gated pairs and MLCD against float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcl.losses import _tiled
from jaxcl.losses.clustering import mlcd, sbcl, subclass_kmeans
from jaxcl.losses.gated_pairs import gated_pair_infonce
from jaxcl.losses.infonce import infonce
from jaxcl.losses.supcon import focal_supcon, supcon
from tests import reference
from tests import helpers
from tests.helpers import randn

assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)

norm = reference.normalize


# ------------------------------------------------------------------------------ float64 references
def _rows(features, labels, *others):
  """(N, V, D) -> view-major (N·V, D) rows with labels (and other per-sample ids) tiled."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    return (f, np.asarray(labels)) + tuple(np.asarray(o) for o in others)
  v = f.shape[1]
  z = np.concatenate([f[:, i] for i in range(v)])
  return (z, np.tile(labels, v)) + tuple(np.tile(o, v) for o in others)


def ref_sbcl(features, labels, sub, tau1, tau2=None, beta=0.25, own_views=True):
  """tau2: None (= tau1), a scalar or a per-class vector indexed by label. own_views: the row's other
  views of its own sample join ℓ²'s positives and denominator."""
  n = len(labels)
  z, y, s, sample = _rows(features, labels, sub, np.arange(n))
  z = norm(z)
  m = len(y)
  tau2_row = np.full(m, tau1) if tau2 is None else (
      np.full(m, tau2) if np.ndim(tau2) == 0 else np.asarray(tau2)[y])
  t1, t2 = [], []
  for i in range(m):
    same_sub = [p for p in range(m) if p != i and y[p] == y[i] and s[p] == s[i]]
    views = [p for p in range(m) if p != i and sample[p] == sample[i]] if own_views else []
    other_sub = [p for p in range(m) if y[p] == y[i] and s[p] != s[i]] + views
    if same_sub:
      logits = np.array([z[i] @ z[a] for a in range(m) if a != i]) / tau1
      lse = reference.logsumexp(logits)
      t1.append(np.mean([lse - z[i] @ z[p] / tau1 for p in same_sub]))
    if other_sub:
      den = [a for a in range(m) if not (y[a] == y[i] and s[a] == s[i])] + views
      lse = reference.logsumexp(np.array([z[i] @ z[a] for a in den]) / tau2_row[i])
      t2.append(np.mean([lse - z[i] @ z[p] / tau2_row[i] for p in other_sub]))
  return (np.mean(t1) if t1 else 0.0) + beta * (np.mean(t2) if t2 else 0.0)


def ref_sbcl_authors(features, labels, sub, tau1, tau2_per_class, grama=0.25, base_temperature=0.07):
  """A NumPy port of the mask algebra of the authors' `SupConLoss_rank` (JackHck/SBCL, SimCLR/loss.py),
  2 views, written independently of `ref_sbcl`: subclass mask, `ad_mask` (own other view), one loss per
  anchor, `.mean()` over all 2B anchors. Subclass ids must be unique across classes, as there."""
  f = np.asarray(features, np.float64)
  b = f.shape[0]
  z = norm(np.concatenate([f[:, 0], f[:, 1]]))
  cluster = np.tile(sub, 2)
  lab = np.tile(labels, 2)
  dots = z @ z.T
  logits = dots / tau1
  logits = logits - logits.max(1, keepdims=True)
  tau2 = np.asarray(tau2_per_class, np.float64)[lab][:, None]
  logits_rank = dots / tau2
  logits_rank = logits_rank - logits_rank.max(1, keepdims=True)
  logits_mask = 1.0 - np.eye(2 * b)
  mask = (cluster[:, None] == cluster[None, :]) * logits_mask
  log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1, keepdims=True))
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  label_mask = (lab[:, None] == lab[None, :]).astype(np.float64)
  logits_label_mask = (1.0 - mask) * logits_mask
  ad_mask = np.zeros((2 * b, 2 * b))
  cols = list(range(b, 2 * b)) + list(range(b))
  ad_mask[cols, np.arange(2 * b)] = 1.0
  exp_logits_rank = np.exp(logits_rank) * (ad_mask + logits_label_mask)
  label_mask = ad_mask + logits_label_mask * label_mask
  log_prob_rank = logits_rank - np.log(exp_logits_rank.sum(1, keepdims=True))
  mean_log_label_pos = (label_mask * log_prob_rank).sum(1) / label_mask.sum(1)
  loss = -(tau1 / base_temperature) * mean_log_prob_pos - grama * mean_log_label_pos
  return loss.mean()


def ref_focal_supcon(features, labels, tau, gamma, average="batch"):
  z, y = _rows(features, labels)
  z = norm(z)
  m = len(y)
  per_anchor = []
  for a in range(m):
    pos = [p for p in range(m) if p != a and y[p] == y[a]]
    if not pos:
      continue
    lse = reference.logsumexp(np.array([z[a] @ z[b] for b in range(m) if b != a]) / tau)
    terms = []
    for p in pos:
      log_p = z[a] @ z[p] / tau - lse
      terms.append(-((1 - np.exp(log_p)) ** gamma) * log_p)
    per_anchor.append(np.sum(terms) / (m if average == "batch" else len(pos)))
  return np.mean(per_anchor)


def ref_gated(q, k, g, tau):
  q, k = norm(q), norm(k)
  g = np.broadcast_to(g, q.shape)
  total = 0.0
  for i in range(q.shape[0]):
    logits = np.array([(g[i] * q[i]) @ (g[i] * k[j]) for j in range(k.shape[0])]) / tau
    total += reference.logsumexp(logits) - logits[i]
  return total / q.shape[0]


def ref_gated_labels(q, k, g, y1, y2, yk, tau):
  """The authors' class-level objective (erow/FastSSL model/simlap.py, `multipos_ce_loss`)."""
  q, k = norm(q), norm(k)
  g = np.broadcast_to(g, q.shape)
  terms = []
  for i in range(q.shape[0]):
    logits = np.array([(g[i] * q[i]) @ (g[i] * k[j]) for j in range(k.shape[0])]) / tau
    negatives = [logits[j] for j in range(k.shape[0]) if yk[j] != y1[i] and yk[j] != y2[i]]
    for p in range(k.shape[0]):
      if yk[p] == y2[i]:
        terms.append(reference.logsumexp(np.array([logits[p]] + negatives)) - logits[p])
  return np.mean(terms)


def ref_mlcd(f, c, positives, s, m):
  f, c = norm(f), norm(c)
  total = 0.0
  for i in range(f.shape[0]):
    cos = c @ f[i]
    pos = set(int(p) for p in positives[i])
    total += np.log1p(sum(np.exp(-s * (cos[j] - m)) for j in pos))
    total += np.log1p(sum(np.exp(s * cos[j]) for j in range(len(cos)) if j not in pos))
  return total / f.shape[0]


def ref_kmeans(x, labels, subclass_size, iterations):
  """Spherical Lloyd per class, initial centres = the class's first k_c members in index order."""
  x = norm(x)
  out = np.zeros(len(labels), int)
  next_id = 0
  for c in sorted(set(labels.tolist())):
    members = np.where(labels == c)[0]
    k = max(1, len(members) // subclass_size)
    centres = x[members[:k]].copy()
    for _ in range(iterations + 1):
      assign = np.argmax(x[members] @ centres.T, axis=1)
      for j in range(k):
        if np.any(assign == j):
          mean = x[members][assign == j].sum(0)
          centres[j] = mean / np.linalg.norm(mean)
    out[members] = next_id + assign
    next_id += k
  return out


def same_partition(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


# ---------------------------------------------------------------------------------------- k-means
def test_subclass_kmeans_matches_a_numpy_lloyd():
  x, labels = randn(1, 23, 4), np.array([0] * 12 + [5] * 7 + [2] * 3 + [9])
  got = jax.jit(lambda a, y: subclass_kmeans(a, y, subclass_size=3, iterations=5))(x, labels)
  want = ref_kmeans(x, labels, 3, 5)
  assert same_partition(got, want)
  # k_c = max(1, n_c // 3) subclasses per class, each inside one class.
  for c, k in ((0, 4), (5, 2), (2, 1), (9, 1)):
    assert len(set(np.asarray(got)[labels == c].tolist())) == k
  assert all(len(set(labels[np.asarray(got) == s].tolist())) == 1 for s in set(np.asarray(got).tolist()))


def test_subclass_kmeans_recovers_separated_blobs_with_random_init():
  rng = np.random.default_rng(2)
  centres = np.eye(3, 6) * 5.0
  x = np.concatenate([c + 0.1 * rng.standard_normal((6, 6)) for c in centres]).astype(np.float32)
  blob = np.repeat(np.arange(3), 6)
  perm = rng.permutation(18)
  x, blob = x[perm], blob[perm]
  labels = np.zeros(18, np.int32)  # one class of 18 samples, M = 6: three subclasses
  got = subclass_kmeans(x, labels, subclass_size=6, iterations=10, key=jax.random.key(0))
  # A fixed key, so the random (Forgy) initial centres and hence the result are deterministic.
  assert len(set(np.asarray(got).tolist())) == 3
  assert same_partition(got, blob)


# -------------------------------------------------------------------------------------------- SBCL
SBCL_CASES = [
    # (shape, labels, subclasses, tau1, tau2, beta, own_views)
    ((8, 4), [0, 0, 0, 0, 1, 1, 2, 0], [0, 0, 1, 1, 0, 0, 0, 1], 0.1, None, 1.0, True),
    ((6, 3), [3, 3, 3, 7, 7, 3], [1, 2, 1, 5, 5, 2], 0.5, 0.2, 0.5, True),
    ((5, 2, 3), [0, 0, 1, 1, 0], [0, 1, 0, 0, 1], 0.3, np.array([0.2, 0.6]), 1.0, True),
    ((5, 2, 3), [0, 0, 1, 1, 0], [0, 1, 0, 0, 1], 0.3, np.array([0.2, 0.6]), 1.0, False),
    ((4, 3, 3), [0, 0, 1, 2], [0, 1, 0, 0], 0.2, 0.4, 0.25, True),  # tail classes 1, 2: one sample each
    ((6, 4), [0, 1, 0, 1, 2, 0], [4, 4, 7, 4, 4, 4], 0.2, None, 2.0, True),  # subclass ids reused
]


@pytest.mark.parametrize("shape,labels,sub,tau1,tau2,beta,own_views", SBCL_CASES)
def test_sbcl_matches_reference(shape, labels, sub, tau1, tau2, beta, own_views):
  labels, sub = np.array(labels, np.int32), np.array(sub, np.int32)
  assert_value_and_grads(
      lambda f: sbcl(f, labels, sub, temperature=tau1, class_temperature=tau2, beta=beta,
                     own_views_in_class_term=own_views),
      lambda f: ref_sbcl(f, labels, sub, tau1, tau2, beta, own_views),
      [randn(3, *shape)],
  )


def test_sbcl_defaults_and_authors_code():
  # β = 0.25, τ₁ = 0.1; the authors' loss is (τ₁/0.07)·ℓ¹ + β·ℓ², i.e. (τ₁/0.07)·sbcl(β = 0.07·β/τ₁).
  f = randn(33, 7, 2, 5)
  labels = np.array([0, 0, 0, 0, 1, 1, 2], np.int32)
  sub = np.array([0, 1, 0, 1, 2, 2, 3], np.int32)  # class 0 in two subclasses, tail classes 1 and 2
  tau2 = np.array([0.08, 0.1, 0.13])
  np.testing.assert_allclose(float(sbcl(f, labels, sub)), ref_sbcl(f, labels, sub, 0.1, None, 0.25), rtol=1e-5)
  got = (0.1 / 0.07) * float(sbcl(f, labels, sub, class_temperature=tau2, beta=0.07 * 0.25 / 0.1))
  np.testing.assert_allclose(got, ref_sbcl_authors(f, labels, sub, 0.1, tau2), rtol=1e-5)


def test_sbcl_with_one_subclass_per_class_is_supcon():
  f, labels = randn(4, 7, 2, 5), np.array([0, 1, 1, 2, 0, 2, 1])
  # V = 1: no own views, so ℓ² has no positive; V = 2 with the own views left out of ℓ²: the same.
  for x, own_views in ((f[:, 0], True), (f, False)):
    got = jax.jit(lambda a: sbcl(a, labels, labels, temperature=0.2, beta=3.0, own_views_in_class_term=own_views))(x)
    want = jax.jit(lambda a: supcon(a, labels, temperature=0.2))(x)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_sbcl_with_every_sample_its_own_subclass_is_two_supcons():
  # S(i) = own views: ℓ¹ is SupCon on sample ids; P²(i) = the whole class, D²(i) = every row but i.
  f, labels = randn(34, 6, 2, 4), np.array([0, 1, 1, 2, 0, 1])
  got = jax.jit(lambda x: sbcl(x, labels, np.arange(6), temperature=0.2, class_temperature=0.5, beta=0.3))(f)
  want = (supcon(f, np.arange(6), temperature=0.2) + 0.3 * supcon(f, labels, temperature=0.5))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_sbcl_tail_anchors_count_in_the_class_term():
  # Two singleton classes, two views: without the own views there is no ℓ² term (SupCon); with them
  # every anchor has one (its other view against the other class).
  f, labels = randn(35, 2, 2, 3), np.array([0, 1])
  new = float(sbcl(f, labels, labels, beta=1.0))
  old = float(sbcl(f, labels, labels, beta=1.0, own_views_in_class_term=False))
  np.testing.assert_allclose(old, float(supcon(f, labels, temperature=0.1)), rtol=1e-5)
  np.testing.assert_allclose(new, ref_sbcl(f, labels, labels, 0.1, beta=1.0), rtol=1e-5)
  assert new > old


def test_sbcl_on_kmeans_subclasses_under_jit():
  f, labels = randn(5, 12, 4), np.array([0] * 8 + [1] * 4)

  @jax.jit
  def loss(x):
    sub = subclass_kmeans(jax.lax.stop_gradient(x), labels, subclass_size=4, iterations=3)
    return sbcl(x, labels, sub, temperature=0.1)

  sub = np.asarray(subclass_kmeans(f, labels, subclass_size=4, iterations=3))
  np.testing.assert_allclose(float(loss(f)), ref_sbcl(f, labels, sub, 0.1), rtol=2e-5)
  assert np.all(np.isfinite(jax.grad(loss)(f)))


# -------------------------------------------------------------------------------------- focal SupCon
@pytest.mark.parametrize(
    "shape,labels,tau,gamma,average",
    [((6, 4), [0, 1, 0, 2, 1, 0], 0.1, 2.0, "positives"), ((4, 2, 3), [0, 1, 2, 3], 0.5, 1.0, "batch"),
     ((5, 3), [3, 3, 7, 7, 9], 0.2, 0.5, "batch")],
)
def test_focal_supcon_matches_reference(shape, labels, tau, gamma, average):
  labels = np.array(labels, np.int32)
  assert_value_and_grads(
      lambda f: focal_supcon(f, labels, temperature=tau, gamma=gamma, average=average),
      lambda f: ref_focal_supcon(f, labels, tau, gamma, average),
      [randn(6, *shape)],
  )


def test_focal_supcon_defaults_are_the_authors():
  # Core-tuning's focal_SupConLoss: (1 − p) · log p summed per anchor, / the row count (.mean(1)), τ = 0.07.
  f, labels = randn(9, 6, 4), np.array([0, 1, 0, 2, 1, 0], np.int32)
  np.testing.assert_allclose(float(focal_supcon(f, labels)), ref_focal_supcon(f, labels, 0.07, 1.0, "batch"),
                             rtol=1e-5)


def test_focal_supcon_without_focusing_is_supcon_and_focusing_lowers_it():
  f, labels = randn(7, 8, 4), np.array([0, 1, 0, 1, 2, 2, 0, 1])
  loss = jax.jit(lambda x, g: focal_supcon(x, labels, temperature=0.2, gamma=g, average="positives"))
  want = float(jax.jit(lambda x: supcon(x, labels, temperature=0.2))(f))
  np.testing.assert_allclose(float(loss(f, 0.0)), want, rtol=1e-5)
  # (1 − p)^γ <= 1 and decreasing in γ: the loss is below SupCon and decreases with γ.
  assert float(loss(f, 1.0)) < want and float(loss(f, 2.0)) < float(loss(f, 1.0))


def test_focal_supcon_gamma_gradient():
  f, labels = randn(8, 5, 3), np.array([0, 0, 1, 1, 0])
  g = jax.jit(jax.grad(lambda gm: focal_supcon(f, labels, temperature=0.3, gamma=gm, average="batch")))(1.5)
  want = reference.numerical_grad(lambda x: ref_focal_supcon(f, labels, 0.3, x[()]), np.array(1.5))
  np.testing.assert_allclose(float(g), want, rtol=1e-4)


# -------------------------------------------------------------------------------------- gated pairs
@pytest.mark.parametrize("gate_shape", [(5, 4), (4,)])
def test_gated_pair_infonce_matches_reference(gate_shape):
  gates = np.random.default_rng(9).uniform(0.1, 1.0, gate_shape).astype(np.float32)
  assert_value_and_grads(
      lambda q, k, g: gated_pair_infonce(q, k, g, temperature=0.2),
      lambda q, k, g: ref_gated(q, k, g, 0.2),
      [randn(10, 5, 4), randn(11, 5, 4), gates],
  )


def test_gated_pair_infonce_with_open_gates_is_infonce_and_closed_dims_are_ignored():
  q, k = randn(12, 6, 4), randn(13, 6, 4)
  loss = jax.jit(lambda a, b, g: gated_pair_infonce(a, b, g, temperature=0.1, normalize=False))
  want = jax.jit(lambda a, b: infonce(a, b, temperature=0.1, normalize=False))
  np.testing.assert_allclose(float(loss(q, k, np.ones(4, np.float32))), float(want(q, k)), rtol=1e-6)
  # Gate (1, 1, 0, 0): only the first two dimensions count.
  gate = np.array([1, 1, 0, 0], np.float32)
  np.testing.assert_allclose(float(loss(q, k, gate)), float(want(q[:, :2], k[:, :2])), rtol=1e-6)


GATED_LABEL_CASES = [
    # (Bq, Bk, y1, y2, yk): yk None = y1 (keys are the other views of the queries)
    (6, 6, [0, 1, 0, 2, 1, 3], [1, 1, 2, 0, 3, 0], None),
    (5, 7, [4, 4, 9, 2, 2], [9, 2, 2, 9, 4], [9, 2, 4, 4, 9, 7, 2]),
    (4, 4, [0, 0, 1, 1], [1, 0, 0, 1], None),  # pairs of one class: all same-class keys are positives
]


@pytest.mark.parametrize("bq,bk,y1,y2,yk", GATED_LABEL_CASES)
def test_gated_pair_infonce_with_labels_matches_reference(bq, bk, y1, y2, yk):
  y1, y2 = np.array(y1, np.int32), np.array(y2, np.int32)
  yk_arr = y1 if yk is None else np.array(yk, np.int32)
  gates = np.random.default_rng(4).uniform(0.1, 1.0, (bq, 5)).astype(np.float32)
  assert_value_and_grads(
      lambda q, k, g: gated_pair_infonce(q, k, g, query_labels=y1, pair_labels=y2,
                                         key_labels=None if yk is None else yk_arr, temperature=0.2),
      lambda q, k, g: ref_gated_labels(q, k, g, y1, y2, yk_arr, 0.2),
      [randn(36, bq, 5), randn(37, bk, 5), gates],
  )


def test_gated_pair_infonce_with_sample_ids_as_labels_is_the_row_aligned_loss():
  q, k = randn(38, 6, 4), randn(39, 6, 4)
  gates = np.random.default_rng(5).uniform(0.2, 1.0, (6, 4)).astype(np.float32)
  ids = np.arange(6, dtype=np.int32)
  got = jax.jit(lambda a, b: gated_pair_infonce(a, b, gates, query_labels=ids, pair_labels=ids))(q, k)
  want = jax.jit(lambda a, b: gated_pair_infonce(a, b, gates))(q, k)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_gated_pair_infonce_anchor_without_negatives_is_finite():
  # Query 0 (class 0 paired with 1) sees only keys of classes 0 and 1: its terms are log 1 = 0.
  y1, y2, yk = np.array([0, 2, 2]), np.array([1, 0, 1]), np.array([0, 1, 1, 0])
  q, k = randn(40, 3, 4), randn(41, 4, 4)
  loss = lambda a, b: gated_pair_infonce(a, b, np.ones(4, np.float32), query_labels=y1, pair_labels=y2,
                                         key_labels=yk, impl="blockwise")
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, k)
  np.testing.assert_allclose(float(value), ref_gated_labels(q, k, np.ones(4), y1, y2, yk, 0.1), rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[0] == 0.0)


# --------------------------------------------------------------------------------------------- MLCD
@pytest.mark.parametrize("s,m,impl", [(32.0, 0.0, "auto"), (4.0, 0.2, "dense"), (8.0, -0.1, "blockwise")])
def test_mlcd_matches_reference(s, m, impl):
  positives = np.array([[0, 3], [5, 1], [2, 6], [7, 4]])
  assert_value_and_grads(
      lambda f, c: mlcd(f, c, positives, scale=s, margin=m, impl=impl),
      lambda f, c: ref_mlcd(f, c, positives, s, m),
      [randn(14, 4, 5), randn(15, 9, 5)],
      rtol=5e-5,
  )


def test_mlcd_with_one_positive_and_no_negatives_is_a_softplus():
  # N = k: the negative sum is empty (log 1 = 0); each row is softplus(−s(cos − m)).
  f, c = randn(16, 3, 4), randn(17, 2, 4)
  got = jax.jit(lambda a, b: mlcd(a, b, np.array([[0, 1]] * 3), scale=2.0, margin=0.1))(f, c)
  cos = norm(f) @ norm(c).T
  np.testing.assert_allclose(float(got), np.mean(np.log1p(np.exp(-2.0 * (cos - 0.1)).sum(1))), rtol=1e-5)


def test_mlcd_sharded_centres_match_one_device():
  # 8 host devices (tests/conftest.py), 3 centres each; features replicated, positives global ids.
  mesh = jax.make_mesh((8,), ("c",), axis_types=(jax.sharding.AxisType.Auto,))
  f, c = randn(18, 5, 6), randn(19, 24, 6)
  positives = np.array([[0, 23, 4], [9, 10, 11], [1, 2, 3], [20, 5, 17], [8, 16, 12]])

  def one_device(x, cc):
    return mlcd(x, cc, positives, scale=8.0, margin=0.1)

  sharded = jax.shard_map(
      lambda x, cc, p: mlcd(x, cc, p, scale=8.0, margin=0.1, axis_name="c"),
      mesh=mesh, in_specs=(P(), P("c"), P()), out_specs=P(),
  )
  want_v, want_g = jax.jit(jax.value_and_grad(one_device, argnums=(0, 1)))(f, c)
  got_v, got_g = jax.jit(jax.value_and_grad(lambda x, cc: sharded(x, cc, positives), argnums=(0, 1)))(f, c)
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ tiled row reductions
@pytest.mark.parametrize("tile", [1, 3, 4, 50])
def test_tiled_row_logsumexp_matches_dense_with_an_empty_row(tile):
  q, k = randn(20, 4, 3), randn(21, 7, 3)
  banned = jnp.array([[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1, 1], [2, 5, 5, 5, 5, 5, 5], [6, 0, 0, 0, 0, 0, 0]])

  def valid(col_ids):
    return jnp.all(banned[:, :, None] != col_ids[None, None, :], axis=1)

  def run(dense):
    def f(a, b):
      lse = _tiled.row_logsumexp(a, b, 3.0, valid, dense=dense, tile=tile)
      return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), lse
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(q, k)

  (v_d, lse_d), g_d = run(True)
  (v_t, lse_t), g_t = run(False)
  assert np.isneginf(lse_t[0]) and np.isneginf(lse_d[0])  # row 0 bans every column
  s = 3.0 * q.astype(np.float64) @ k.T.astype(np.float64)
  np.testing.assert_allclose(lse_t[1], reference.logsumexp(np.delete(s[1], 1)), rtol=1e-5)
  np.testing.assert_allclose(float(v_t), float(v_d), rtol=1e-5)
  for a, b in zip(g_t, g_d):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- engines (impl=)


def _engine_calls():
  f, labels, sub = randn(30, 6, 2, 4), np.array([0, 1, 0, 2, 1, 0]), np.array([0, 0, 1, 0, 0, 0])
  q, k = randn(31, 6, 4), randn(32, 6, 4)
  gates = np.random.default_rng(3).uniform(0.2, 1.0, (6, 4)).astype(np.float32)
  calls = {
      "sbcl": (lambda impl: lambda a: sbcl(a, labels, sub, temperature=0.2, class_temperature=0.4, impl=impl), (f,)),
      "focal_supcon": (lambda impl: lambda a: focal_supcon(a, labels, temperature=0.2, impl=impl), (f,)),
      "gated_pair_infonce": (lambda impl: lambda a, b: gated_pair_infonce(a, b, gates, impl=impl), (q, k)),
      "gated_pair_infonce(labels)": (lambda impl: lambda a, b: gated_pair_infonce(
          a, b, gates, query_labels=labels, pair_labels=np.roll(labels, 1), impl=impl), (q, k)),
  }
  return calls


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_engine_calls()))
def test_every_available_engine_agrees_with_dense(name):
  make, args = _engine_calls()[name]
  helpers.assert_engines_agree(name, make, args)


# ----------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_inputs_give_float32_losses_close_to_float32():
  f, labels = randn(40, 8, 16), np.array([0, 1, 0, 1, 2, 2, 0, 1])
  sub = np.array([0, 0, 1, 0, 0, 0, 1, 0])
  c, pos = randn(41, 12, 16), np.arange(16).reshape(8, 2) % 12
  g = np.full((16,), 0.7, np.float32)
  losses = {
      "sbcl": lambda x: sbcl(x, labels, sub),
      "focal_supcon": lambda x: focal_supcon(x, labels, temperature=0.1),
      "gated_pair_infonce": lambda x: gated_pair_infonce(x, x[::-1], g),
      "gated_pair_infonce(labels)": lambda x: gated_pair_infonce(x, x[::-1], g, query_labels=labels,
                                                                 pair_labels=labels[::-1]),
      "mlcd": lambda x: mlcd(x, c, pos, scale=8.0),
  }
  for name, loss in losses.items():
    want = float(jax.jit(loss)(f))
    got, grad = jax.jit(jax.value_and_grad(loss))(f.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32, name
    np.testing.assert_allclose(float(got), want, rtol=3e-2, atol=1e-2, err_msg=name)
    assert bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32)))), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)
I4 = np.arange(4, dtype=np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: subclass_kmeans(ONES((4, 3)), I4, subclass_size=0), r"`subclass_size` must be an integer >= 1, got 0"),
        (lambda: subclass_kmeans(ONES((4, 3)), I4, subclass_size=2, iterations=-1), r"`iterations` must be an integer >= 0"),
        (lambda: subclass_kmeans(ONES((4, 3)), I4, subclass_size=2, max_subclasses=0), r"`max_subclasses` must be an integer >= 1"),
        (lambda: subclass_kmeans(ONES((4, 3)), I4[:3], subclass_size=2), r"`labels` must have shape \(4,\)"),
        (lambda: sbcl(ONES((4, 3)), I4, I4[:3]), r"`subclass_labels` must have shape \(4,\)"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, temperature=0.0), r"`temperature` must be positive"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, class_temperature=-1.0), r"`class_temperature` must be positive"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, class_temperature=np.ones(3)), r"needs labels in \[0, 3\), got labels in \[0, 3\]"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, class_temperature=np.ones((2, 2))), r"`class_temperature` must be a scalar or a \(C,\) vector"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, beta=-1.0), r"`beta` must be >= 0"),
        (lambda: sbcl(ONES((1, 3)), I4[:1], I4[:1]), r"`features` needs at least 2 examples"),
        (lambda: focal_supcon(ONES((4,)), I4), r"`features` must have rank 2 or rank 3"),
        (lambda: focal_supcon(ONES((4, 3)), I4, gamma=-1.0), r"`gamma` must be >= 0"),
        (lambda: focal_supcon(ONES((4, 3)), I4.astype(np.float32)), r"`labels` must have an integer dtype"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((4, 2))), r"`gates` must have shape \(4, 3\) or \(3,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), 2 * ONES((3,))), r"`gates` must lie in \[0, 1\]"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,))), r"`query` and `key` must have the same shape"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4), r"`query_labels` and `pair_labels` must be given together"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), key_labels=I4), r"`query_labels` and `pair_labels` must be given together"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,)), query_labels=I4, pair_labels=I4), r"`key_labels` is needed when `key` and `query` have different batch sizes"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 2)), ONES((3,)), query_labels=I4, pair_labels=I4, key_labels=I4), r"same feature size"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4[:3]), r"`pair_labels` must have shape \(4,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((5, 3)), ONES((3,)), query_labels=I4, pair_labels=I4, key_labels=I4), r"`key_labels` must have shape \(5,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4.astype(np.float32), pair_labels=I4), r"`query_labels` must have an integer dtype"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4 + 4), r"no key has a query's pair label"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, own_views_in_class_term=1), r"`own_views_in_class_term` must be a bool"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 2)), np.zeros((4, 1), np.int32)), r"same feature size"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((3, 1), np.int32)), r"`positives` must have shape \(4, k\)"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.float32)), r"`positives` must have an integer dtype"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.full((4, 1), 5)), r"`positives` must hold centre ids in \[0, 5\)"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), scale=0.0), r"`scale` must be positive"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), impl="pallas"), r"`impl` must be one of \('auto', 'dense', 'blockwise'\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ------------------------------------------------------------------------------- reduction and mask
_Y5, _SUB5 = np.array([0, 1, 0, 2, 1], np.int32), np.array([0, 0, 1, 0, 0], np.int32)
_GATES5 = np.random.default_rng(7).uniform(0.2, 1.0, (5, 3)).astype(np.float32)


def _masked_cases(impl):
  """name -> (loss(*arrays, **kw), arrays (floats first), number of float arrays, anchors or None)."""
  gated = lambda q, k, g, **kw: gated_pair_infonce(q, k, jnp.clip(g, 0.0, 1.0), temperature=0.3, impl=impl, **kw)
  return {
      "sbcl": (lambda f, y, s, **kw: sbcl(f, y, s, temperature=0.2, class_temperature=0.4, beta=0.5, impl=impl, **kw),
               [randn(150, 5, 2, 3), _Y5, _SUB5], 1, 10),
      "sbcl(per-class τ₂)": (lambda f, y, s, **kw: sbcl(f, y, s, temperature=0.2, class_temperature=np.array([0.3, 0.5, 0.4]),
                                                        impl=impl, **kw), [randn(163, 5, 2, 3), _Y5, _SUB5], 1, 10),
      "sbcl(V=1)": (lambda f, y, s, **kw: sbcl(f, y, s, temperature=0.2, beta=0.5, impl=impl, **kw),
                    [randn(151, 5, 3), _Y5, _SUB5], 1, None),
      "focal_supcon": (lambda f, y, **kw: focal_supcon(f, y, temperature=0.2, impl=impl, **kw),
                       [randn(152, 5, 2, 3), _Y5], 1, 10),
      "focal_supcon(positives,V=1)": (lambda f, y, **kw: focal_supcon(f, y, temperature=0.2, gamma=2.0,
                                                                      average="positives", impl=impl, **kw),
                                      [randn(153, 5, 3), _Y5], 1, None),
      "gated_pair_infonce": (gated, [randn(154, 5, 3), randn(155, 5, 3), _GATES5], 3, 5),
      "gated_pair_infonce(labels)": (lambda q, k, g, y1, y2, **kw: gated(q, k, g, query_labels=y1, pair_labels=y2, **kw),
                                     [randn(156, 5, 3), randn(157, 5, 3), _GATES5, _Y5, np.roll(_Y5, 1)], 3, None),
  }


@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas"])
@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_padded_batch_with_mask_equals_unpadded_batch(name, impl):
  loss, arrays, n_diff, _ = _masked_cases(impl)[name]
  helpers.assert_padded_equals_unpadded(loss, arrays, n_diff=n_diff, rtol=2e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_mlcd_padded_batch_with_mask_equals_unpadded_batch(impl):
  centers = jnp.asarray(randn(158, 7, 3))
  positives = np.array([[0, 3], [1, 2], [6, 0], [4, 5], [2, 6]], np.int32)
  loss = lambda f, p, **kw: mlcd(f, centers, p, scale=4.0, margin=0.1, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [randn(159, 5, 3), positives], n_diff=1, rtol=2e-6)
  # ... and the gradient w.r.t. the (unmasked) centres
  padded, mask = helpers.pad_batch(1, [randn(159, 5, 3), positives], 3)
  want = jax.grad(lambda c: mlcd(randn(159, 5, 3), c, positives, scale=4.0, margin=0.1, impl=impl))(centers)
  got = jax.grad(lambda c: mlcd(padded[0], c, padded[1] % 7, scale=4.0, margin=0.1, impl=impl,
                                mask=jnp.asarray(mask)))(centers)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_reduction_none_and_sum(name):
  loss, arrays, _, anchors = _masked_cases("auto")[name]
  if anchors is None:  # the mean runs over a subset of the anchors, or over positive pairs
    if name.startswith("gated"):
      with pytest.raises(ValueError, match=r"`reduction` must be 'mean' for this loss"):
        loss(*arrays, reduction="none")
    return
  helpers.assert_reductions_agree(loss, arrays, anchors)
  helpers.assert_reductions_agree(loss, arrays, anchors, mask=np.array([1, 1, 0, 1, 1], bool))


def test_mlcd_reduction_none_and_sum():
  centers, positives = randn(160, 7, 3), np.array([[0, 3], [1, 2], [6, 0], [4, 5], [2, 6]], np.int32)
  loss = lambda f, p, **kw: mlcd(f, centers, p, scale=4.0, **kw)
  helpers.assert_reductions_agree(loss, [randn(161, 5, 3), positives], 5)
  helpers.assert_reductions_agree(loss, [randn(161, 5, 3), positives], 5, mask=np.array([1, 0, 1, 1, 1], bool))


def test_sbcl_reduction_sum_with_one_view_sums_both_terms_over_their_anchors():
  f = randn(162, 5, 3)
  per = np.asarray(sbcl(f, _Y5, _SUB5, beta=0.5, reduction="none"), np.float64)
  l1 = np.asarray(sbcl(f, _Y5, _SUB5, beta=0.0, reduction="none"), np.float64)
  np.testing.assert_allclose(float(sbcl(f, _Y5, _SUB5, beta=0.5, reduction="sum")), per.sum(), rtol=1e-6)
  # ℓ¹ alone (β = 0): only rows 1 and 4 share a (label, subclass) pair, so only they have S(i) ≠ ∅
  has1 = np.array([False, True, False, False, True])
  np.testing.assert_array_equal(l1 != 0, has1)
  np.testing.assert_allclose(float(sbcl(f, _Y5, _SUB5, beta=0.0)), l1[has1].mean(), rtol=1e-6)


def test_padding_labels_are_not_checked_against_per_class_temperatures():
  f, mask = randn(164, 6, 2, 3), np.array([True, True, True, True, True, False])
  y, sub = np.append(_Y5, 99), np.append(_SUB5, 0)
  got = sbcl(f, y, sub, class_temperature=np.array([0.3, 0.5, 0.4]), mask=mask)
  want = sbcl(f[:5], _Y5, _SUB5, class_temperature=np.array([0.3, 0.5, 0.4]))
  np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
  pos = np.array([[0, 3], [1, 2], [6, 0], [4, 5], [2, 6], [-1, 40]], np.int32)  # padding: out of range
  got = mlcd(f[:, 0], randn(165, 7, 3), pos, mask=mask)
  np.testing.assert_allclose(float(got), float(mlcd(f[:5, 0], randn(165, 7, 3), pos[:5])), rtol=2e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sbcl(ONES((4, 3)), I4, I4, mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: sbcl(ONES((4, 3)), I4, I4, reduction="avg"), r"`reduction` must be one of"),
        (lambda: focal_supcon(ONES((4, 2, 3)), I4, mask=np.ones((4, 2), bool)), r"`mask` must have shape \(4,\)"),
        (lambda: focal_supcon(ONES((4, 3)), I4, mask=np.ones(4)), r"`mask` must be a boolean array"),
        (lambda: focal_supcon(ONES((4, 3)), I4, reduction="batchmean"), r"`reduction` must be one of"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), reduction="avg"), r"`reduction` must be one of"),
        (lambda: gated_pair_infonce(ONES((4, 3)), ONES((4, 3)), ONES((3,)), query_labels=I4, pair_labels=I4,
                                    reduction="sum"), r"`reduction` must be 'mean' for this loss"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_gated_pair_infonce_mask_covers_only_the_queries_when_the_keys_are_another_batch(impl):
  keys, key_labels = jnp.asarray(randn(166, 7, 3)), np.array([0, 1, 2, 0, 1, 2, 3], np.int32)
  loss = lambda q, g, y1, y2, **kw: gated_pair_infonce(q, keys, jnp.clip(g, 0.0, 1.0), query_labels=y1, pair_labels=y2,
                                                       key_labels=key_labels, temperature=0.3, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [randn(167, 5, 3), _GATES5, _Y5, np.roll(_Y5, 1)], n_diff=2, rtol=2e-6)
