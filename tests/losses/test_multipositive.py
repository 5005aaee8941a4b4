"""Tests of jaxcl/losses/multipositive.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.multipositive import one_to_k_clip, poly_view
from tests import helpers
from tests.helpers import randn
from tests.losses.reference.multipositive import ref_one_to_k, ref_poly_view


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


@pytest.mark.parametrize("k,b", [(1, 4), (3, 4), (2, 5)])
def test_one_to_k_clip_matches_reference(k, b):
  assert_value_and_grads(
      lambda v, t: one_to_k_clip(v, t, logit_scale=3.0),
      lambda v, t: ref_one_to_k(v, t, 3.0),
      [randn(1, b, 4), randn(2, k, b, 4)],
  )


def test_one_to_k_clip_with_one_language_is_clip():
  v, t = randn(3, 6, 5), randn(4, 6, 5)
  got, want = jax.jit(lambda a, b: (one_to_k_clip(a, b[None], logit_scale=7.0), clip(a, b, logit_scale=7.0)))(v, t)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("critic", ["geometric", "arithmetic"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_poly_view_matches_reference(critic, m):
  assert_value_and_grads(
      lambda v: poly_view(v, critic=critic, temperature=0.3),
      lambda v: ref_poly_view(v, critic, 0.3),
      [randn(5 + m, m, 4, 3)],
  )


def test_poly_view_two_views_is_nt_xent_for_both_critics():
  # The paper: with M = 2 poly-view contrastive learning is SimCLR (other samples' same-view embeddings
  # are negatives, unlike CLIP).
  views = randn(10, 2, 6, 4)
  f = jax.jit(lambda v: (poly_view(v, critic="geometric", temperature=0.2),
                         poly_view(v, critic="arithmetic", temperature=0.2),
                         nt_xent(v[0], v[1], temperature=0.2),
                         clip(v[0], v[1], logit_scale=5.0)))
  geo, ari, want, two_way = f(views)
  np.testing.assert_allclose([float(geo), float(ari)], [float(want)] * 2, rtol=1e-5)
  assert abs(float(want) - float(two_way)) > 0.1  # the identity tells NT-Xent from CLIP here


def test_poly_view_three_views_by_hand():
  # 3 identical views of 2 orthogonal unit samples, τ = 1: each positive (f = 1) competes with the 3
  # views of the other sample (f = 0), so ℓ = log(e + 3) − 1 for every (i, α, β), whatever the critic.
  v = jnp.stack([jnp.eye(2)] * 3)
  for critic in ("geometric", "arithmetic"):
    np.testing.assert_allclose(float(poly_view(v, critic=critic, temperature=1.0)), np.log(np.e + 3) - 1, rtol=1e-6)


def test_poly_view_arithmetic_is_at_most_geometric_and_differs_with_more_views():
  views = randn(11, 4, 5, 4)
  geo, ari = (float(poly_view(views, critic=c, temperature=0.2)) for c in ("geometric", "arithmetic"))
  assert ari < geo - 1e-3  # AM–GM on the likelihoods e^{−ℓ}


def test_every_engine_agrees_with_dense():
  impls = helpers.engines()
  assert {"dense", "blockwise", "pallas"} <= set(impls)
  v, t, views = randn(20, 5, 4), randn(21, 3, 5, 4), randn(22, 3, 5, 4)
  calls = {
      "one_to_k_clip": (lambda impl: lambda a, b: one_to_k_clip(a, b, logit_scale=4.0, impl=impl), (v, t)),
      "poly_view geometric": (lambda impl: lambda a: poly_view(a, impl=impl), (views,)),
      "poly_view arithmetic": (lambda impl: lambda a: poly_view(a, critic="arithmetic", impl=impl), (views,)),
  }
  for name, (make, args) in calls.items():
    argnums = tuple(range(len(args)))
    out = jax.jit(lambda *xs: [jax.value_and_grad(make(i), argnums=argnums)(*xs) for i in impls])(*args)
    want_value, want_grads = out[impls.index("dense")]
    for impl, (value, grads) in zip(impls, out):
      np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=f"{name} {impl}")
      for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")


def test_bfloat16_inputs_give_float32_close_to_float32():
  v, t, views = randn(30, 6, 8), randn(31, 2, 6, 8), randn(32, 3, 6, 8)
  for fn, args in (
      (lambda a, b: one_to_k_clip(a, b, logit_scale=5.0), (v, t)),
      (lambda a: poly_view(a, critic="geometric"), (views,)),
      (lambda a: poly_view(a, critic="arithmetic"), (views,)),
  ):
    lo = jax.jit(fn)(*[jnp.asarray(a, jnp.bfloat16) for a in args])
    assert lo.dtype == jnp.float32 and np.isfinite(float(lo))
    np.testing.assert_allclose(float(lo), float(jax.jit(fn)(*args)), rtol=3e-2)


ONES = lambda shape: np.ones(shape, np.float32)  # noqa: E731


BAD = [
    (lambda: one_to_k_clip(ONES((4, 3)), ONES((2, 5, 3)), logit_scale=1.0), r"`texts` must have shape \(K, 4, 3\)"),
    (lambda: one_to_k_clip(ONES((4, 3)), ONES((4, 3)), logit_scale=1.0), r"`texts` must have rank 3"),
    (lambda: one_to_k_clip(ONES((4, 3)), ONES((2, 4, 3)), logit_scale=0.0), r"`logit_scale` must be positive"),
    (lambda: poly_view(ONES((1, 4, 3))), r"at least 2 views"),
    (lambda: poly_view(ONES((3, 1, 3))), r"`views` needs at least 2 examples along axis 1"),
    (lambda: poly_view(ONES((3, 4, 3)), critic="harmonic"), r"`critic` must be one of"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_with_the_argument_name(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


# ------------------------------------------------------------------------------- reduction and mask
def _masked_cases(impl):
  """name -> (loss of sample-major arrays (B first), arrays, anchors per sample). The losses take
  (K, B, D) texts / (M, B, D) views: the wrappers move the sample axis, which the padding is along."""
  return {
      "one_to_k_clip": (lambda v, t, **kw: one_to_k_clip(v, jnp.swapaxes(t, 0, 1), logit_scale=3.0, impl=impl, **kw),
                        [randn(170, 5, 3), randn(171, 5, 2, 3)], 1),
      "poly_view": (lambda x, **kw: poly_view(jnp.swapaxes(x, 0, 1), temperature=0.3, impl=impl, **kw),
                    [randn(172, 5, 3, 3)], 3),
      "poly_view(arithmetic)": (lambda x, **kw: poly_view(jnp.swapaxes(x, 0, 1), critic="arithmetic",
                                                          temperature=0.3, impl=impl, **kw),
                                [randn(173, 5, 3, 3)], 3),
  }


@pytest.mark.parametrize("impl", helpers.PADDED_TEST_ENGINES)
@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_padded_batch_with_mask_equals_unpadded_batch(name, impl):
  loss, arrays, _ = _masked_cases(impl)[name]
  helpers.assert_padded_equals_unpadded(loss, arrays, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(_masked_cases("dense")))
def test_reduction_none_and_sum(name):
  loss, arrays, per_sample = _masked_cases("auto")[name]
  helpers.assert_reductions_agree(loss, arrays, 5 * per_sample)
  helpers.assert_reductions_agree(loss, arrays, 5 * per_sample, mask=np.array([1, 0, 1, 1, 1], bool))


def test_reduction_none_terms_by_hand():
  # one_to_k_clip, K = 2 identical languages of two orthogonal images (the docstring example): every
  # image's term is the loss, ½ [log(2e + 2) − 1 + (log(e + 1) − 1) / 2].
  v = jnp.eye(2)
  want = 0.5 * (np.log(2 * np.e + 2) - 1 + (np.log(np.e + 1) - 1) / 2)
  np.testing.assert_allclose(one_to_k_clip(v, jnp.stack([v, v]), logit_scale=1.0, reduction="none"), [want] * 2, rtol=1e-6)
  # poly_view: view α of sample i is row α·B + i; sample 1's views are far from sample 0's.
  x = jnp.stack([jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]]),
                 jnp.array([[1.0, 0.0], [0.6, 0.8]])])
  per = np.asarray(poly_view(x, temperature=1.0, reduction="none"))
  assert per.shape == (6,)
  # sample 0's views (all (1, 0)) against sample 1's views at dots 0, 0 and 0.6:
  np.testing.assert_allclose(per[[0, 2, 4]], np.log(np.e + 2 + np.exp(0.6)) - 1, rtol=1e-6)
  assert per[5] > per[1]  # sample 1's third view agrees less with its others


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: one_to_k_clip(ONES((4, 3)), ONES((2, 4, 3)), logit_scale=1.0, mask=np.ones(8, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: one_to_k_clip(ONES((4, 3)), ONES((2, 4, 3)), logit_scale=1.0, reduction="avg"), r"`reduction` must be one of"),
        (lambda: poly_view(ONES((3, 4, 3)), mask=np.ones(12, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: poly_view(ONES((3, 4, 3)), mask=np.ones(4, np.int32)), r"`mask` must be a boolean array"),
        (lambda: poly_view(ONES((3, 4, 3)), reduction="mean_over_views"), r"`reduction` must be one of"),
    ],
)
def test_bad_mask_or_reduction_raises_clear_errors(call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call()


@pytest.mark.parametrize("impl, n_devices, masked", [("ring", 3, False), ("allgather", 8, True)])
@pytest.mark.parametrize("name", ["one_to_k_clip", "poly_view_arithmetic"])
def test_sharded_equals_dense(name, impl, n_devices, masked):
  """The samples (axis 0 of image, axis 1 of texts / views) split over 3 or 8 devices (a padded batch
  on 8): the value and gradients of the one-device loss."""
  mask = np.arange(24) % 5 != 2
  pick = lambda m: m if masked else None  # noqa: E731
  if name == "one_to_k_clip":
    loss = lambda v, t, m, **kw: one_to_k_clip(v, t, logit_scale=4.0, mask=pick(m), **kw)  # noqa: E731
    args = [randn(60, 24, 4), randn(61, 2, 24, 4), mask]
  else:
    loss = lambda x, m, **kw: poly_view(x, critic="arithmetic", temperature=0.3, mask=pick(m), **kw)  # noqa: E731
    args = [randn(62, 3, 24, 4), mask]
  helpers.assert_sharded_equals_dense(loss, args, impl=impl, n_devices=n_devices)
