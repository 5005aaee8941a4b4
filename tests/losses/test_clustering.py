"""Tests of jaxcl/losses/clustering.py."""

from jax.sharding import PartitionSpec as P
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clustering import mcl_cluster_ids, mcl_nt_xent
from jaxcl.losses.clustering import mlcd, pamc, sbcl, subclass_kmeans
from jaxcl.losses.gated_pairs import gated_pair_infonce
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.supcon import focal_supcon, supcon
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.clustering import (
    ref_kmeans,
    ref_mcl,
    ref_mlcd,
    ref_ncontrast,
    ref_pamc,
    ref_sbcl,
    ref_sbcl_authors,
)


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


norm = reference.common.normalize


# ------------------------------------------------------------------------------ float64 references
def _rows(features, labels, *others):
  """(N, V, D) -> view-major (N·V, D) rows with labels (and other per-sample ids) tiled."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    return (f, np.asarray(labels)) + tuple(np.asarray(o) for o in others)
  v = f.shape[1]
  z = np.concatenate([f[:, i] for i in range(v)])
  return (z, np.tile(labels, v)) + tuple(np.tile(o, v) for o in others)


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


@pytest.mark.parametrize("impl", helpers.PADDED_TEST_ENGINES)
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
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), mask=np.ones(5, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: mlcd(ONES((4, 3)), ONES((5, 3)), np.zeros((4, 1), np.int32), reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ---------------------------------------------------------------------- reduction= and mask= (issue 12 item 9)
def _assert_mask_and_reductions(loss, arrays, n_anchors, impls=("dense", "blockwise"), n_diff=None):
  """For each engine: a padded batch with `mask` gives the unpadded loss and gradients (exactly 0 on the
  padding rows); "none" has the default value as its mean over the valid anchors and "sum" as its sum;
  a bad `mask` or `reduction` is refused naming the argument."""
  for impl in impls:
    bound = functools.partial(loss, impl=impl)
    try:
      helpers.assert_padded_equals_unpadded(bound, arrays, n_diff=n_diff, rtol=2e-6)
    except AssertionError as e:
      raise AssertionError(f"impl={impl}") from e
  b = np.shape(arrays[0])[0]
  helpers.assert_reductions_agree(loss, arrays, n_anchors)
  helpers.assert_reductions_agree(loss, arrays, n_anchors, mask=np.arange(b) != 1)
  arrays = [jnp.asarray(a) for a in arrays]
  with pytest.raises(ValueError, match="`reduction`"):
    loss(*arrays, reduction="avg")
  with pytest.raises(ValueError, match=r"`mask` must have shape \(%d,\)" % b):
    loss(*arrays, mask=jnp.ones((b + 1,), bool))
  with pytest.raises(TypeError, match="`mask` must be a boolean"):
    loss(*arrays, mask=jnp.ones((b,), jnp.int32))


# --------------------------------------------------------------------------------------------------- MCL
def test_mcl_cluster_ids_combine_stages():
  stages = np.array([[4, 4, 4, 9, 9, 9], [1, 2, 1, 1, 2, 2]])
  ids = np.asarray(mcl_cluster_ids(stages))
  for i in range(6):
    for j in range(6):
      assert (ids[i] == ids[j]) == all(stages[:, i] == stages[:, j])
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 6
  np.testing.assert_array_equal(mcl_cluster_ids(stages[0]), mcl_cluster_ids(stages[:1]))


@pytest.mark.parametrize("clusters", [[0, 1, 0, 1, 1, 2], [5, 5, 5, 7, 7, 7]])
def test_mcl_nt_xent_matches_reference(clusters):
  c = np.array(clusters, np.int32)
  assert_value_and_grads(
      lambda a, b: mcl_nt_xent(a, b, c, temperature=0.3),
      lambda a, b: ref_mcl(a, b, c, 0.3),
      [randn(17, 6, 4), randn(18, 6, 4)],
  )


def test_mcl_nt_xent_mask_and_reduction():
  clusters = np.array([0, 1, 0, 0, 1], np.int32)  # padding rows get random cluster ids in [-5, 5)
  _assert_mask_and_reductions(
      lambda a, b, c, **kw: mcl_nt_xent(a, b, c, temperature=0.3, **kw),
      [randn(42, 5, 4), randn(43, 5, 4), clusters], 10, impls=("dense", "blockwise", "pallas"), n_diff=2,
  )
  per = np.asarray(mcl_nt_xent(randn(42, 5, 4), randn(43, 5, 4), clusters, temperature=0.3, reduction="none"))
  want = ref_mcl(randn(42, 5, 4).astype(np.float64), randn(43, 5, 4).astype(np.float64), clusters, 0.3)
  np.testing.assert_allclose(per.mean(), want, rtol=1e-5)


def test_mcl_nt_xent_one_cluster_is_nt_xent_and_singletons_are_zero():
  a, b = randn(19, 5, 4), randn(20, 5, 4)
  f = jax.jit(lambda x, y: (
      mcl_nt_xent(x, y, jnp.zeros(5, jnp.int32)), nt_xent(x, y), mcl_nt_xent(x, y, jnp.arange(5))
  ))
  one, ref, single = f(a, b)
  np.testing.assert_allclose(float(one), float(ref), rtol=1e-5)
  np.testing.assert_allclose(float(single), 0.0, atol=1e-6)


BAD = [
    (lambda: mcl_nt_xent(ONES((4, 3)), ONES((4, 3)), np.zeros(3, np.int32)), r"`cluster_ids` must have shape \(4,\)"),
    (lambda: mcl_nt_xent(ONES((4, 3)), ONES((4, 3)), np.zeros(4)), r"`cluster_ids` must have an integer dtype"),
    (lambda: mcl_cluster_ids(np.zeros((2, 3))), r"`stage_cluster_ids` must be an integer array"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


# --------------------------------------------------------------------------------------------- PAMC
# A ring of 7 nodes with self-loops (both directions), weights as a normalised 2-hop adjacency would give
RING = np.array([[i, (i + d) % 7] for i in range(7) for d in (0, 1, 6)], np.int32).T
RING_WEIGHTS = np.random.default_rng(3).uniform(0.2, 1.0, RING.shape[1]).astype(np.float32)
CLUSTERS = np.array([0, 0, 1, 1, 2, 2, 0], np.int32)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_pamc_matches_reference(scale):
  helpers.assert_value_and_grads(
      lambda z: pamc(z, RING, CLUSTERS, num_clusters=3, edge_weights=RING_WEIGHTS, scale=scale),
      lambda z: ref_pamc(z, RING, RING_WEIGHTS, CLUSTERS, scale),
      [randn(60, 7, 4)], jit=True)


def test_pamc_with_every_node_its_own_cluster_is_graph_mlp_ncontrast():
  """Meta-nodes of one node each: the negatives are all N nodes, the exact loss PAMC approximates."""
  z = randn(61, 7, 4)
  adjacency = np.zeros((7, 7))
  adjacency[RING[0], RING[1]] = RING_WEIGHTS
  got = jax.jit(lambda z: pamc(z, RING, np.arange(7), num_clusters=7, edge_weights=RING_WEIGHTS, scale=1.5))(z)
  np.testing.assert_allclose(float(got), ref_ncontrast(z, adjacency, 1.5), rtol=1e-5)


def test_pamc_empty_clusters_are_left_out_and_padding_changes_nothing():
  z = randn(62, 7, 4)
  unpadded = lambda z: pamc(z, RING, CLUSTERS, num_clusters=3, edge_weights=RING_WEIGHTS)  # noqa: E731
  relabelled = np.array([0, 3, 5])[CLUSTERS]  # clusters 1, 2, 4, 6, 7 empty
  got, want = jax.jit(lambda z: (pamc(z, RING, relabelled, num_clusters=8, edge_weights=RING_WEIGHTS), unpadded(z)))(z)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  _, mask = helpers.pad_batch(63, [z], 2)  # the mask assert_padded_equals_unpadded draws with this seed
  where = np.flatnonzero(mask)  # node i of the graph is node where[i] of the padded batch
  ids = np.zeros(9, np.int32)
  ids[where] = CLUSTERS
  loss = lambda z, **kw: pamc(z, where[RING], ids, num_clusters=3, edge_weights=RING_WEIGHTS, **kw)  # noqa: E731
  helpers.assert_padded_equals_unpadded(loss, [z], n_pad=2, seed=63, unpadded_loss=unpadded, rtol=1e-5)
  helpers.assert_reductions_agree(lambda z, **kw: pamc(z, RING, CLUSTERS, num_clusters=3, **kw), [z], 7,
                                  mask=np.array([1, 1, 0, 1, 1, 1, 0], bool))


def test_pamc_bf16_and_extremes_are_finite():
  z = randn(64, 7, 4)
  loss = jax.jit(lambda z: pamc(z, RING, CLUSTERS, num_clusters=3, edge_weights=RING_WEIGHTS))
  lo = loss(jnp.asarray(z, jnp.bfloat16))
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(float(lo), float(loss(z)), rtol=2e-2)
  for x in (np.zeros_like(z), 1e30 * z):
    value, grad = jax.value_and_grad(loss)(jnp.asarray(x))
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"edges": np.array([[0, 1, 2]])}, ValueError, r"`edges` must be an integer \(2, E\) array"),
    ({"edges": np.array([[0, 3], [1, 0]])}, ValueError, r"`edges` must lie in \[0, 3\), got values in \[0, 3\]"),
    ({"cluster_ids": np.array([0, 1, 2])}, ValueError, r"`cluster_ids` must lie in \[0, 2\), got values in \[0, 2\]"),
    ({"num_clusters": 2.0}, ValueError, r"`num_clusters` must be a positive Python int, got 2.0"),
    ({"edge_weights": np.ones(3, np.float32)}, ValueError, r"`edge_weights` must have shape \(2,\), one per edge"),
    ({"edge_weights": -np.ones(2, np.float32)}, ValueError, r"`edge_weights` must be >= 0"),
])
def test_pamc_bad_inputs_raise_clear_errors(kwargs, error, match):
  args = {"edges": np.array([[0, 1], [1, 0]]), "cluster_ids": np.array([0, 1, 1]), "num_clusters": 2}
  args.update(kwargs)
  with pytest.raises(error, match=match):
    pamc(np.ones((3, 4), np.float32), args.pop("edges"), args.pop("cluster_ids"), **args)


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
def test_sbcl_sharded_equals_dense(impl, n_devices, masked):
  """The samples split over 3 or 8 devices (a padded batch on 8), two views and per-class τ₂ (replicated,
  its gradient summed over devices): the value and gradients of the one-device loss."""
  rng = np.random.default_rng(5)
  labels, sub = rng.integers(0, 3, 24), rng.integers(0, 2, 24)
  mask = np.arange(24) % 5 != 2
  loss = lambda f, y, s, tau2, m, **kw: sbcl(f, y, s, temperature=0.3, class_temperature=tau2,  # noqa: E731
                                             mask=m if masked else None, **kw)
  args = [randn(71, 24, 2, 4), labels, sub, np.array([0.4, 0.5, 0.6], np.float32), mask]
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
def test_mlcd_sharded_equals_dense(impl, n_devices, masked):
  """`mesh=`: the 24 centres split over 3 or 8 devices, the features replicated (a padded batch on 8):
  the value and gradients of the one-device loss; with reduction="none" every row comes back once."""
  positives = np.array([[0, 23, 4], [9, 10, 11], [1, 2, 3], [20, 5, 17], [8, 16, 12]])
  mask = np.array([True, False, True, True, True])
  loss = lambda f, c, p, m, **kw: mlcd(f, c, p, scale=8.0, margin=0.1, mask=m if masked else None, **kw)  # noqa: E731
  args = [randn(18, 5, 6), randn(19, 24, 6), positives, mask]
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)
  if masked:
    none = lambda **kw: jax.jit(lambda f, c: mlcd(f, c, positives, scale=8.0, reduction="none", **kw))(  # noqa: E731
        *args[:2])
    np.testing.assert_allclose(np.asarray(none(impl=impl, mesh=helpers.device_mesh(n_devices))),
                               np.asarray(none()), rtol=1e-5)
