"""Shared test helpers: random inputs and comparison against the float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import ops
from tests.losses import reference


def randn(seed: int, *shape, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_value_and_grads(jax_loss, np_loss, args, *, rtol=2e-5, grad_rtol=1e-4, jit=False):
  """Checks jax_loss(*args) against np_loss(*args) and d/d(each array arg) against finite differences.

  `jit=True` computes value and gradients with one jitted value_and_grad (one compile instead of many
  eager op compiles: much faster for big losses on a shared CPU)."""
  arrays = [jnp.asarray(a) for a in args]
  argnums = tuple(range(len(args)))
  if jit:
    got, grads = jax.jit(jax.value_and_grad(jax_loss, argnums=argnums))(*arrays)
  else:
    got = jax_loss(*arrays)
    grads = jax.grad(lambda *xs: jax_loss(*xs), argnums=argnums)(*arrays)
  want = np_loss(*[np.asarray(a, np.float64) for a in args])
  np.testing.assert_allclose(float(got), want, rtol=rtol, atol=1e-6)
  for n, (g, a) in enumerate(zip(grads, args)):
    def f(x, n=n):
      xs = [np.asarray(v, np.float64) for v in args]
      xs[n] = x
      return np_loss(*xs)

    want_g = reference.common.numerical_grad(f, np.asarray(a, np.float64))
    scale = np.max(np.abs(want_g)) + 1e-12
    np.testing.assert_allclose(
        np.asarray(g, np.float64) / scale, want_g / scale, rtol=grad_rtol, atol=grad_rtol,
        err_msg=f"gradient of argument {n}",
    )


def engines() -> tuple[str, ...]:
  """Every single-device engine name plus "auto"."""
  return ("auto",) + ops.available_impls()


def assert_engines_agree(name, make, args, *, value_atol=0.0):
  """Value and gradients of `make(impl)(*args)` for every engine against the dense engine, evaluated in
  one compiled program."""
  impls = engines()
  assert {"dense", "blockwise", "pallas"} <= set(impls)
  argnums = tuple(range(len(args)))
  out = jax.jit(lambda *xs: [jax.value_and_grad(make(i), argnums=argnums)(*xs) for i in impls])(*args)
  want_value, want_grads = out[impls.index("dense")]
  for impl, (value, grads) in zip(impls, out):
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, atol=value_atol, err_msg=f"{name} {impl}")
    for g, want in zip(grads, want_grads):
      np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=f"{name} {impl} gradient")


def pad_batch(seed: int, arrays, n_pad: int):
  """Inserts n_pad garbage rows (large random values) at random positions along axis 0 of every array in
  `arrays` (all of the same batch size B); returns the padded arrays and the bool (B + n_pad,) mask."""
  rng = np.random.default_rng(seed)
  b = np.shape(arrays[0])[0]
  mask = np.zeros(b + n_pad, bool)
  mask[np.sort(rng.choice(b + n_pad, b, replace=False))] = True
  padded = []
  for x in arrays:
    x = np.asarray(x)
    out = (1e3 * rng.standard_normal((b + n_pad,) + x.shape[1:])).astype(x.dtype)
    if np.issubdtype(x.dtype, np.integer):
      out = rng.integers(-5, 5, (b + n_pad,) + x.shape[1:]).astype(x.dtype)
    out[mask] = x
    padded.append(out)
  return padded, mask


def assert_padded_equals_unpadded(loss, arrays, n_pad=3, seed=0, rtol=1e-6, n_diff=None, unpadded_loss=None):
  """loss(*padded, mask=mask) equals unpadded_loss(*arrays) (default: `loss`; float32 rounding: rtol
  1e-6), and so do the gradients w.r.t. the first `n_diff` arrays (all by default) on the real rows,
  exactly 0 on the padding rows."""
  n_diff = len(arrays) if n_diff is None else n_diff
  padded, mask = pad_batch(seed, arrays, n_pad)
  argnums = tuple(range(n_diff))
  want, want_g = jax.jit(jax.value_and_grad(unpadded_loss or loss, argnums=argnums))(
      *[jnp.asarray(a) for a in arrays])
  got, got_g = jax.jit(jax.value_and_grad(lambda *xs: loss(*xs, mask=jnp.asarray(mask)), argnums=argnums))(
      *[jnp.asarray(a) for a in padded])
  np.testing.assert_allclose(float(got), float(want), rtol=rtol, atol=1e-7)
  for n, (g, w) in enumerate(zip(got_g, want_g)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    norm = max(np.max(np.abs(w)), 1e-30)
    np.testing.assert_allclose(g[mask] / norm, w / norm, atol=2e-6, err_msg=f"gradient of argument {n}")
    assert np.all(g[~mask] == 0), f"gradient of argument {n} on the padding rows"


def assert_reductions_agree(loss, arrays, n_anchors: int, mask=None):
  """reduction="none" (n_anchors,) has the default value as its masked mean; "sum" is their sum."""
  kw = {} if mask is None else {"mask": jnp.asarray(mask)}
  arrays = [jnp.asarray(a) for a in arrays]
  mean = float(loss(*arrays, **kw))
  per = np.asarray(loss(*arrays, reduction="none", **kw), np.float64)
  assert per.shape == (n_anchors,), per.shape
  total = float(loss(*arrays, reduction="sum", **kw))
  n_valid = n_anchors if mask is None else None
  if mask is not None:
    valid = np.tile(np.asarray(mask), n_anchors // len(mask))
    assert np.all(per[~valid] == 0)
    n_valid = int(valid.sum())
  np.testing.assert_allclose(per.sum() / n_valid, mean, rtol=1e-6)
  np.testing.assert_allclose(total, per.sum(), rtol=1e-6)
