"""Tests of jaxcl/losses/spherical_z.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.snr import snr_triplet
from jaxcl.losses.spherical_z import spherical_z_contrastive, spherical_z_loss
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.snr import ref_z_loss


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# ------------------------------------------------------------------------------------------ Z-loss
@pytest.mark.parametrize("a,b", [(1.0, 1.0), (5.0, 2.0), (0.3, -0.5)])
def test_spherical_z_loss_matches_reference(a, b):
  labels = np.array([0, 3, 2, 2, 1])
  assert_value_and_grads(
      lambda o: spherical_z_loss(o, labels, a=a, b=b),
      lambda o: ref_z_loss(o, labels, a, b),
      [2.0 * randn(12, 5, 4)],
  )


def test_spherical_z_loss_is_shift_and_scale_invariant():
  o, labels = randn(13, 6, 5), np.array([4, 0, 1, 2, 3, 0])
  loss = jax.jit(lambda x: spherical_z_loss(x, labels, a=2.0, b=1.0))
  np.testing.assert_allclose(float(loss(7.0 * o - 3.0)), float(loss(o)), rtol=1e-5)


def test_spherical_z_loss_hyperparameter_gradients():
  o, labels = randn(14, 4, 3), np.array([0, 1, 2, 0])
  ga, gb = jax.jit(jax.grad(lambda a, b: spherical_z_loss(o, labels, a=a, b=b), argnums=(0, 1)))(1.5, 0.5)
  want_a = reference.common.numerical_grad(lambda x: ref_z_loss(o, labels, x[()], 0.5), np.array(1.5))
  want_b = reference.common.numerical_grad(lambda x: ref_z_loss(o, labels, 1.5, x[()]), np.array(0.5))
  np.testing.assert_allclose([float(ga), float(gb)], [want_a, want_b], rtol=1e-4)


def test_spherical_z_loss_sharp_limit_is_a_hinge_on_the_z_score():
  # (1/a) softplus(a x) -> max(x, 0) as a grows: the loss becomes mean relu(b − z_y).
  o, labels = randn(15, 5, 4), np.array([0, 1, 2, 3, 0])
  o64 = o.astype(np.float64)
  z = (o64[np.arange(5), labels] - o64.mean(1)) / o64.std(1)
  got = spherical_z_loss(o, labels, a=1e4, b=0.5)
  np.testing.assert_allclose(float(got), np.mean(np.maximum(0.5 - z, 0.0)), atol=1e-4)


def test_spherical_z_contrastive_is_the_z_loss_of_the_similarity_matrix():
  q, k = randn(16, 6, 5), randn(17, 6, 5)
  got = jax.jit(lambda x, y: spherical_z_contrastive(x, y, a=2.0, b=1.0))(q, k)
  s = reference.common.normalize(q) @ reference.common.normalize(k).T
  np.testing.assert_allclose(float(got), ref_z_loss(s, np.arange(6), 2.0, 1.0), rtol=1e-5)
  # ... and its gradients are the dense Z-loss ones.
  assert_value_and_grads(
      lambda x, y: spherical_z_contrastive(x, y, a=2.0, b=1.0),
      lambda x, y: ref_z_loss(reference.common.normalize(x) @ reference.common.normalize(y).T, np.arange(6), 2.0, 1.0),
      [q, k],
  )


def test_constant_inputs_stay_finite():
  ones, zeros = jnp.ones((3, 4)), np.zeros(3, np.int32)
  value, grad = jax.jit(jax.value_and_grad(lambda o: spherical_z_loss(o, zeros, a=1.0, b=1.0)))(ones)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda x: snr_triplet(x, x + 1.0, -x)))(ones)))


# ------------------------------------------------------------------------------------------ bad inputs
ONES = functools.partial(np.ones, dtype=np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: spherical_z_loss(ONES((4, 1)), np.zeros(4, np.int32), a=1.0, b=1.0), r"at least 2 classes"),
        (lambda: spherical_z_loss(ONES((4, 3)), np.zeros(3, np.int32), a=1.0, b=1.0), r"`labels` must have shape \(4,\)"),
        (lambda: spherical_z_loss(ONES((4, 3)), np.full(4, 3), a=1.0, b=1.0), r"`labels` must lie in \[0, 3\)"),
        (lambda: spherical_z_loss(ONES((4, 3)), np.zeros(4, np.int32), a=0.0, b=1.0), r"`a` must be positive"),
        (lambda: spherical_z_loss(ONES((4, 3)), np.zeros(4, np.int32), a=1.0, b=np.inf), r"`b` must be finite"),
        (lambda: spherical_z_contrastive(ONES((4, 3)), ONES((5, 3)), a=1.0, b=1.0), r"`query` and `key` must have the same shape"),
        (lambda: spherical_z_contrastive(ONES((1, 3)), ONES((1, 3)), a=1.0, b=1.0), r"`query` needs at least 2 examples"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ---------------------------------------------------------------------------------- reduction and mask
_MASK6 = np.array([1, 1, 0, 1, 1, 1], bool)


_Z_LABELS = np.array([0, 2, 1, 3, 3, 0], np.int32)


MASKED = {
    "spherical_z_loss": (lambda o, y, **kw: spherical_z_loss(o, y, a=2.0, b=1.0, **kw),
                         [randn(63, 6, 4), _Z_LABELS], 1),
    "spherical_z_contrastive": (lambda q, k, **kw: spherical_z_contrastive(q, k, a=2.0, b=1.0, **kw),
                                [randn(64, 6, 4), randn(65, 6, 4)], 2),
    "spherical_z_contrastive_raw": (
        lambda q, k, **kw: spherical_z_contrastive(q, k, a=2.0, b=1.0, normalize=False, **kw),
        [randn(64, 6, 4), randn(65, 6, 4)], 2),
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


def test_spherical_z_loss_does_not_check_the_labels_of_padding_rows():
  o, y = randn(72, 4, 3), np.array([0, 7, 2, -1], np.int32)
  mask = np.array([1, 0, 1, 0], bool)
  got = float(spherical_z_loss(o, y, a=1.0, b=1.0, mask=mask))
  np.testing.assert_allclose(got, ref_z_loss(o[mask], y[mask], 1.0, 1.0), rtol=1e-5)
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
    spherical_z_loss(o, y, a=1.0, b=1.0, mask=np.array([1, 1, 1, 0], bool))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: spherical_z_loss(ONES((4, 3)), np.zeros(4, np.int32), a=1.0, b=1.0, mask=np.ones(4)),
         r"`mask` must be a boolean array"),
        (lambda: spherical_z_loss(ONES((4, 3)), np.zeros(4, np.int32), a=1.0, b=1.0, reduction="avg"),
         r"`reduction` must be one of"),
        (lambda: spherical_z_contrastive(ONES((4, 3)), ONES((4, 3)), a=1.0, b=1.0, mask=np.ones((4, 1), bool)),
         r"`mask` must have shape \(4,\)"),
        (lambda: spherical_z_contrastive(ONES((4, 3)), ONES((4, 3)), a=1.0, b=1.0, reduction="avg"),
         r"`reduction` must be one of"),
    ],
)
def test_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
