"""jaxcl.eval.geometry: alignment, uniformity, effective rank and the modality gap against float64
NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.eval import geometry
from tests.helpers import randn, unit


def ref_uniformity(z, t):
  """log of the mean over pairs i < j of exp(−t ‖z_i − z_j‖²), like torch.pdist in Wang & Isola's code."""
  z = unit(z)
  vals = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(len(z)) for j in range(i + 1, len(z))]
  return np.log(np.mean(vals))


def ref_effective_rank(x):
  sigma = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  p = sigma / sigma.sum()
  p = p[p > 0]
  return np.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize("alpha,t", [(2.0, 2.0), (1.0, 1.0), (3.0, 0.5)])
def test_alignment_uniformity_match_numpy(alpha, t):
  x, y = randn(14, 17, 6), randn(15, 17, 6)
  got = geometry.alignment_uniformity(x, y, alpha=alpha, t=t)
  want_align = np.mean(np.linalg.norm(unit(x) - unit(y), axis=1) ** alpha)
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
  want = np.linalg.norm(unit(x).mean(0) - unit(y).mean(0))
  np.testing.assert_allclose(float(geometry.modality_gap(x, y)), want, rtol=1e-5)
  assert float(geometry.modality_gap(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)
  opposite = geometry.modality_gap(np.array([[1.0, 0.0]]), np.array([[-2.0, 0.0]]))
  assert float(opposite) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ bad inputs
E = np.ones((6, 4), np.float32)


L = np.array([0, 1, 2, 0, 1, 2], np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
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
