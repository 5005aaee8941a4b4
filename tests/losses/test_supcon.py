"""Tests of jaxcl/losses/supcon.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.multiview import multiview_infonce, mv_dhel
from jaxcl.losses.supcon import focal_supcon, supcon
from jaxcl.ops import blockwise
from jaxcl.ops import engines
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.supcon import ref_focal_supcon


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# ------------------------------------------------------------------------------------------------ SupCon
SUPCON_CASES = [
    # (features shape, labels, temperature)
    ((6, 4), [0, 1, 0, 2, 1, 0], 0.1),
    ((5, 3), [3, 3, 7, 7, 7], 0.5),
    ((4, 2, 5), [0, 1, 2, 3], 0.1),  # two views, distinct labels: positives are the other views
    ((5, 3, 4), [1, 0, 1, 2, 2], 0.5),
    ((6, 4), [9, -4, 9, 100, -4, 5], 0.2),  # sparse/negative values; 100 and 5 have no positive
]


@pytest.mark.parametrize("shape,labels,temperature", SUPCON_CASES)
def test_supcon_matches_reference(shape, labels, temperature):
  labels = np.array(labels, np.int32)
  assert_value_and_grads(
      lambda f: supcon(f, labels, temperature=temperature),
      lambda f: reference.supcon.supcon(f, labels, temperature),
      [randn(1, *shape)],
  )


def test_supcon_base_temperature_and_unnormalized_match_reference():
  f, labels = randn(2, 6, 2, 3), np.array([0, 1, 1, 0, 2, 2])
  assert_value_and_grads(
      lambda x: supcon(x, labels, temperature=0.2, base_temperature=0.07),
      lambda x: reference.supcon.supcon(x, labels, 0.2, base_temperature=0.07),
      [f],
  )
  assert_value_and_grads(
      lambda x: supcon(x, labels, temperature=2.0, normalize=False),
      lambda x: reference.supcon.supcon(x, labels, 2.0, normalize_=False),
      [0.3 * f],
  )


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16)])
def test_supcon_two_views_distinct_labels_is_nt_xent(b, d):
  # Distinct labels: each anchor's only positive is its other view and the denominator is every other
  # view, which is exactly NT-Xent over [z1; z2].
  z1, z2 = randn(3, b, d), randn(4, b, d)
  got = jax.jit(lambda a, c: supcon(jnp.stack([a, c], axis=1), np.arange(b), temperature=0.3))(z1, z2)
  want = jax.jit(lambda a, c: nt_xent(a, c, temperature=0.3))(z1, z2)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_supcon_is_invariant_to_label_values_and_sample_order():
  f, labels = randn(5, 7, 2, 4), np.array([0, 1, 1, 2, 0, 2, 1])
  loss = jax.jit(supcon)
  base = float(loss(f, labels))
  relabelled = np.array([50, -3, -3, 7, 50, 7, -3])
  np.testing.assert_allclose(float(loss(f, relabelled)), base, rtol=1e-6)
  perm = np.random.default_rng(0).permutation(7)
  np.testing.assert_allclose(float(loss(f[perm], labels[perm])), base, rtol=1e-5)


def test_supcon_anchors_without_positive_are_left_out():
  # Label 2 is a singleton: its anchor is dropped, so the loss is the mean over the other five anchors.
  f, labels = randn(6, 6, 3), np.array([0, 0, 1, 1, 0, 2])
  z = reference.common.normalize(f)
  s = z @ z.T / 0.1
  per_anchor = []
  for a in range(5):
    pos = [p for p in range(6) if p != a and labels[p] == labels[a]]
    per_anchor.append(reference.common.logsumexp(np.delete(s[a], a)) - np.mean(s[a, pos]))
  got = jax.jit(lambda x: supcon(x, labels))(f)
  np.testing.assert_allclose(float(got), np.mean(per_anchor), rtol=1e-5)


def test_supcon_without_any_positive():
  f = randn(7, 4, 3)
  with pytest.raises(ValueError, match="no anchor has a positive"):
    supcon(f, np.arange(4))
  # Labels only known at run time: no error is possible, the empty mean is 0.
  value, g = jax.jit(jax.value_and_grad(supcon))(jnp.asarray(f), jnp.arange(4))
  assert float(value) == 0.0
  assert np.all(np.asarray(g) == 0.0)


def test_supcon_traced_labels_match_concrete():
  f, labels = randn(8, 6, 2, 3), jnp.array([2, 0, 2, 1, 1, 0])
  want = reference.supcon.supcon(f, np.asarray(labels))
  np.testing.assert_allclose(float(jax.jit(supcon)(f, labels)), want, rtol=1e-5)


# ------------------------------------------------------------------------------------- engines (impl=)
def test_every_available_engine_agrees_with_dense():
  # Values and gradients of every loss under every registered engine against the dense engine; the
  # masks (exclude=diagonal, include=view ids) and per-modality contexts go through each engine.
  f, labels = randn(60, 6, 2, 4), np.array([0, 1, 0, 2, 1, 2])
  views = randn(61, 3, 4, 4)
  x, y, z = randn(62, 5, 4), randn(63, 5, 4), randn(64, 5, 4)
  calls = {
      "supcon": (lambda impl: lambda a: supcon(a, labels, temperature=0.2, impl=impl), (f,)),
      "multiview_infonce": (lambda impl: lambda a: multiview_infonce(a, impl=impl), (views,)),
      "mv_dhel": (lambda impl: lambda a: mv_dhel(a, temperature=0.2, impl=impl), (views,)),
      "cwcl": (lambda impl: lambda a, b: cwcl(a, b, impl=impl), (x, y)),
      "symile": (lambda impl: lambda a, b, c: symile(a, b, c, logit_scale=10.0, impl=impl), (x, y, z)),
  }
  impls = helpers.engines()
  for name, (make, args) in calls.items():
    argnums = tuple(range(len(args)))
    # One compiled program per loss evaluating every engine side by side.
    out = jax.jit(lambda *xs: [jax.value_and_grad(make(i), argnums=argnums)(*xs) for i in impls])(*args)
    want_value, want_grads = out[impls.index("dense")]
    for impl, (value, grads) in zip(impls, out):
      np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=f"{name} {impl}")
      for g, want in zip(grads, want_grads):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")


# --------------------------------------------------------------------------- transforms, dtypes, extremes
# Each entry: (loss of float arrays, its float64 reference, input shapes).
LABELS = jnp.array([0, 1, 0, 1, 2, 2])


LOSSES = {
    "supcon": (
        lambda x: supcon(x, LABELS, temperature=0.1),
        lambda x: reference.supcon.supcon(x, np.asarray(LABELS), 0.1),
        [(6, 2, 8)],
    ),
    "supcon_single_view": (
        lambda x: supcon(x, LABELS, temperature=0.1),
        lambda x: reference.supcon.supcon(x, np.asarray(LABELS), 0.1),
        [(6, 8)],
    ),
}


def _inputs(name, seed, batch=()):
  return [randn(seed + k, *batch, *shape) for k, shape in enumerate(LOSSES[name][2])]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_jit_grad_vmap(name):
  fn, np_fn, _ = LOSSES[name]
  xs = _inputs(name, 70, batch=(3,))
  want = np.array([np_fn(*[x[i] for x in xs]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(*xs)), want, rtol=2e-5)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(len(xs)))))(*[x[0] for x in xs])
  for g, x in zip(grads, xs):
    assert g.shape == x[0].shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_inputs_close_to_fp32(name):
  fn, np_fn, _ = LOSSES[name]
  xs = [x.astype(jnp.bfloat16) for x in _inputs(name, 80)]
  value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))
  lo, grads = value_and_grad(*map(jnp.asarray, xs))
  assert lo.dtype == jnp.float32
  # Against the float64 loss of the same (bf16-rounded) inputs: only the bf16 matmul operands differ.
  want = np_fn(*[np.asarray(x, np.float64) for x in xs])
  np.testing.assert_allclose(float(lo), want, rtol=3e-2, atol=3e-2)
  for g in grads:
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_extremes_are_finite(name):
  fn = LOSSES[name][0]
  xs = _inputs(name, 90)
  cases = [
      xs,
      [x * 1e-12 for x in xs],
      [np.zeros_like(xs[0])] + xs[1:],
      [x * 1e6 for x in xs],
      [xs[0] for _ in xs],  # every modality / view identical
  ]
  value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))
  for case in cases:
    value, grads = value_and_grad(*map(jnp.asarray, case))
    assert np.isfinite(float(value)), name
    assert all(np.all(np.isfinite(g)) for g in grads), name


COLD = {
    "supcon": (
        lambda x: supcon(x, LABELS, temperature=0.01),
        lambda x: reference.supcon.supcon(x, np.asarray(LABELS), 0.01),
        [(6, 2, 8)],
    ),
}


@pytest.mark.parametrize("name", sorted(COLD))
def test_low_temperature_and_high_scale_are_finite_and_accurate(name):
  # τ = 0.01 (logit scale 1000 for Symile): logits up to ±100, the self-similarity 1/τ = 100 sits in the
  # excluded entries of SupCon / MV-DHEL and must not leak an overflow into the gradients.
  fn, np_fn, shapes = COLD[name]
  xs = [randn(100 + k, *shape) for k, shape in enumerate(shapes)]
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(xs)))))(*xs)
  np.testing.assert_allclose(float(value), np_fn(*[np.asarray(x, np.float64) for x in xs]), rtol=1e-4)
  for g in grads:
    assert np.all(np.isfinite(g)), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: supcon(ONES((4,)), np.arange(4)), r"`features` must have rank 2 or rank 3, got shape \(4,\)"),
        (lambda: supcon(ONES((4, 2, 2, 3)), np.arange(4)), r"`features` must have rank 2 or rank 3"),
        (lambda: supcon(ONES((4, 3)), np.arange(5)), r"`labels` must have shape \(4,\), got \(5,\)"),
        (lambda: supcon(ONES((4, 3)), np.zeros((4, 1), np.int32)), r"`labels` must have shape \(4,\)"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.float32)), r"`labels` must have an integer dtype"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), temperature=0.0), r"`temperature` must be positive"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), base_temperature=-1.0), r"`base_temperature` must be positive"),
        (lambda: supcon(ONES((1, 2, 3)), np.zeros(1, np.int32)), r"`features` needs at least 2 examples"),
        (lambda: supcon(np.ones((4, 3), np.int32), np.zeros(4, np.int32)), r"`features` must be a floating-point array"),
        (lambda: supcon(ONES((4, 3)), np.arange(4)), r"no anchor has a positive"),
        (lambda: supcon(ONES((4, 3)), np.zeros(4, np.int32), impl="nope"), r"`impl` must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas"])
@pytest.mark.parametrize("views", [1, 2])
def test_supcon_padded_batch_with_mask_equals_unpadded_batch(impl, views, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  features = randn(90, 6, 4) if views == 1 else randn(90, 6, views, 4)
  labels = np.array([0, 1, 0, 1, 2, 3], np.int32)  # label 3 has no positive with one view
  loss = lambda f, y, **kw: supcon(f, y, temperature=0.1, base_temperature=0.07, impl=impl, **kw)
  helpers.assert_padded_equals_unpadded(loss, [features, labels], n_diff=1)


def test_supcon_reduction_none_and_sum():
  features, labels = jnp.asarray(randn(91, 5, 2, 4)), jnp.array([0, 1, 0, 2, 2])
  mask = jnp.array([True, True, False, True, True])
  for kw in ({}, {"mask": mask}):
    per = np.asarray(supcon(features, labels, reduction="none", **kw), np.float64)
    assert per.shape == (10,)
    valid = np.ones(10, bool) if not kw else np.tile(np.asarray(mask), 2)
    assert np.all(per[~valid] == 0)
    # two views: every valid anchor has a positive, so the mean runs over all valid anchors
    np.testing.assert_allclose(per.sum() / valid.sum(), float(supcon(features, labels, **kw)), rtol=1e-6)
    np.testing.assert_allclose(float(supcon(features, labels, reduction="sum", **kw)), per.sum(), rtol=1e-6)


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
  want = reference.common.numerical_grad(lambda x: ref_focal_supcon(f, labels, 0.3, x[()]), np.array(1.5))
  np.testing.assert_allclose(float(g), want, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad inputs


I4 = np.arange(4, dtype=np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: focal_supcon(ONES((4,)), I4), r"`features` must have rank 2 or rank 3"),
        (lambda: focal_supcon(ONES((4, 3)), I4, gamma=-1.0), r"`gamma` must be >= 0"),
        (lambda: focal_supcon(ONES((4, 3)), I4.astype(np.float32)), r"`labels` must have an integer dtype"),
    ],
)
def test_focal_supcon_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: focal_supcon(ONES((4, 2, 3)), I4, mask=np.ones((4, 2), bool)), r"`mask` must have shape \(4,\)"),
        (lambda: focal_supcon(ONES((4, 3)), I4, mask=np.ones(4)), r"`mask` must be a boolean array"),
        (lambda: focal_supcon(ONES((4, 3)), I4, reduction="batchmean"), r"`reduction` must be one of"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl,n_devices", [("ring", 3), ("allgather", 8)])
def test_focal_supcon_sharded_equals_dense(impl, n_devices, monkeypatch):
  """Two views of 24 samples split over 3 (ring) and 8 (allgather) devices: the dense loss and gradients,
  averaged over the positives (γ = 2) and over the global rows with padding samples (γ = 1). On 3
  devices the positive sum runs in column tiles (`_tiled.row_sum`), on 8 densely."""
  if impl == "ring":
    monkeypatch.setattr(engines, "DENSE_MAX_ELEMENTS", 1)  # "auto" tiles the local positive sum
  features = randn(0, 24, 2, 6)
  labels = jnp.arange(24) % 5 - 2  # negative labels too: they are compared as they are across devices
  mask = jnp.arange(24) % 7 != 3
  loss = lambda f, y, m, **kw: focal_supcon(f, y, temperature=0.5, gamma=2.0, average="positives", mask=m, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(loss, [features, labels, jnp.ones(24, bool)], impl=impl, n_devices=n_devices)
  loss = lambda f, y, m, **kw: focal_supcon(f, y, temperature=0.5, mask=m, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(loss, [features, labels, mask], impl=impl, n_devices=n_devices)
