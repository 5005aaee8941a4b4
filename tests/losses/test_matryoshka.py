"""Tests of jaxcl/losses/matryoshka.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.clip import clip
from jaxcl.losses.infonce import nt_xent
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.triplet import batch_hard_triplet
from tests.helpers import assert_value_and_grads, randn
from tests.losses import reference


def check(jax_loss, np_loss, args, **tolerances):
  """Value and finite-difference gradients of the jitted loss (one compile instead of eager ops)."""
  assert_value_and_grads(jax.jit(jax_loss), np_loss, args, **tolerances)


# -------------------------------------------------------------------------------------------- matryoshka
@pytest.mark.parametrize("dims,weights", [((2, 4, 8), None), ((1, 3, 8), (0.5, 1.0, 2.0)), ((3,), None)])
def test_matryoshka_clip_matches_reference(dims, weights):
  fn = matryoshka(functools.partial(clip, logit_scale=5.0), dims, weights)
  ref = reference.matryoshka.matryoshka(functools.partial(reference.clip.clip, logit_scale=5.0), dims, weights)
  check(fn, ref, [randn(34, 6, 8), randn(35, 6, 8)])


def test_matryoshka_nt_xent_matches_reference():
  fn = matryoshka(functools.partial(nt_xent, temperature=0.3), (4, 8, 16))
  ref = reference.matryoshka.matryoshka(functools.partial(reference.infonce.nt_xent, temperature=0.3), (4, 8, 16))
  check(fn, ref, [randn(36, 5, 16), randn(37, 5, 16)])


def test_matryoshka_with_the_full_size_is_the_loss_itself():
  a, b = randn(38, 6, 8), randn(39, 6, 8)
  for loss in (functools.partial(clip, logit_scale=10.0), functools.partial(nt_xent, temperature=0.5)):
    got = jax.jit(jax.value_and_grad(matryoshka(loss, [8])))(a, b)
    want = jax.jit(jax.value_and_grad(loss))(a, b)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6, atol=1e-7)


def test_matryoshka_slices_keywords_and_passes_labels_scales_through():
  x, labels = randn(40, 8, 6), np.array([0, 0, 1, 1, 2, 2, 0, 1])
  nested = matryoshka(batch_hard_triplet, (2, 6), weights=(1.0, 0.25))
  ref = reference.triplet.batch_hard_triplet
  want = ref(x[:, :2], labels) + 0.25 * ref(x, labels)
  np.testing.assert_allclose(float(jax.jit(nested)(x, labels)), want, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(nested)(embeddings=x, labels=labels)), want, rtol=1e-5)
  # A learnable (traced) logit scale passes through unsliced and gets its gradient.
  a, b = randn(41, 5, 6), randn(42, 5, 6)
  f = lambda s: matryoshka(clip, (3, 6))(a, b, logit_scale=s)
  want_g = reference.common.numerical_grad(
      lambda s: reference.matryoshka.matryoshka(functools.partial(reference.clip.clip, logit_scale=s[()]), (3, 6))(
          a, b
      ),
      np.array(4.0),
  )
  np.testing.assert_allclose(float(jax.jit(jax.grad(f))(4.0)), want_g, rtol=1e-4)
  assert matryoshka(clip, (3,)).__name__ == "clip"


def test_matryoshka_under_jit_and_vmap():
  fn = matryoshka(functools.partial(clip, logit_scale=5.0), (2, 4))
  a, b = randn(43, 3, 5, 4), randn(44, 3, 5, 4)
  eager = [float(fn(a[i], b[i])) for i in range(3)]
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(a, b)), eager, rtol=1e-5)
  w = jnp.array([1.0, 3.0])
  g = jax.jit(lambda w: matryoshka(functools.partial(clip, logit_scale=5.0), (2, 4), w)(a[0], b[0]))
  want = [float(clip(a[0][:, :2], b[0][:, :2], logit_scale=5.0)), float(clip(a[0], b[0], logit_scale=5.0))]
  np.testing.assert_allclose(np.asarray(jax.grad(g)(w)), want, rtol=1e-5)


# ------------------------------------------------------------------------ transforms, dtypes, extremes
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3, 0])


ALL_LOSSES = {
    "matryoshka_clip": (matryoshka(functools.partial(clip, logit_scale=10.0), (2, 8, 16)), 2),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_jit_grad_vmap(name):
  fn, n = ALL_LOSSES[name]
  xs = [randn(50 + i, 3, 6, 16) for i in range(n)]
  one = jax.jit(fn)
  eager = np.array([float(one(*[x[i] for x in xs])) for i in range(3)])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(*xs)), eager, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(n))))(*[x[0] for x in xs])
  assert all(g.shape == (6, 16) and np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_inputs_close_to_fp32(name):
  fn, n = ALL_LOSSES[name]
  base = randn(60, 16, 32)
  xs = [base + 0.8 * randn(61 + i, 16, 32) for i in range(n)]  # related views: mid-range values
  lo = jax.jit(fn)(*[jnp.asarray(x, jnp.bfloat16) for x in xs])
  hi = jax.jit(fn)(*[jnp.asarray(x) for x in xs])
  assert lo.dtype == jnp.float32 and lo.shape == ()
  np.testing.assert_allclose(float(lo), float(hi), rtol=3e-2, atol=1e-2)
  grads = jax.jit(jax.grad(fn, argnums=tuple(range(n))))(*[jnp.asarray(x, jnp.bfloat16) for x in xs])
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_extremes_are_finite(name):
  fn, n = ALL_LOSSES[name]
  a = randn(70, 8, 16)
  cases = [(a, a, a), (a * 1e-12, a, -a), (np.zeros_like(a), a, a), (a * 1e6, -a, a), (np.zeros_like(a),) * 3]
  value_and_grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n))))
  for case in cases:
    value, grads = value_and_grads(*[jnp.asarray(x) for x in case[:n]])
    assert np.isfinite(float(value)), name
    assert all(np.all(np.isfinite(g)) for g in grads), name


# ------------------------------------------------------------------------------------------ bad inputs
ONES = np.ones((4, 3), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: matryoshka(clip, (4, 2)), r"`dims` must be positive and strictly increasing, got \[4, 2\]"),
        (lambda: matryoshka(clip, (0, 2)), r"`dims` must be positive"),
        (lambda: matryoshka(clip, ()), r"`dims` must name at least one"),
        (lambda: matryoshka(clip, 8), r"`dims` must be a sequence"),
        (lambda: matryoshka(clip, (2.5, 4)), r"`dims` must hold Python ints"),
        (lambda: matryoshka(clip, (2, 4), weights=(1.0,)), r"`weights` must have one entry per dim \(2\), got 1"),
        (lambda: matryoshka(clip, (2, 4), weights=(1.0, -1.0)), r"`weights` must be finite numbers >= 0"),
        (lambda: matryoshka("clip", (2,)), r"`loss_fn` must be callable"),
        (lambda: matryoshka(clip, (2, 4))(ONES, ONES, logit_scale=1.0), r"`dims` asks for 4 features but `image` has only 3"),
        (lambda: matryoshka(clip, (2,))(image=ONES, text=np.ones((4, 1)), logit_scale=1.0), r"`text` has only 1"),
        (lambda: matryoshka(lambda *xs: xs[0].sum(), (2,))(np.ones(3)), r"no floating array argument"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# --------------------------------------------------------------------------------- reduction and mask
# name -> (loss(*arrays, **kw), arrays, number of differentiable arrays, per-sample (reduction="none"))
_LABELS = np.array([0, 1, 0, 1, 2, 2], np.int32)


MASKED = {
    "matryoshka_clip": (lambda a, b, **kw: matryoshka(clip, dims=(2, 4))(a, b, logit_scale=5.0, **kw),
                        [randn(113, 6, 4), randn(114, 6, 4)], 2, True),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_padded_batch_with_mask_equals_unpadded_batch(name):
  from tests.helpers import assert_padded_equals_unpadded  # noqa: PLC0415

  loss, arrays, n_diff, _ = MASKED[name]
  assert_padded_equals_unpadded(loss, arrays, n_diff=n_diff, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(MASKED))
def test_reduction_none_and_sum_or_mean_only(name):
  from tests.helpers import assert_reductions_agree  # noqa: PLC0415

  loss, arrays, _, per_sample = MASKED[name]
  if not per_sample:
    with pytest.raises(ValueError, match=r"`reduction` must be 'mean' for this loss"):
      loss(*arrays, reduction="none")
    return
  mask = np.array([1, 1, 0, 1, 1, 1], bool)
  if name == "batch_hard_triplet":  # every anchor (of the kept ones) has a positive and a negative
    arrays = [arrays[0], np.array([0, 1, 0, 1, 0, 1], np.int32)]
  assert_reductions_agree(loss, arrays, 2 * 6 if name.startswith("matryoshka") else 6)
  assert_reductions_agree(loss, arrays, 2 * 6 if name.startswith("matryoshka") else 6, mask=mask)
