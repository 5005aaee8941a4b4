"""jaxcl.eval.crossmodal (hubness correction, modality-gap removal, classification by description)
against float64 NumPy references written here from the papers' formulas."""

import jax
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.eval.crossmodal import (
    dbnorm_scores, description_accuracy, description_scores, gallery_log_normalizer, hubness, remove_modality_gap)
from jaxcl.eval.geometry import modality_gap
from jaxcl.eval.zero_shot import zero_shot_logits
from tests.losses import reference
from tests.helpers import randn


normalize = reference.common.normalize


def ref_dbnorm(q, g, qb, gb, bq, bg):
  q, g, qb = normalize(q), normalize(g), normalize(qb)
  s = q @ g.T
  p = np.exp(bq * s) / np.sum(np.exp(bq * (qb @ g.T)), axis=0)[None, :]
  if gb is not None:
    gb = normalize(gb)
    p = p * np.exp(bg * s) / np.sum(np.exp(bg * (gb @ g.T)), axis=0)[None, :]
  return np.log(p)


@pytest.mark.parametrize("with_gallery_bank", [False, True])
def test_dbnorm_matches_reference(with_gallery_bank):
  q, g, qb, gb = randn(1, 5, 4), randn(2, 7, 4), randn(3, 9, 4), randn(4, 6, 4)
  gb = gb if with_gallery_bank else None
  got = dbnorm_scores(q, g, qb, gb, beta_query=3.0, beta_gallery=2.0)
  np.testing.assert_allclose(got, ref_dbnorm(q, g, qb, gb, 3.0, 2.0), rtol=1e-5, atol=1e-5)


def test_gallery_normalizer_engines_agree():
  g, qb, gb = randn(5, 6, 4), randn(6, 9, 4), randn(7, 5, 4)
  want = gallery_log_normalizer(g, qb, gb, impl="dense")
  for impl in ("auto",) + ops.available_impls():
    np.testing.assert_allclose(gallery_log_normalizer(g, qb, gb, impl=impl), want, rtol=1e-5, err_msg=impl)


def test_dbnorm_removes_a_hub_and_raises_recall():
  # Gallery: e_0..e_14 and a hub h = e_15. Query i is e_i + 1.2 h: cosine 0.64 with its match and
  # 0.77 with the hub, so raw retrieval always returns the hub. A query bank drawn the same way is
  # near the hub too, so the hub's normaliser log Σ exp(β 0.77) = 7.7 + log 15 (β = 10) exceeds
  # e_i's log(exp(6.4) + 14) and the corrected score ranks e_i first (hand-computed: −2.7 vs 0.0).
  # The gallery bank (the gallery itself) adds the same log(e^β + 15) to every item.
  eye = np.eye(16, dtype=np.float32)
  gallery = eye
  queries = eye[:15] + 1.2 * eye[15]
  bank = queries.copy()
  raw = normalize(queries) @ normalize(gallery).T
  hits = lambda s: np.mean(np.argmax(np.asarray(s), axis=1) == np.arange(15))
  assert hits(raw) == 0.0
  assert hits(dbnorm_scores(queries, gallery, bank, beta_query=10.0)) == 1.0
  assert hits(dbnorm_scores(queries, gallery, bank, gallery, beta_query=10.0, beta_gallery=10.0)) == 1.0
  assert float(hubness(queries, gallery, k=1)) > 3.0  # one item holds every top-1


def ref_hubness(q, g, k):
  s = normalize(q) @ normalize(g).T
  counts = np.zeros(g.shape[0])
  for row in s:
    counts[np.argsort(-row)[:k]] += 1
  c = counts - counts.mean()
  return np.mean(c**3) / np.mean(c**2) ** 1.5


@pytest.mark.parametrize("k,chunk", [(1, 1024), (3, 4), (5, 7)])
def test_hubness_matches_reference(k, chunk):
  q, g = randn(9, 30, 6), randn(10, 12, 6)
  np.testing.assert_allclose(float(hubness(q, g, k=k, chunk=chunk)), ref_hubness(q, g, k), rtol=1e-4)


def test_remove_modality_gap_aligns_shifted_modalities():
  # Both modalities are one shared set of unit vectors z_i shifted by a modality offset and rescaled
  # per row; centring removes the offsets exactly, so the two outputs coincide.
  z = normalize(randn(11, 8, 5))
  x = (np.abs(randn(12, 8, 1)) + 0.5) * normalize(z + 2.0 * normalize(randn(13, 1, 5)))
  t = normalize(z - 2.0 * normalize(randn(14, 1, 5)))
  assert float(modality_gap(x, t)) > 0.5
  # The projection onto the sphere is not linear, so pass the means of the unit rows explicitly and
  # check the definition: x' = normalize(x̂ − μ_x), t' = normalize(t̂ − μ_t).
  a, b = remove_modality_gap(x, t)
  xh, th = normalize(x), normalize(t)
  np.testing.assert_allclose(a, normalize(xh - xh.mean(0)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b, normalize(th - th.mean(0)), rtol=1e-5, atol=1e-6)
  assert float(modality_gap(a, b)) < 0.25 * float(modality_gap(x, t))
  mx, mt = xh.mean(0), th.mean(0)
  a2, _ = remove_modality_gap(x[:3], t[:3], image_mean=mx, text_mean=mt)  # calibration means
  np.testing.assert_allclose(a2, np.asarray(a)[:3], rtol=1e-5, atol=1e-6)


def test_remove_modality_gap_identical_up_to_offset():
  u = randn(15, 6, 4)
  a, b = remove_modality_gap(u + 3.0, u - 3.0, image_mean=np.zeros(4), text_mean=np.zeros(4))
  # With zero means this is only a re-normalisation.
  np.testing.assert_allclose(a, normalize(u + 3.0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"`image_mean` must have shape \(4,\)"):
    remove_modality_gap(u, u, image_mean=np.zeros(3))


def ref_description_scores(x, d, cls, c):
  x, d = normalize(x), normalize(d)
  return np.stack([np.mean(x @ d[cls == k].T, axis=1) for k in range(c)], axis=1)


def test_description_scores_and_accuracy_match_reference():
  x, d = randn(20, 9, 5), randn(21, 11, 5)
  cls = np.array([0, 0, 1, 2, 2, 2, 3, 1, 0, 3, 3])
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
  want = ref_description_scores(x, d, cls, 4)
  got = jax.jit(lambda x, d: description_scores(x, d, cls, 4))(x, d)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  acc = description_accuracy(x, d, cls, labels, 4)
  np.testing.assert_allclose(float(acc), np.mean(np.argmax(want, 1) == labels), rtol=1e-6)


def test_one_descriptor_per_class_is_zero_shot():
  x, d = randn(22, 6, 5), randn(23, 3, 5)
  np.testing.assert_allclose(
      description_scores(x, d, np.arange(3), 3), zero_shot_logits(x, d), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: description_scores(randn(0, 2, 3), randn(1, 3, 3), np.array([0, 0, 2]), 3),
         r"class 1 has none"),
        (lambda: description_scores(randn(0, 2, 3), randn(1, 3, 3), np.array([0, 1, 3]), 3),
         r"`descriptor_class` must lie in \[0, 3\)"),
        (lambda: description_scores(randn(0, 2, 3), randn(1, 3, 4), np.array([0, 1, 2]), 3),
         r"same feature size"),
        (lambda: dbnorm_scores(randn(0, 2, 3), randn(1, 3, 3), randn(2, 4, 3), beta_query=0.0),
         r"`beta_query` must be positive"),
        (lambda: dbnorm_scores(randn(0, 2, 3), randn(1, 3, 3), randn(2, 4, 2)), r"same feature size"),
        (lambda: hubness(randn(0, 2, 3), randn(1, 3, 3), k=0), r"`k` must be a positive integer"),
    ],
)
def test_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()
