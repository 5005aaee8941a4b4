"""Tests of jaxcl/losses/snr.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.snr import snr_distance, snr_triplet
from jaxcl.losses.spherical_z import spherical_z_contrastive, spherical_z_loss
from jaxcl.losses.triplet import triplet
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.snr import ref_snr, ref_snr_triplet, ref_z_loss


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# --------------------------------------------------------------------------------------------- SNR
def test_snr_distance_matches_reference_and_is_scale_invariant():
  a, o = randn(1, 5, 6), randn(2, 5, 6)
  np.testing.assert_allclose(snr_distance(a, o), ref_snr(a.astype(np.float64), o), rtol=1e-5)
  np.testing.assert_allclose(snr_distance(3.0 * a, 3.0 * o), snr_distance(a, o), rtol=1e-5)
  # Noise equal to a constant shift has no variance: distance 0.
  np.testing.assert_allclose(snr_distance(a, a + 2.5), np.zeros(5), atol=1e-6)


@pytest.mark.parametrize("margin,reg", [(0.2, 0.001), (1.5, 0.0), (0.5, 0.05)])
def test_snr_triplet_matches_reference(margin, reg):
  # The margins put some triplets on each side of the hinge.
  assert_value_and_grads(
      lambda a, p, n: snr_triplet(a, p, n, margin=margin, reg_weight=reg),
      lambda a, p, n: ref_snr_triplet(a, p, n, margin, reg),
      [randn(3, 6, 5), randn(4, 6, 5), randn(5, 6, 5)],
  )


def test_snr_triplet_on_centred_unit_anchors_is_the_squared_euclidean_triplet():
  def centre(x):
    return x - x.mean(axis=1, keepdims=True)

  a = centre(randn(6, 7, 5))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  p, n = centre(randn(7, 7, 5)), centre(randn(8, 7, 5))
  got = jax.jit(lambda *xs: snr_triplet(*xs, margin=0.7, reg_weight=0.0))(a, p, n)
  want = jax.jit(lambda *xs: triplet(*xs, margin=0.7, squared=True, normalize=False))(a, p, n)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_snr_triplet_regulariser_is_zero_for_zero_mean_embeddings():
  a, p, n = (x - x.mean(axis=1, keepdims=True) for x in (randn(9, 4, 6), randn(10, 4, 6), randn(11, 4, 6)))
  with_reg = jax.jit(lambda *xs: snr_triplet(*xs, reg_weight=1.0))(a, p, n)
  without = jax.jit(lambda *xs: snr_triplet(*xs, reg_weight=0.0))(a, p, n)
  np.testing.assert_allclose(float(with_reg), float(without), atol=1e-5)
  assert float(jax.jit(lambda *xs: snr_triplet(*xs, reg_weight=1.0))(a + 1, p, n)) > float(without) + 1.0


# ----------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_inputs_give_float32_losses_close_to_float32():
  a, p, n = randn(20, 8, 16), randn(21, 8, 16), randn(22, 8, 16)
  losses = {
      "snr_triplet": lambda x: snr_triplet(x, p, n),
      "spherical_z_loss": lambda x: spherical_z_loss(x, np.arange(8) % 16, a=1.0, b=1.0),
      "spherical_z_contrastive": lambda x: spherical_z_contrastive(x, p, a=1.0, b=1.0),
  }
  for name, loss in losses.items():
    want = float(jax.jit(loss)(a))
    got, grad = jax.jit(jax.value_and_grad(loss))(a.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32, name
    np.testing.assert_allclose(float(got), want, rtol=3e-2, atol=1e-2, err_msg=name)
    assert bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32)))), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: snr_distance(ONES((4, 3)), ONES((4, 2))), r"`anchor` and `other` must have the same shape"),
        (lambda: snr_distance(ONES((4,)), ONES((4,))), r"`anchor` must have rank 2"),
        (lambda: snr_triplet(ONES((4, 3)), ONES((4, 3)), ONES((3, 3))), r"`anchor` and `negative` must have the same shape"),
        (lambda: snr_triplet(ONES((4, 1)), ONES((4, 1)), ONES((4, 1))), r"at least 2 features"),
        (lambda: snr_triplet(ONES((4, 3)), ONES((4, 3)), ONES((4, 3)), margin=-1.0), r"`margin` must be >= 0"),
        (lambda: snr_triplet(ONES((4, 3)), ONES((4, 3)), ONES((4, 3)), reg_weight=-1.0), r"`reg_weight` must be >= 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ---------------------------------------------------------------------------------- reduction and mask
_MASK6 = np.array([1, 1, 0, 1, 1, 1], bool)


_Z_LABELS = np.array([0, 2, 1, 3, 3, 0], np.int32)


MASKED = {
    "snr_triplet": (lambda a, p, n, **kw: snr_triplet(a, p, n, margin=1.0, reg_weight=0.1, **kw),
                    [randn(60, 6, 4), randn(61, 6, 4), randn(62, 6, 4)], 3),
    "snr_triplet_normalized": (lambda a, p, n, **kw: snr_triplet(a, p, n, margin=1.0, normalize=True, **kw),
                               [randn(60, 6, 4), randn(61, 6, 4), randn(62, 6, 4)], 3),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_padded_batch_with_mask_equals_unpadded_batch(name):
  loss, arrays, n_diff = MASKED[name]
  helpers.assert_padded_equals_unpadded(loss, arrays, n_diff=n_diff, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(MASKED))
def test_reduction_none_and_sum(name):
  loss, arrays, _ = MASKED[name]
  helpers.assert_reductions_agree(loss, arrays, 6)
  helpers.assert_reductions_agree(loss, arrays, 6, mask=_MASK6)


def test_per_sample_terms_match_references():
  a, p, n = randn(66, 5, 4), randn(67, 5, 4), randn(68, 5, 4)
  got = np.asarray(snr_triplet(a, p, n, margin=1.0, reg_weight=0.1, reduction="none"))
  want = [ref_snr_triplet(a[i:i + 1], p[i:i + 1], n[i:i + 1], 1.0, 0.1) for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  o = randn(69, 5, 3)
  y = np.array([0, 2, 1, 1, 0], np.int32)
  got = np.asarray(spherical_z_loss(o, y, a=2.0, b=1.0, reduction="none"))
  np.testing.assert_allclose(got, [ref_z_loss(o[i:i + 1], y[i:i + 1], 2.0, 1.0) for i in range(5)], rtol=1e-5)
  q, k = randn(70, 5, 4), randn(71, 5, 4)
  s = reference.common.normalize(q) @ reference.common.normalize(k).T
  got = np.asarray(spherical_z_contrastive(q, k, a=2.0, b=1.0, reduction="none"))
  np.testing.assert_allclose(got, [ref_z_loss(s[i:i + 1], [i], 2.0, 1.0) for i in range(5)], rtol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: snr_triplet(ONES((4, 3)), ONES((4, 3)), ONES((4, 3)), mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: snr_triplet(ONES((4, 3)), ONES((4, 3)), ONES((4, 3)), reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
