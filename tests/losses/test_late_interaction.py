"""Tests of jaxcl/losses/late_interaction.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.late_interaction import filip, filip_similarity
from jaxcl.ops import engines
from tests import helpers
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference
from tests.losses.reference.late_interaction import ref_filip, ref_scores


def masks(seed, b, t):
  m = np.random.default_rng(seed).random((b, t)) < 0.6
  m[:, 0] = True  # every sample keeps at least one token
  return m


CASES = [(2, 1, 3, 4, False), (5, 3, 4, 6, True), (6, 4, 2, 8, True)]


@pytest.mark.parametrize("b,t_img,t_txt,d,masked", CASES)
@pytest.mark.parametrize("impl,tile", [("dense", None), ("blockwise", 2)])
def test_filip_matches_reference(b, t_img, t_txt, d, masked, impl, tile):
  x, y = randn(b, b, t_img, d), randn(b + 1, b, t_txt, d)
  xm = masks(b + 2, b, t_img) if masked else None
  ym = masks(b + 3, b, t_txt) if masked else None
  assert_value_and_grads(
      jax.jit(lambda x, y: filip(x, y, logit_scale=5.0, image_mask=xm, text_mask=ym, impl=impl, tile=tile)),
      lambda x, y: ref_filip(x, y, 5.0, xm, ym),
      [x, y],
  )


@pytest.mark.parametrize("tile", [None, 1, 3, 7])
def test_filip_similarity_matches_reference(tile):
  x, y = randn(10, 5, 3, 4), randn(11, 7, 2, 4)  # 5 images, 7 texts
  xm, ym = masks(12, 5, 3), masks(13, 7, 2)
  i2t, t2i = jax.jit(lambda x, y: filip_similarity(x, y, image_mask=xm, text_mask=ym, tile=tile))(x, y)
  want_i2t, want_t2i = ref_scores(x, y, xm, ym)
  np.testing.assert_allclose(i2t, want_i2t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t2i, want_t2i, rtol=1e-5, atol=1e-6)


def test_filip_engines_agree():
  x, y = randn(20, 7, 4, 5), randn(21, 7, 3, 5)
  xm, ym = masks(22, 7, 4), masks(23, 7, 3)

  def run(impl, tile=None):
    loss = lambda a, b, s: filip(a, b, logit_scale=s, image_mask=xm, text_mask=ym, impl=impl, tile=tile)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, y, 8.0)

  want_v, want_g = run("dense")
  for impl, tile in [("blockwise", 1), ("blockwise", 3), ("auto", None)]:
    got_v, got_g = run(impl, tile)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5, err_msg=f"{impl} {tile}")
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{impl} {tile}")


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_filip_with_one_token_is_clip(impl):
  x, y = randn(30, 6, 5), randn(31, 6, 5)
  got = filip(x[:, None], y[:, None], logit_scale=4.0, impl=impl, tile=4)
  np.testing.assert_allclose(float(got), float(clip(x, y, logit_scale=4.0)), rtol=1e-5)


def test_filip_padding_tokens_do_not_matter():
  # Appending masked-out garbage tokens leaves the loss and the gradient of the real tokens unchanged.
  x, y = randn(40, 4, 2, 3), randn(41, 4, 3, 3)
  x_pad = np.concatenate([x, 100 * randn(42, 4, 2, 3)], axis=1)
  xm = np.concatenate([np.ones((4, 2), bool), np.zeros((4, 2), bool)], axis=1)
  for impl in ("dense", "blockwise"):
    v_pad, g_pad = jax.jit(jax.value_and_grad(lambda a: filip(a, y, image_mask=xm, impl=impl, tile=3)))(x_pad)
    v, g = jax.jit(jax.value_and_grad(lambda a: filip(a, y, impl=impl, tile=3)))(x)
    np.testing.assert_allclose(float(v_pad), float(v), rtol=1e-5)
    np.testing.assert_allclose(g_pad[:, :2], g, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_pad[:, 2:]) == 0)


def test_filip_blockwise_never_builds_the_batch_token_tensor():
  # B = 128, T = 16: the (B, B, T, T) float32 tensor is 16 MiB; a block of 2 texts is 256 KiB.
  b, t, d = 128, 16, 8
  x, y = jnp.asarray(randn(50, b, t, d)), jnp.asarray(randn(51, b, t, d))
  full = b * b * t * t * 4

  def temp_bytes(impl):
    f = jax.jit(jax.grad(lambda a, c: filip(a, c, impl=impl, tile=2), argnums=(0, 1)))
    return f.lower(x, y).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("dense") >= full
  # Far below one (B, B, T, T) tensor: text blocks of 2 plus O(B·T·D) activations and normalisation.
  assert temp_bytes("blockwise") < full / 4


def test_filip_bf16_and_traced_scale():
  x, y = randn(60, 5, 3, 8).astype(jnp.bfloat16), randn(61, 5, 4, 8).astype(jnp.bfloat16)
  for impl in ("dense", "blockwise"):
    value, grads = jax.jit(jax.value_and_grad(lambda a, b: filip(a, b, impl=impl, tile=2), argnums=(0, 1)))(
        jnp.asarray(x), jnp.asarray(y))
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    want = ref_filip(np.asarray(x, np.float64), np.asarray(y, np.float64), 1 / 0.07)
    np.testing.assert_allclose(float(value), want, rtol=3e-2, atol=3e-2)
  xf, yf = randn(62, 4, 2, 3), randn(63, 4, 2, 3)
  g = jax.jit(jax.grad(lambda s: filip(xf, yf, logit_scale=s, impl="blockwise", tile=3)))(2.0)
  want = reference.common.numerical_grad(lambda s: ref_filip(xf, yf, s[()]), np.array(2.0))
  np.testing.assert_allclose(g, want, rtol=1e-4)


ONES = lambda *s: np.ones(s, np.float32)  # noqa: E731


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: filip(ONES(4, 3), ONES(4, 3, 2)), r"`image_tokens` must have rank 3"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 5)), r"same feature size"),
        (lambda: filip(ONES(4, 3, 2), ONES(5, 3, 2)), r"same number of pairs"),
        (lambda: filip(ONES(1, 3, 2), ONES(1, 3, 2)), r"`image_tokens` needs at least 2 examples"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), image_mask=np.ones((4, 2), bool)),
         r"`image_mask` must have shape \(4, 3\)"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), text_mask=np.ones((4, 3), np.int32)),
         r"`text_mask` must be a boolean array"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), text_mask=np.array([[1, 0, 0]] * 3 + [[0, 0, 0]], bool)),
         r"row 3 has none"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), impl="pallas"), r"`impl` must be one of"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), tile=0), r"`tile` must be a positive int"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), logit_scale=-1.0), r"`logit_scale` must be positive"),
    ],
)
def test_filip_bad_inputs(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl,tile", [("dense", None), ("blockwise", 3)])
def test_filip_padded_batch_with_mask_equals_unpadded_batch(impl, tile):
  x, y = randn(200, 5, 3, 4), randn(201, 5, 2, 4)
  xm, ym = masks(202, 5, 3), masks(203, 5, 2)
  loss = lambda a, b, am, bm, **kw: filip(a, b, logit_scale=4.0, image_mask=am, text_mask=bm, impl=impl,
                                          tile=tile, **kw)
  helpers.assert_padded_equals_unpadded(loss, [x, y, xm, ym], n_diff=2, rtol=2e-6)
  helpers.assert_reductions_agree(loss, [x, y, xm, ym], 10)
  helpers.assert_reductions_agree(loss, [x, y, xm, ym], 10, mask=np.array([1, 0, 1, 1, 1], bool))


def test_filip_per_anchor_terms_match_reference():
  x, y = randn(204, 4, 3, 5), randn(205, 4, 2, 5)
  i2t, t2i = ref_scores(x, y)
  want = np.concatenate([reference.common.logsumexp(4.0 * i2t, 1) - 4.0 * np.diag(i2t),
                         reference.common.logsumexp(4.0 * t2i, 0) - 4.0 * np.diag(t2i)])
  for impl in ("dense", "blockwise"):
    got = filip(x, y, logit_scale=4.0, reduction="none", impl=impl, tile=3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, err_msg=impl)


def test_filip_padding_pairs_may_have_no_valid_token():
  x, y = randn(206, 4, 3, 5), randn(207, 4, 2, 5)
  tm = np.ones((4, 2), bool)
  tm[1] = False  # the padding pair's text has no token: allowed, as it is masked out
  mask = np.array([1, 0, 1, 1], bool)
  got = filip(x, y, logit_scale=4.0, text_mask=tm, mask=mask)
  np.testing.assert_allclose(float(got), float(filip(x[mask], y[mask], logit_scale=4.0)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"row 1 has none"):
    filip(x, y, text_mask=tm, mask=np.ones(4, bool))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), mask=np.ones(3, bool)), r"`mask` must have shape \(4,\)"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), mask=np.ones((4, 3), bool)), r"`mask` must have shape \(4,\)"),
        (lambda: filip(ONES(4, 3, 2), ONES(4, 3, 2), reduction="avg"), r"`reduction` must be one of"),
    ],
)
def test_filip_bad_reduction_or_mask(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("impl,n_devices", [("ring", 3), ("allgather", 8)])
def test_filip_sharded_equals_dense(impl, n_devices, monkeypatch):
  """Tokens, token masks and padding pairs split over 3 (ring) and 8 (allgather) devices (the tokens
  gathered): the dense loss and gradients; on 3 devices the local blocks run on the blockwise engine."""
  if impl == "ring":
    monkeypatch.setattr(engines, "DENSE_MAX_ELEMENTS", 1)  # "auto" picks blockwise for the local blocks
  image, text = randn(0, 24, 3, 6), randn(1, 24, 4, 6)
  image_mask = jnp.asarray(randn(2, 24, 3) > -1.0).at[:, 0].set(True)
  text_mask = jnp.asarray(randn(3, 24, 4) > -1.0).at[:, 0].set(True)
  mask = jnp.arange(24) % 5 != 3
  loss = lambda x, y, xm, ym, m, **kw: filip(x, y, logit_scale=5.0, image_mask=xm, text_mask=ym, mask=m, **kw)  # noqa: E731
  helpers.assert_sharded_equals_dense(loss, [image, text, image_mask, text_mask, mask], impl=impl,
                                      n_devices=n_devices)
