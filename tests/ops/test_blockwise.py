"""The blockwise engine against the dense engine, a float64 NumPy reference and finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl import ops
from jaxcl.ops import blockwise
from jaxcl.ops import dense
from tests.losses import reference
from tests.helpers import randn

# (Bq, Bk, D, tile): several tiles, Bk not divisible by the (balanced) tile width, Bq != Bk, a tile
# wider than Bk. Tiles are balanced: Bk = 10 with tile 4 runs 3 tiles of 4, the last one slid back.
SHAPES = [
    (8, 8, 4, 4),
    (9, 10, 3, 4),
    (7, 11, 5, 5),
    (12, 7, 4, 3),
    (6, 10, 2, 16),
    (16, 16, 8, 1),
    (40, 300, 16, 128),  # 3 balanced tiles of 100
]


def _ids(seed, n, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, n), jnp.int32)


def _masks(kind, bq, bk, seed=0):
  """exclude/include id pairs; `include` leaves some rows and columns with nothing valid."""
  exclude = (_ids(seed, bq, 3), _ids(seed + 1, bk, 3))
  include = (_ids(seed + 2, bq, 3), _ids(seed + 3, bk, 2))  # row id 2 never meets a column id
  return {
      "none": (None, None),
      "exclude": (exclude, None),
      "include": (None, include),
      "both": (exclude, include),
  }[kind]


def _weighted_lse(engine, rows, cols, exclude, include):
  """A scalar that weighs every finite row/column result differently (so every gradient is checked)."""

  def f(q, k, scale):
    r, c = engine(q, k, scale=scale, rows=rows, cols=cols, exclude=exclude, include=include)
    total = 0.0
    if rows:
      w = jnp.cos(jnp.arange(q.shape[0], dtype=jnp.float32))
      total += jnp.sum(jnp.where(jnp.isfinite(r), w * r, 0.0))
    if cols:
      w = jnp.sin(1.0 + jnp.arange(k.shape[0], dtype=jnp.float32))
      total += jnp.sum(jnp.where(jnp.isfinite(c), w * c, 0.0))
    return total, (r, c)

  return f


def _value_and_grads(f, *args, has_aux=False):
  """f's value (and aux) and its gradient in every argument, from one compiled program."""
  return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=has_aux))(*args)


def _assert_close_grads(got, want, rtol=1e-4):
  for n, (g, w) in enumerate(zip(got, want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape, n
    scale = np.max(np.abs(w)) + 1e-12
    np.testing.assert_allclose(g / scale, w / scale, rtol=rtol, atol=rtol, err_msg=f"gradient {n}")


def _lse_inputs(bq, bk, d, per_row_scale, seed=0):
  q, k = jnp.asarray(randn(seed, bq, d)), jnp.asarray(randn(seed + 1, bk, d))
  if per_row_scale:
    scale = jnp.asarray(np.random.default_rng(seed + 2).uniform(0.3, 2.0, bq), jnp.float32)
  else:
    scale = jnp.asarray(1.7, jnp.float32)
  return q, k, scale


# ------------------------------------------------------------------------------------------- logsumexp
# (Bq, Bk, D, tile, mask, per-row scale): every mask kind and both scale kinds over the shapes above.
LSE_CASES = [
    (8, 8, 4, 4, "none", False),
    (9, 10, 3, 4, "exclude", True),
    (9, 10, 3, 4, "both", False),
    (7, 11, 5, 5, "include", False),
    (7, 11, 5, 5, "both", True),
    (12, 7, 4, 3, "exclude", False),
    (12, 7, 4, 3, "include", True),
    (6, 10, 2, 16, "both", False),
    (16, 16, 8, 1, "none", True),
    (16, 16, 8, 1, "both", True),
    (40, 300, 16, 128, "both", True),
]


def _all_modes(engine, exclude, include):
  """Values and gradients of the weighted rows-only, cols-only and rows+cols results, one program."""

  def f(q, k, scale):
    out = []
    for rows, cols in [(True, False), (False, True), (True, True)]:
      loss = _weighted_lse(engine, rows, cols, exclude, include)
      (_, values), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, scale)
      out.append((values, grads))
    return out

  return jax.jit(f)


@pytest.mark.parametrize("bq,bk,d,tile,mask,per_row", LSE_CASES)
def test_logsumexp_matches_dense(bq, bk, d, tile, mask, per_row):
  exclude, include = _masks(mask, bq, bk)
  args = _lse_inputs(bq, bk, d, per_row)
  got_all = _all_modes(functools.partial(blockwise.logsumexp, tile=tile), exclude, include)(*args)
  want_all = _all_modes(dense.logsumexp, exclude, include)(*args)
  for (got, got_g), (want, want_g) in zip(got_all, want_all):
    for g, w in zip(got, want):
      if w is None:
        assert g is None
        continue
      assert g.dtype == jnp.float32 and g.shape == w.shape
      np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    _assert_close_grads(got_g, want_g)


@pytest.mark.parametrize("per_row_scale", [False, True])
def test_logsumexp_matches_float64_reference_and_finite_differences(per_row_scale):
  bq, bk, d, tile = 5, 7, 3, 3
  exclude, include = _masks("both", bq, bk, seed=4)
  q, k, scale = _lse_inputs(bq, bk, d, per_row_scale, seed=5)
  valid = np.asarray(
      (exclude[0][:, None] != exclude[1][None, :]) & (include[0][:, None] == include[1][None, :])
  )
  wr, wc = np.cos(np.arange(bq)), np.sin(1.0 + np.arange(bk))

  def ref(q, k, scale):
    s = np.reshape(scale, (-1, 1)) * (q @ k.T)
    total = 0.0
    for i in range(bq):
      if valid[i].any():
        total += wr[i] * reference.common.logsumexp(s[i, valid[i]])
    for j in range(bk):
      if valid[:, j].any():
        total += wc[j] * reference.common.logsumexp(s[valid[:, j], j])
    return total

  f = _weighted_lse(functools.partial(blockwise.logsumexp, tile=tile), True, True, exclude, include)
  args64 = [np.asarray(a, np.float64) for a in (q, k, scale)]
  (value, _), grads = _value_and_grads(f, q, k, scale, has_aux=True)
  np.testing.assert_allclose(float(value), ref(*args64), rtol=1e-5)
  for n, g in enumerate(grads):
    def fn(x, n=n):
      xs = list(args64)
      xs[n] = x
      return ref(*xs)

    want = reference.common.numerical_grad(fn, args64[n])
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-4, atol=1e-4, err_msg=f"arg {n}")


def test_empty_rows_and_columns_are_minus_inf_with_zero_gradient():
  q, k = jnp.asarray(randn(40, 6, 3)), jnp.asarray(randn(41, 9, 3))
  include = (jnp.asarray([0, 1, 5, 0, 1, 5]), jnp.asarray([0, 1, 0, 1, 7, 0, 1, 0, 1]))
  f = lambda q, k: blockwise.logsumexp(q, k, scale=2.0, rows=True, cols=True, exclude=None,
                                       include=include, tile=4)
  loss = lambda q, k: (sum(jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0)) for v in f(q, k)), f(q, k))
  (_, (row, col)), (gq, gk) = _value_and_grads(loss, q, k, has_aux=True)
  assert np.isneginf(np.asarray(row)).tolist() == [False, False, True, False, False, True]
  assert np.isneginf(np.asarray(col))[4] and np.isfinite(np.delete(np.asarray(col), 4)).all()
  assert np.all(np.asarray(gq)[[2, 5]] == 0) and np.all(np.asarray(gk)[4] == 0)
  assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gk))


def test_extreme_logits_stay_finite_and_match_dense():
  # Normalised rows at scale 100 (CLIP's clipped maximum) and raw rows of norm ~1e3.
  q, k = randn(42, 11, 4), randn(43, 11, 4)
  for qq, kk, scale in [
      (reference.common.normalize(q), reference.common.normalize(k), 100.0),
      (q * 300.0, k, 1.0),
  ]:
    qq, kk = jnp.asarray(qq, jnp.float32), jnp.asarray(kk, jnp.float32)
    kw = dict(scale=scale, rows=True, cols=True, exclude=ops.diagonal(11), include=None)
    both = lambda eng: (lambda a, b: (sum(jnp.sum(v) for v in eng(a, b, **kw)), eng(a, b, **kw)))
    (_, got), grads = _value_and_grads(both(functools.partial(blockwise.logsumexp, tile=4)), qq, kk,
                                       has_aux=True)
    (_, want), want_grads = _value_and_grads(both(dense.logsumexp), qq, kk, has_aux=True)
    for g, w in zip(got, want):
      assert np.all(np.isfinite(g))
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in grads)
    _assert_close_grads(grads, want_grads)


# ----------------------------------------------------------------------------------------- sigmoid_sum
@pytest.mark.parametrize(
    "bq,bk,d,tile,positives",
    [s + ("ids",) for s in SHAPES] + [s + ("diagonal",) for s in SHAPES if s[0] == s[1]],
)
def test_sigmoid_sum_matches_dense(bq, bk, d, tile, positives):
  pos = None if positives == "diagonal" else (_ids(7, bq, 3), _ids(8, bk, 3))
  q, k, scale = _lse_inputs(bq, bk, d, per_row_scale=bq % 2 == 1, seed=9)
  w = jnp.cos(jnp.arange(bq, dtype=jnp.float32))

  def loss(engine):
    def f(q, k, s, b):
      out = engine(q, k, scale=s, bias=b, positives=pos)
      return jnp.sum(w * out), out

    return f

  block = functools.partial(blockwise.sigmoid_sum, tile=tile)
  args = (q, k, scale, jnp.asarray(-1.3, jnp.float32))
  (_, got), got_g = _value_and_grads(loss(block), *args, has_aux=True)
  (_, want), want_g = _value_and_grads(loss(dense.sigmoid_sum), *args, has_aux=True)
  assert got.dtype == jnp.float32 and got.shape == (bq,)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  _assert_close_grads(got_g, want_g)


def test_sigmoid_sum_matches_float64_reference_and_finite_differences():
  bq, bk, d = 5, 7, 3
  pos = (_ids(10, bq, 3), _ids(11, bk, 3))
  z = np.where(np.asarray(pos[0])[:, None] == np.asarray(pos[1])[None, :], 1.0, -1.0)
  q, k, scale = _lse_inputs(bq, bk, d, per_row_scale=True, seed=12)
  w = np.cos(np.arange(bq))

  def ref(q, k, scale, bias):
    logits = np.reshape(scale, (-1, 1)) * (q @ k.T) + bias
    return np.sum(w * np.sum(reference.common.softplus(-z * logits), axis=1))

  f = lambda q, k, s, b: jnp.sum(
      jnp.asarray(w, jnp.float32) * blockwise.sigmoid_sum(q, k, scale=s, bias=b, positives=pos, tile=3)
  )
  args = (q, k, scale, jnp.asarray(0.7, jnp.float32))
  args64 = [np.asarray(a, np.float64) for a in args]
  value, grads = _value_and_grads(f, *args)
  np.testing.assert_allclose(float(value), ref(*args64), rtol=1e-5)
  for n, g in enumerate(grads):
    def fn(x, n=n):
      xs = list(args64)
      xs[n] = x
      return ref(*xs)

    np.testing.assert_allclose(
        np.asarray(g, np.float64), reference.common.numerical_grad(fn, args64[n]), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("tile", [3, 8])
def test_bf16_inputs_match_dense(tile):
  b, d = 20, 16
  q = jnp.asarray(reference.common.normalize(randn(50, b, d)), jnp.bfloat16)
  k = jnp.asarray(reference.common.normalize(randn(51, b, d)), jnp.bfloat16)
  scale = jnp.asarray(np.random.default_rng(52).uniform(5.0, 20.0, b), jnp.float32)
  exclude = ops.diagonal(b)
  lse = lambda eng: _weighted_lse(eng, True, True, exclude, None)
  (_, got), got_g = _value_and_grads(lse(functools.partial(blockwise.logsumexp, tile=tile)), q, k, scale,
                                     has_aux=True)
  (_, want), want_g = _value_and_grads(lse(dense.logsumexp), q, k, scale, has_aux=True)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32  # the same bf16 matmul with float32 accumulation as dense
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  assert got_g[0].dtype == jnp.bfloat16 and got_g[1].dtype == jnp.bfloat16
  assert got_g[2].dtype == jnp.float32
  _assert_close_grads(got_g, want_g, rtol=2e-2)

  sig = lambda eng: (lambda q, k, s: jnp.sum(eng(q, k, scale=s, bias=-3.0, positives=None)))
  got, got_g = _value_and_grads(sig(functools.partial(blockwise.sigmoid_sum, tile=tile)), q, k, scale)
  want, want_g = _value_and_grads(sig(dense.sigmoid_sum), q, k, scale)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  assert got_g[0].dtype == jnp.bfloat16
  _assert_close_grads(got_g, want_g, rtol=2e-2)


# ------------------------------------------------------------------------------- through the public API
def test_registered_and_picked_by_auto_above_the_dense_size():
  # Above DENSE_MAX_ELEMENTS auto is "pallas|blockwise": blockwise wherever the program is not lowered
  # for TPU / GPU (tests/ops/test_reductions.py checks which one each platform compiles).
  assert "blockwise" in ops.available_impls()
  n = int(np.sqrt(ops.DENSE_MAX_ELEMENTS)) + 1
  assert ops.resolve_impl("auto", n, n) == ops.BY_PLATFORM == "pallas|blockwise"
  assert ops.resolve_impl("auto", 8, 8) == "dense"


def test_public_reductions_with_per_row_scale(monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  q, k, scale = _lse_inputs(7, 10, 4, per_row_scale=True, seed=60)
  exclude = (_ids(61, 7, 2), _ids(62, 10, 2))
  got, want = (
      jax.jit(lambda q, k, s, impl=impl: ops.logsumexp(q, k, scale=s, rows=True, cols=True,
                                                       exclude=exclude, impl=impl))(q, k, scale)
      for impl in ("blockwise", "dense")
  )
  np.testing.assert_allclose(np.asarray(got.rows), np.asarray(want.rows), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.cols), np.asarray(want.cols), rtol=1e-5)
  grad = lambda impl: jax.jit(jax.grad(
      lambda s: jnp.sum(ops.sigmoid_sum(q, k, scale=s, bias=0.5, positives=exclude, impl=impl))
  ))(scale)
  np.testing.assert_allclose(np.asarray(grad("blockwise")), np.asarray(grad("dense")), rtol=1e-4)


LOSSES = {
    "infonce": lambda a, b, impl: losses.infonce(a, b, temperature=0.1, impl=impl),
    "infonce_queue": lambda a, b, impl: losses.infonce(
        a, b, temperature=0.2, negatives=jnp.asarray(randn(70, 13, a.shape[1])), impl=impl
    ),
    "moco": lambda a, b, impl: losses.infonce(
        a, b, temperature=0.2, negatives=jnp.asarray(randn(71, 13, a.shape[1])), in_batch_negatives=False,
        impl=impl,
    ),
    "nt_xent": lambda a, b, impl: losses.nt_xent(a, b, temperature=0.5, impl=impl),
    "dcl": lambda a, b, impl: losses.dcl(a, b, temperature=0.1, impl=impl),
    "dclw": lambda a, b, impl: losses.dclw(a, b, temperature=0.1, impl=impl),
    "clip": lambda a, b, impl: losses.clip(a, b, logit_scale=1 / 0.07, impl=impl),
    "siglip": lambda a, b, impl: losses.siglip(a, b, logit_scale=10.0, logit_bias=-10.0, impl=impl),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("tile", [3, 512])  # uneven tiles of 10, 13 and 20 columns; a single tile
def test_losses_blockwise_equal_dense(name, tile, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", tile)  # the module-level setting losses go through
  fn = LOSSES[name]
  a, b = jnp.asarray(randn(72, 10, 6)), jnp.asarray(randn(73, 10, 6))
  value = lambda impl: _value_and_grads(functools.partial(fn, impl=impl), a, b)
  (got, got_g), (want, want_g) = value("blockwise"), value("dense")
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  _assert_close_grads(got_g, want_g)


def test_losses_accept_impl_blockwise():
  a, b = jnp.asarray(randn(74, 6, 5)), jnp.asarray(randn(75, 6, 5))
  got = jax.jit(lambda a, b: (
      losses.clip(a, b, logit_scale=5.0, impl="blockwise"),
      losses.siglip(a, b, logit_scale=5.0, logit_bias=-2.0, impl="blockwise"),
      losses.nt_xent(a, b, temperature=0.5, impl="blockwise"),
  ))(a, b)
  want = (reference.clip.clip(a, b, 5.0), reference.clip.siglip(a, b, 5.0, -2.0), reference.infonce.nt_xent(a, b, 0.5))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_jit_vmap_and_traced_scale():
  a, b = randn(76, 3, 9, 4), randn(77, 3, 9, 4)
  f = lambda x, y, s: losses.clip(x, y, logit_scale=s, impl="blockwise")
  batched = jax.jit(jax.vmap(f, in_axes=(0, 0, None)))(a, b, 3.0)
  eager = [reference.clip.clip(a[i], b[i], 3.0) for i in range(3)]
  np.testing.assert_allclose(np.asarray(batched), eager, rtol=1e-5)
  g = jax.jit(jax.grad(f, argnums=2))(a[0], b[0], 3.0)
  want = reference.common.numerical_grad(lambda s: reference.clip.clip(a[0], b[0], s[()]), np.array(3.0))
  np.testing.assert_allclose(float(g), want, rtol=1e-4)


# -------------------------------------------------------------------------------------- memory, errors
def test_compiled_program_never_holds_a_b_by_b_buffer():
  b, d, tile = 2048, 32, 128
  x = jax.ShapeDtypeStruct((b, d), jnp.float32)
  square = b * b * 4

  def temp_bytes(impl):
    # normalize=False: the engine's own buffers (l2_normalize adds O(B·D) of its own, not B²)
    f = jax.jit(jax.grad(lambda i, t: losses.clip(i, t, logit_scale=10.0, normalize=False, impl=impl),
                         argnums=(0, 1)))
    compiled = f.lower(x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

  old, blockwise.DEFAULT_TILE = blockwise.DEFAULT_TILE, tile
  try:
    block_bytes, block_hlo = temp_bytes("blockwise")
  finally:
    blockwise.DEFAULT_TILE = old
  dense_bytes, dense_hlo = temp_bytes("dense")
  assert f"[{b},{b}]" in dense_hlo and dense_bytes >= square  # the measure does see a B×B buffer
  assert f"[{b},{b}]" not in block_hlo
  # O(B·tile + B·D): a few (B, tile) float32 tiles and (B, D) accumulators, far below B² floats.
  assert block_bytes < square / 8, (block_bytes, square)
  assert block_bytes < 8 * b * (tile + d) * 4, block_bytes


@pytest.mark.parametrize("tile", [0, -3, 2.5, True])
def test_bad_tile_is_a_clear_error(tile):
  q = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"`tile` must be a positive int"):
    blockwise.logsumexp(q, q, scale=1.0, rows=True, cols=False, exclude=None, include=None, tile=tile)
  with pytest.raises(ValueError, match=r"`tile` must be a positive int"):
    blockwise.sigmoid_sum(q, q, scale=1.0, bias=0.0, positives=None, tile=tile)


def test_nothing_requested_is_an_error():
  q = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="nothing to compute"):
    blockwise.logsumexp(q, q, scale=1.0, rows=False, cols=False, exclude=None, include=None)


def test_tiles_are_balanced():
  # ceil(Bk / tile) tiles of equal width: the slid-back last tile repeats fewer columns than tiles.
  assert blockwise.tile_size(512, 513, 8) == 257
  assert blockwise.tile_size(512, 1000, 8) == 500
  assert blockwise.tile_size(4, 10, 8) == 4 and blockwise.tile_size(3, 10, 8) == 3
  # tile=None: DEFAULT_TILE, narrower (2·D, at least 128) for small D.
  assert blockwise.tile_size(None, 100, 8) == 100
  assert blockwise.DEFAULT_TILE == 512
  assert blockwise.tile_size(None, 4096, 256) == 512
  assert blockwise.tile_size(None, 4096, 128) == 256
  assert blockwise.tile_size(None, 4096, 16) == 128


def test_bench_loss_smoke(tmp_path):
  # experiments/bench_loss.py end to end at toy sizes: the table, the JSON, the plot, a fresh-process RSS.
  import importlib.util
  import json
  import os

  path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments", "bench_loss.py")
  spec = importlib.util.spec_from_file_location("bench_loss", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  old = blockwise.DEFAULT_TILE
  try:
    bench.main(["--batches", "128,256", "--dims", "16", "--engines", "dense,blockwise", "--repeats", "3",
                "--tile", "64", "--no-rss", "--out-dir", str(tmp_path)])
  finally:
    blockwise.DEFAULT_TILE = old
  rss = bench.fresh_rss("blockwise", 128, 16, tile=64, timeout=300)
  assert rss["rss_peak"] >= rss["rss_compiled"] >= rss["rss_before"] > 0, rss
  rows = json.loads((tmp_path / "bench_loss.json").read_text())["rows"]
  assert [(r["engine"], r["B"]) for r in rows] == [
      ("dense", 128), ("blockwise", 128), ("dense", 256), ("blockwise", 256)
  ]
  for r in rows:
    assert r["time"] > 0 and r["R_time"] > 0 and r["R_tiled"] > 0 and r["temp_bytes"] > 0
  dense_temp = {r["B"]: r["temp_bytes"] for r in rows if r["engine"] == "dense"}
  assert dense_temp[256] > 3 * dense_temp[128]  # B² growth is visible in the measure
  table = (tmp_path / "bench_loss.md").read_text()
  assert "| blockwise | 256 | 16 |" in table and "Log-log slopes" in table
  assert (tmp_path / "bench_loss.png").stat().st_size > 1000
