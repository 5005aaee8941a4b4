"""Tests of jaxcl/losses/spatial.py: PatchNCE, CPC and PixPro against the float64 references (values and
finite-difference gradients), their identities with infonce / negative_cosine, padding masks, engines,
bf16 inputs and bad inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.losses.spatial import cpc, patch_nce, pixpro
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference

ref = reference.spatial


# -------------------------------------------------------------------------------------------- PatchNCE
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_patch_nce_two_layers_match_the_reference(negatives):
  # layer 1 a (B, H, W, D) map, layer 2 (B, P, D) patches of another width
  q1, k1, q2, k2 = randn(1, 2, 2, 2, 4), randn(2, 2, 2, 2, 4), randn(3, 2, 3, 5), randn(4, 2, 3, 5)
  loss = lambda a, b, c, d: patch_nce([a, c], [b, d], temperature=0.5, negatives=negatives, detach_key=False)  # noqa: E731
  want = lambda a, b, c, d: ref.patch_nce([a.reshape(2, 4, 4), c], [b.reshape(2, 4, 4), d], 0.5, negatives)  # noqa: E731
  assert_value_and_grads(loss, want, [q1, k1, q2, k2], jit=True)


def test_patch_nce_is_infonce_over_one_image_patches_and_detaches_the_keys():
  q, k = randn(5, 6, 4), randn(6, 6, 4)
  run = jax.jit(lambda q, k: (
      jax.value_and_grad(lambda q, k: patch_nce(q[None], k[None], detach_key=False), argnums=(0, 1))(q, k),
      jax.value_and_grad(lambda q, k: losses.infonce(q, k, temperature=0.07), argnums=(0, 1))(q, k),
      jax.grad(lambda k: patch_nce(q[None], k[None]))(k),
      patch_nce(q.reshape(2, 3, 4), k.reshape(2, 3, 4), negatives="batch"),
      losses.infonce(q, k, temperature=0.07),
  ))
  (got, got_g), (want, want_g), detached_g, batch, flat = run(q, k)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(detached_g) == 0) and np.any(np.asarray(want_g[1]) != 0)
  np.testing.assert_allclose(float(batch), float(flat), rtol=1e-6)  # every patch of the batch: flat InfoNCE


def test_patch_nce_reduction_mask_and_sampling():
  q, k = randn(7, 3, 4, 5), randn(8, 3, 4, 5)
  (qp, kp), mask = helpers.pad_batch(9, [q, k], 2)
  key = jax.random.key(0)
  run = jax.jit(lambda q, k, qp, kp, mask: (
      patch_nce(q, k, reduction="none"), patch_nce(q, k, reduction="sum"),
      patch_nce(qp, kp, mask=mask), patch_nce(qp, kp, mask=mask, negatives="batch"),
      patch_nce(q, k, num_patches=2, rng=key), patch_nce(q, k, num_patches=4, rng=key),
      patch_nce([q, q], [k, k], reduction="none")))
  per_patch, total, masked, masked_batch, sampled, all_drawn, per_layer = run(q, k, qp, kp, mask)
  assert per_patch.shape == (3, 4)
  np.testing.assert_allclose(float(total), ref.patch_nce(q, k) * 12, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.mean(per_patch)), ref.patch_nce(q, k), rtol=1e-5)
  np.testing.assert_allclose(float(masked), ref.patch_nce(q, k), rtol=1e-5)
  np.testing.assert_allclose(float(masked_batch), ref.patch_nce(qp, kp, negatives="batch", mask=mask), rtol=1e-5)
  # Two positions drawn, the same for every image and for query and key: the loss of one of the pairs.
  pairs = [ref.patch_nce(q[:, list(ids)], k[:, list(ids)]) for ids in itertools.combinations(range(4), 2)]
  assert np.min(np.abs(np.array(pairs) - float(sampled))) < 1e-5 * abs(float(sampled))
  np.testing.assert_allclose(float(all_drawn), ref.patch_nce(q, k), rtol=1e-5)
  assert isinstance(per_layer, tuple) and len(per_layer) == 2 and per_layer[1].shape == (3, 4)


# ------------------------------------------------------------------------------------------------ CPC
@pytest.mark.parametrize("shape,offsets,temperature", [((2, 3, 2, 3), (1, 2), 1.0), ((2, 4, 3), (2,), 0.5)])
def test_cpc_matches_the_reference(shape, offsets, temperature):
  z, p = randn(10, *shape), randn(11, len(offsets), *shape)
  loss = lambda p, z: cpc(p, z, offsets=offsets, temperature=temperature)  # noqa: E731
  assert_value_and_grads(loss, lambda p, z: ref.cpc(p, z, offsets, temperature), [p, z], jit=True)


def test_cpc_is_infonce_with_the_other_positions_as_negatives():
  z, p = randn(12, 2, 3, 4), randn(13, 1, 2, 3, 4)
  anchors = p[0, :, :2].reshape(4, 4)  # offset 1: the first two steps of each sequence have a target
  targets = z[:, 1:].reshape(4, 4)
  everything = z.reshape(6, 4)
  others = np.stack([np.delete(everything, 3 * (i // 2) + i % 2 + 1, axis=0) for i in range(4)])
  run = jax.jit(lambda: (
      cpc(p, z), losses.infonce(anchors, targets, temperature=1.0, normalize=False, negatives=others,
                               in_batch_negatives=False),
      cpc(p, z, normalize=True, temperature=0.1),
      losses.infonce(anchors, targets, temperature=0.1, negatives=others, in_batch_negatives=False)))
  got, want, got_cos, want_cos = run()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(got_cos), float(want_cos), rtol=1e-6)


def test_cpc_reduction_and_mask():
  z, p = randn(14, 3, 3, 2, 3), randn(15, 2, 3, 3, 2, 3)
  (zp,), mask = helpers.pad_batch(16, [z], 1)
  pp = np.zeros((2, 4, 3, 2, 3), np.float32)
  pp[:, mask], pp[:, ~mask] = p, 1e3
  run = jax.jit(lambda: (cpc(p, z, reduction="none"), cpc(p, z, reduction="sum"), cpc(pp, zp, mask=mask),
                         cpc(pp, zp, mask=mask, reduction="none")))
  per_anchor, total, masked, masked_none = run()
  assert per_anchor.shape == (2, 3, 3, 2)
  assert np.all(np.asarray(per_anchor)[0, :, 2] == 0) and np.all(np.asarray(per_anchor)[1, :, 1:] == 0)
  assert np.all(np.asarray(per_anchor)[0, :, :2] > 0)
  np.testing.assert_allclose(float(total), float(jnp.sum(per_anchor)), rtol=1e-6)
  want = float(jnp.sum(per_anchor[0]) / 12 + jnp.sum(per_anchor[1]) / 6)
  np.testing.assert_allclose(float(masked), want, rtol=1e-5)
  np.testing.assert_allclose(float(masked), ref.cpc(p, z, (1, 2)), rtol=1e-5)
  assert np.all(np.asarray(masked_none)[:, ~mask] == 0)


def test_patch_nce_and_cpc_agree_on_every_engine():
  q, k = randn(17, 2, 6, 8), randn(18, 2, 6, 8)
  p, z = randn(19, 2, 2, 3, 2, 8), randn(20, 2, 3, 2, 8)

  def make(impl):
    return lambda q, k, p, z: patch_nce(q, k, impl=impl, detach_key=False) + cpc(p, z, impl=impl)

  helpers.assert_engines_agree("patch_nce + cpc", make, [jnp.asarray(x) for x in (q, k, p, z)])


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
@pytest.mark.parametrize("name", ["patch_nce_image", "patch_nce_batch", "cpc"])
def test_sharded_equals_dense(name, impl, n_devices, masked):
  """The images split over 3 or 8 devices (a padded batch on 8): the value and gradients of the
  one-device loss (patch_nce: the keys not detached, one map, or two layers with the batch's negatives;
  cpc: a grid, two offsets), and on 8 the per-patch / per-position losses of reduction="none" split
  like the batch (a tuple of layers for patch_nce)."""
  mask = np.arange(24) % 5 != 2
  pick = lambda m: m if masked else None  # noqa: E731
  if name == "cpc":
    loss = lambda p, z, m, **kw: cpc(p, z, offsets=(1, 2), temperature=0.5, mask=pick(m), **kw)  # noqa: E731
    args = [randn(40, 2, 24, 3, 2, 4), randn(41, 24, 3, 2, 4), mask]
  elif name == "patch_nce_image":  # one (B, H, W, D) map
    loss = lambda q, k, m, **kw: patch_nce(  # noqa: E731
        q, k, temperature=0.5, negatives="image", detach_key=False, mask=pick(m), **kw)
    args = [randn(42, 24, 2, 2, 4), randn(43, 24, 2, 2, 4), mask]
  else:  # two layers, a map and (B, P, D) patches
    loss = lambda q1, k1, q2, k2, m, **kw: patch_nce(  # noqa: E731
        [q1, q2], [k1, k2], temperature=0.5, negatives="batch", detach_key=False, mask=pick(m), **kw)
    args = [randn(42, 24, 2, 2, 4), randn(43, 24, 2, 2, 4), randn(44, 24, 3, 5), randn(45, 24, 3, 5), mask]
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)
  if masked:
    mesh = helpers.device_mesh(n_devices)
    got, want = jax.jit(lambda *a: (loss(*a, impl=impl, mesh=mesh, reduction="none"),
                                    loss(*a, impl="dense", reduction="none")))(*args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- PixPro
BOX_Q = np.array([[0.0, 0.0, 0.6, 0.6], [0.1, 0.2, 0.9, 0.8]], np.float32)
BOX_K = np.array([[0.3, 0.3, 0.9, 0.9], [0.9, 0.1, 0.2, 0.7]], np.float32)  # the second view flipped


def test_pixpro_matches_the_reference_and_detaches_the_key():
  q, v, k = randn(21, 2, 2, 3, 3), randn(22, 2, 2, 3, 3), randn(23, 2, 3, 3, 3)
  pairs = ref.pixpro_pairs(BOX_Q, (2, 3), BOX_K, (3, 3))
  assert np.all(pairs.sum(axis=(1, 2)) > 0) and not np.all(pairs)  # some pairs positive, not all
  loss = lambda q, v: pixpro(q, k, BOX_Q, BOX_K, value=v, sharpness=2.0)  # noqa: E731
  assert_value_and_grads(loss, lambda q, v: ref.pixpro(q, k, BOX_Q, BOX_K, value=v), [q, v], jit=True)
  identity = lambda q: pixpro(q, k, BOX_Q, BOX_K, sharpness=3.0, threshold=1.2)  # noqa: E731
  assert_value_and_grads(identity, lambda q: ref.pixpro(q, k, BOX_Q, BOX_K, sharpness=3.0, threshold=1.2), [q],
                         jit=True)
  g_k = jax.jit(jax.grad(lambda k: pixpro(q, k, BOX_Q, BOX_K, value=v)))(k)
  assert np.all(np.asarray(g_k) == 0)


def test_pixpro_identities_flip_and_mask():
  q, v, k = randn(24, 3, 1, 1, 4), randn(25, 3, 1, 1, 4), randn(26, 3, 1, 1, 4)
  box = np.tile(np.array([[0.2, 0.1, 0.7, 0.9]], np.float32), (3, 1))
  x, kk = randn(27, 2, 3, 3, 4), randn(28, 2, 3, 3, 4)
  (xp, kp, bp), mask = helpers.pad_batch(29, [x, kk, BOX_Q], 1)
  flipped = BOX_Q[:, [2, 1, 0, 3]]
  run = jax.jit(lambda: (
      pixpro(q, k, box, box, value=v), losses.negative_cosine(v.reshape(3, 4), k.reshape(3, 4)),
      pixpro(x, kk, BOX_Q, BOX_Q), pixpro(x, kk[:, :, ::-1], BOX_Q, flipped),
      pixpro(xp, kp, bp, bp, mask=mask), pixpro(x, kk, BOX_Q, BOX_Q, reduction="none")))
  one_pixel, neg_cos, same, mirrored, masked, per_image = run()
  np.testing.assert_allclose(float(one_pixel), float(neg_cos), rtol=1e-6)
  # A flipped key view, its map mirrored back: the same pairs, the same loss.
  np.testing.assert_allclose(float(mirrored), float(same), rtol=1e-6)
  np.testing.assert_allclose(float(masked), float(same), rtol=1e-6)
  assert per_image.shape == (2,)
  np.testing.assert_allclose(float(same), ref.pixpro(x, kk, BOX_Q, BOX_Q), rtol=1e-5)


# ----------------------------------------------------------------------------------------- bf16 inputs
def test_bf16_inputs_close_to_fp32():
  base = randn(30, 2, 3, 3, 8)
  a, b = (base + 0.5 * randn(31 + i, 2, 3, 3, 8) for i in range(2))
  p = np.stack([a, b])
  calls = [lambda a, b, p: patch_nce(a, b, detach_key=False), lambda a, b, p: cpc(p, a, normalize=True),
           lambda a, b, p: pixpro(a, b, BOX_Q, BOX_K, value=b)]
  hi = jax.jit(lambda *xs: [f(*xs) for f in calls])(*[jnp.asarray(x) for x in (a, b, p)])
  run = jax.jit(lambda *xs: [jax.value_and_grad(f, argnums=(0, 1, 2))(*xs) for f in calls])
  lo = run(*[jnp.asarray(x, jnp.bfloat16) for x in (a, b, p)])
  for (v_lo, g_lo), v_hi in zip(lo, hi):
    assert v_lo.dtype == jnp.float32
    np.testing.assert_allclose(float(v_lo), float(v_hi), rtol=3e-2, atol=1e-2)
    assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in g_lo)


# ------------------------------------------------------------------------------------------ bad inputs
X = np.ones((2, 3, 4), np.float32)
MAP = np.ones((2, 2, 2, 4), np.float32)
BOX = np.ones((2, 4), np.float32)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: patch_nce(X, X[:, :2]), ValueError, r"`feat_q` and `feat_k` must have the same shape"),
        (lambda: patch_nce([X], X), ValueError, r"same layers, got a list of 1 and one array"),
        (lambda: patch_nce([X, X], [X]), ValueError, r"same layers, got a list of 2 and a list of 1"),
        (lambda: patch_nce([X, X[:1]], [X, X[:1]]), ValueError, r"batch size 2 of `feat_q\[0\]`.*`feat_q\[1\]`"),
        (lambda: patch_nce(X[:, :1], X[:, :1]), ValueError, r"at least 2 patches per image.*\(2, 1, 4\)"),
        (lambda: patch_nce(X, X, negatives="all"), ValueError, r"`negatives` must be one of"),
        (lambda: patch_nce(X, X, num_patches=2), ValueError, r"`num_patches` needs `rng`"),
        (lambda: patch_nce(X, X, num_patches=0, rng=jax.random.key(0)), ValueError, r"positive int, got 0"),
        (lambda: patch_nce(X, X, temperature=0.0), ValueError, r"`temperature` must be positive"),
        (lambda: patch_nce(X[0], X[0]), ValueError, r"`feat_q` must have rank 3 or rank 4"),
        (lambda: cpc(X[None], X, offsets=(3,)), ValueError, r"`offsets` must be in \[1, 2\].*\(3,\)"),
        (lambda: cpc(X[None], X, offsets=(1, 2)), ValueError, r"`offsets` must be a sequence of K = 1 ints.*\(1, 2\)"),
        (lambda: cpc(X, X), ValueError, r"`predictions` must have rank 4"),
        (lambda: cpc(X[None, :, :2], X), ValueError, r"`predictions` must have shape \(K,\) \+ \(2, 3, 4\)"),
        (lambda: cpc(X[None], X, mask=np.ones(3, bool)), ValueError, r"`mask` must have shape \(2,\)"),
        (lambda: pixpro(MAP, MAP[..., :3], BOX, BOX), ValueError, r"`key` must have shape \(2, H', W', 4\)"),
        (lambda: pixpro(MAP, MAP, BOX[:, :3], BOX), ValueError, r"`query_box` must have shape \(2, 4\)"),
        (lambda: pixpro(MAP, MAP, BOX, BOX, value=MAP[:, :1]), ValueError, r"`query` and `value` must have the same shape"),
        (lambda: pixpro(MAP, MAP, BOX, BOX, sharpness=0.0), ValueError, r"`sharpness` must be positive"),
        (lambda: pixpro(MAP, MAP, BOX, BOX, threshold=-1.0), ValueError, r"`threshold` must be positive"),
        (lambda: pixpro(X, X, BOX, BOX), ValueError, r"`query` must have rank 4"),
        (lambda: pixpro(MAP, MAP, BOX, BOX, reduction="max"), ValueError, r"`reduction` must be one of"),
    ],
)
def test_bad_inputs_are_refused_naming_the_argument(call, error, match):
  with pytest.raises(error, match=match):
    call()
