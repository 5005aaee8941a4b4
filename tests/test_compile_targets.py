"""The `pallas` kernels and the engines compiled for real TPUs and GPUs (deviceless, `jaxcl.targets`).

Each case lowers `jax.value_and_grad` of a public loss (forward and backward kernels) for one chip of a
named slice, or for a whole slice with the batch sharded over it, and runs the real XLA TPU compiler and
Mosaic, or the XLA GPU compiler and Triton, on this CPU. Nothing runs: the checks are on the compiled
program, its fused-kernel custom calls, collectives, output types and the compiler's per-device memory.

The cases are a covering set, not the full product: in each family every value of every axis (kernel
path, dtype, feature size D, mask kind, topology) appears at least once, and the test id names them.
B is never a multiple of the tile, so every kernel masks padded rows and columns.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jaxcl.ops.pallas as engine
from jaxcl import losses
from jaxcl import targets
from jaxcl.ops import blockwise

# Kernel cases: 12300 rows, a multiple of neither the TPU tiles (256 × 512, 16-row packing) nor the GPU
# ones (16…64). Its (B, B) float32 similarity matrix (605 MB) is far larger than any VMEM or cache, so a
# compiled program that held it would show it in its temporaries (the dense engine's gradient holds
# about B²·4 bytes of them).
B = 12300
F32, BF16 = jnp.float32, jnp.bfloat16


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _pair(d, dtype, sharding, n=B):
  return _struct((n, d), dtype, sharding), _struct((n, d), dtype, sharding)


def _ids(n, sharding):
  return _struct((n,), jnp.int32, sharding)


def _mask(n, sharding):
  return _struct((n,), jnp.bool_, sharding)


# Each loss: (function of (x, y, extra...), extra inputs as structs) -> what value_and_grad differentiates.
# The mask kind each one feeds the kernels: "valid" is `mask=` (row_valid / col_valid, folded into include
# ids), "exclude" the self-pair ids of NT-Xent, "include" the cluster ids of MCL's NT-Xent.
def _loss(name, impl, mesh=None):
  kw = dict(impl=impl) if mesh is None else dict(impl=impl, mesh=mesh)
  if name == "clip":
    return lambda x, y, *_: losses.clip(x, y, logit_scale=10.0, normalize=False, **kw)
  if name == "clip-valid":
    return lambda x, y, m: losses.clip(x, y, logit_scale=10.0, mask=m, normalize=False, **kw)
  if name == "siglip":
    return lambda x, y, *_: losses.siglip(x, y, logit_scale=10.0, logit_bias=-10.0, normalize=False, **kw)
  if name == "siglip-valid":
    return lambda x, y, m: losses.siglip(x, y, logit_scale=10.0, logit_bias=-10.0, mask=m, normalize=False,
                                         **kw)
  if name == "nt_xent-exclude":
    return lambda x, y, *_: losses.nt_xent(x, y, temperature=0.1, normalize=False, **kw)
  if name == "mcl-include-exclude":
    return lambda x, y, c: losses.mcl_nt_xent(x, y, c, temperature=0.1, normalize=False, **kw)
  raise ValueError(name)


def _extras(name, n, sharding):
  if name in ("clip-valid", "siglip-valid"):
    return (_mask(n, sharding),)
  if name == "mcl-include-exclude":
    return (_ids(n, sharding),)
  return ()


def _compile(loss, x, y, extras):
  grad = jax.value_and_grad(loss, argnums=(0, 1))
  return jax.jit(grad).lower(x, y, *extras).compile()


def _check_outputs(compiled, x):
  value, (dx, dy) = compiled.out_info
  assert (value.shape, value.dtype) == ((), F32)
  assert (dx.shape, dx.dtype) == (x.shape, x.dtype)
  assert (dy.shape, dy.dtype) == (x.shape, x.dtype)


# Mosaic / Triton calls per compiled forward + backward: the forward one call, or two where the column
# log-sum-exp is a second (swapped) pass; the backward one fused kernel (`Settings.fused_backward`, the
# default; TPU: one call site, in a loop where the rows need several calls; GPU: dk summed by atomics),
# else a dq and a dk kernel (fused_backward=False, the ring's hops).
def _expected_calls(name, separate_cols, fused_backward):
  forward = 2 if name.startswith("clip") and separate_cols else 1
  return forward + (1 if fused_backward else 2)


def _rows(name, n):
  """Rows of the similarity matrix a loss reduces: both views stacked for NT-Xent and its variants."""
  return 2 * n if name.startswith(("nt_xent", "mcl")) else n


def _check_temp_bytes(compiled, rows, cols, d, keys, tile=0):
  """Temporaries O(keys · D + rows · tile), and not half of one (rows, cols) float32 block of S.

  `keys`: the rows of the (keys, D) operands a device holds at once (the global batch for a single
  device and allgather, its own shard for ring): 12 float32 copies of those (padded inputs, float32
  gradient accumulators, their scaled and summed versions), two float32 (rows, tile) tiles of an XLA
  loop (`tile`; the Pallas tiles stay on chip) and 4 MiB for vectors.
  """
  temp = targets.memory(compiled).temp_bytes
  assert temp < rows * cols * 4 // 2
  assert temp <= 12 * keys * (-(-d // 128) * 128) * 4 + 2 * rows * tile * 4 + (4 << 20)


# ------------------------------------------------------------------------------------- TPU (Mosaic)
# (topology, loss, dtype, D, separate column pass)
TPU_CASES = [
    ("v5e:2x2", "clip-valid", F32, 64, False),              # fused rows + cols, valid
    ("v5p:2x2x1", "clip", BF16, 768, True),                 # separate column pass, no mask
    ("v5e:2x2", "nt_xent-exclude", BF16, 128, False),       # rows, exclude
    ("v5p:2x2x1", "mcl-include-exclude", BF16, 256, False),  # rows, include + exclude
    ("v5p:2x2x1", "siglip-valid", F32, 128, False),         # sigmoid, valid positives
]


def _tpu_id(case):
  topo, name, dtype, d, separate = case
  path = "sigmoid" if name.startswith("siglip") else "lse-cols-pass" if separate else (
      "lse-fused" if name.startswith("clip") else "lse-rows")
  return f"{topo}-{path}-{name}-{jnp.dtype(dtype).name}-D{d}"


@pytest.mark.parametrize("topo, name, dtype, d, separate_cols", TPU_CASES, ids=map(_tpu_id, TPU_CASES))
def test_tpu_kernels_compile_with_mosaic(topo, name, dtype, d, separate_cols):
  one = SingleDeviceSharding(targets.get(topo).devices[0])
  x, y = _pair(d, dtype, one)
  fused_limit = 1024 if separate_cols else engine.Settings().max_fused_cols
  settings = engine.Settings(flavour="tpu", interpret=False, max_fused_cols=fused_limit)
  compiled = _compile(_loss(name, settings), x, y, _extras(name, B, one))
  assert targets.kernel_calls(compiled) == {"mosaic": _expected_calls(name, separate_cols, True), "triton": 0}
  _check_outputs(compiled, x)
  n = _rows(name, B)
  _check_temp_bytes(compiled, n, n, d, n)


@pytest.mark.parametrize("topo", ["v5e:2x2", "v4:2x2x1"])
def test_tpu_fused_backward_is_one_kernel_of_three_matmuls(topo):
  """`Settings.fused_backward` (the TPU default): clip's and siglip's value and gradient are two Mosaic
  kernels, the forward (clip: rows + columns in one pass) and the backward (dq and dk from one
  recomputation of S), for float32 and bf16, D = 128 and 768 (on v4, 16 MiB of VMEM, D = 768 splits the
  rows into calls of one kernel in a loop). The compiled flops (the kernels' cost estimates) are those
  of 4 B²D-matmuls against 5 with the dq and dk kernels (3 calls). On v4 only the D = 768 cases (what
  differs there: the loop), for the suite's time."""
  one = SingleDeviceSharding(targets.get(topo).devices[0])
  flops = {}
  cases = (("clip", 128, F32, True), ("clip", 128, F32, False), ("clip", 768, F32, True),
           ("clip", 128, BF16, True), ("clip", 768, BF16, True),
           ("siglip", 128, F32, True), ("siglip", 128, F32, False), ("siglip", 768, BF16, True))
  for name, d, dtype, fused in cases if topo.startswith("v5e") else [c for c in cases if c[1] == 768]:
    x, y = _pair(d, dtype, one)
    settings = engine.Settings(flavour="tpu", interpret=False, fused_backward=fused)
    compiled = _compile(_loss(name, settings), x, y, ())
    assert targets.kernel_calls(compiled) == {"mosaic": 2 if fused else 3, "triton": 0}, (name, d, dtype)
    _check_outputs(compiled, x)
    _check_temp_bytes(compiled, B, B, d, B)
    if d == 128 and dtype == F32:  # B rows in one call: no loop (whose body the flops count once)
      flops[name, fused] = compiled.cost_analysis()["flops"]
  for name in ("clip", "siglip") if flops else ():  # (padded) 4 matmuls against 5
    assert flops[name, True] / flops[name, False] == pytest.approx(4 / 5, abs=1e-3), name


# ------------------------------------------------------------------------------------- GPU (Triton)
GPU_CASES = [
    ("h100:1x1x1", "clip-valid", F32, 64),             # rows + cols (two passes), valid
    ("h200:1x1x1", "siglip", BF16, 768),               # sigmoid, diagonal positives
    ("h100:1x1x1", "nt_xent-exclude", BF16, 128),      # rows, exclude
    ("h200:1x1x1", "mcl-include-exclude", BF16, 256),  # rows, include + exclude
]


def _gpu_id(case):
  topo, name, dtype, d = case
  path = "sigmoid" if name.startswith("siglip") else "lse-rows-cols" if name.startswith("clip") else "lse-rows"
  return f"{topo}-{path}-{name}-{jnp.dtype(dtype).name}-D{d}"


@pytest.mark.parametrize("topo, name, dtype, d", GPU_CASES, ids=map(_gpu_id, GPU_CASES))
def test_gpu_kernels_compile_with_triton(topo, name, dtype, d):
  one = SingleDeviceSharding(targets.get(topo).devices[0])
  x, y = _pair(d, dtype, one)
  compiled = _compile(_loss(name, engine.Settings(flavour="gpu", interpret=False)), x, y, _extras(name, B, one))
  assert targets.kernel_calls(compiled) == {"mosaic": 0, "triton": _expected_calls(name, True, True)}
  _check_outputs(compiled, x)
  n = _rows(name, B)
  _check_temp_bytes(compiled, n, n, d, n)


# (topology, loss, dtype, D): both families, float32 and bf16, both GPUs.
GPU_FUSED_CASES = [
    ("h100:1x1x1", "clip", F32, 64),
    ("h200:1x1x1", "clip", BF16, 512),
    ("h200:1x1x1", "siglip", F32, 64),
    ("h100:1x1x1", "siglip", BF16, 256),
]


@pytest.mark.parametrize("topo, name, dtype, d", GPU_FUSED_CASES,
                         ids=[f"{t}-{n}-{jnp.dtype(dt).name}-D{d}" for t, n, dt, d in GPU_FUSED_CASES])
def test_gpu_fused_backward_is_one_triton_call_fewer(topo, name, dtype, d):
  """`Settings.fused_backward` (the default) on GPU: the backward is one Triton kernel (dq in registers,
  dk by float32 atomics: 3 matmuls per tile) where `fused_backward=False` compiles a dq and a dk kernel
  (4); the forward is unchanged (clip: a row and a column pass). Same outputs, temporaries O(B·D)."""
  one = SingleDeviceSharding(targets.get(topo).devices[0])
  x, y = _pair(d, dtype, one)
  calls = {}
  for fused in (True, False):
    settings = engine.Settings(flavour="gpu", interpret=False, fused_backward=fused)
    compiled = _compile(_loss(name, settings), x, y, ())
    calls[fused] = targets.kernel_calls(compiled)
    _check_outputs(compiled, x)
    _check_temp_bytes(compiled, B, B, d, B)
  forward = 2 if name == "clip" else 1
  assert calls == {True: {"mosaic": 0, "triton": forward + 1}, False: {"mosaic": 0, "triton": forward + 2}}


@pytest.mark.parametrize("topo, n", [("h200:1x1x1", 65536), ("v5e:2x2", 65536)])
def test_fused_backward_temporaries_stay_near_the_inputs(topo, n):
  """clip's value and gradient at the default impl (the fused backward), bf16, D = 512, one chip: the
  epilogue writes dq = scale · g in bf16 and dscale (`engines.scale_grads`), so the float32 (B, D) g is
  never live beside the float32 dk (before: 2.008x the inputs on the H200). What stays is dk (float32:
  the inputs' bytes) and (B,) vectors: at most 1.1x the inputs (2 · B · D · 2 bytes)."""
  one = SingleDeviceSharding(targets.get(topo).devices[0])
  x, y = _pair(512, BF16, one, n)
  with jax.default_matmul_precision("default"):  # Mosaic refuses a bf16 dot at "highest" (conftest)
    compiled = _compile(_loss("clip", "auto"), x, y, ())
  assert targets.kernel_calls(compiled)["triton" if topo.startswith("h") else "mosaic"] > 0
  _check_outputs(compiled, x)
  assert targets.memory(compiled).temp_bytes <= 1.1 * (2 * n * 512 * 2)


def _transfer(line: str) -> str | None:
  """"block" for the start of an asynchronous collective-permute of a matrix (a block of keys or
  queries), "vector" for one of a vector (ids, scales, statistics), "done" for a completion, else None."""
  if "collective-permute-start(" in line:
    shape = re.search(r"= \(\w+\[([\d,]*)\]", line)
    return "block" if shape and "," in shape.group(1) else "vector"
  return "done" if "collective-permute-done(" in line else None


def _check_double_buffered(hlo: str):
  """In every loop body of the compiled rings, each block transfer (an asynchronous collective-permute
  of a (B/n, D) matrix) starts before the hop's first kernel call, and every transfer is waited for
  after its last one: the next block travels while this one is reduced. (The small vectors that travel
  too, ids and statistics, are left to the compiler's scheduler, which may start them after the kernel
  next to lighter work: microseconds of latency.)"""
  bodies = [c for c in re.split(r"\n(?=\S)", hlo)
            if not c.startswith("ENTRY") and "tpu_custom_call" in c and "collective-permute-start" in c]
  assert len(bodies) == 3  # the forward ring's and the backward's two (key blocks: dq, query blocks: dk)
  for body in bodies:
    events = [_transfer(line) or "kernel" for line in body.splitlines()
              if _transfer(line) or 'custom_call_target="tpu_custom_call"' in line]
    kernels = [i for i, e in enumerate(events) if e == "kernel"]
    assert events.count("block") >= 1 and kernels
    assert all(i < kernels[0] for i, e in enumerate(events) if e == "block"), events
    assert all(i > kernels[-1] for i, e in enumerate(events) if e == "done"), events


# -------------------------------------------------------------------------------------------- engines
# 20224 rows: 16-row shards on 4 and 8 devices, not a multiple of the blockwise tile (512); one device's
# block of S, (B/n) × B float32, is 400 MB or more: beyond any VMEM, it would show in the temporaries.
B_ENGINES = 20224
# (topology, impl, loss, dtype, D, collective expected in the compiled HLO)
ENGINE_CASES = [
    ("v5e:2x2", "blockwise", "clip", BF16, 256, None),
    ("v5e:2x2", "allgather", "clip-valid", BF16, 128, "all-gather"),
    ("v5e:2x2", "ring", "siglip", BF16, 128, "collective-permute"),
    ("v4:2x2x1", "ring", "clip", BF16, 256, "collective-permute"),
    ("h200:1x1x4", "ring", "clip", F32, 128, "collective-permute"),
]


def _engine_id(case):
  topo, impl, name, dtype, d, _ = case
  return f"{topo}-{impl}-{name}-{jnp.dtype(dtype).name}-D{d}"


@pytest.mark.parametrize("topo, impl, name, dtype, d, collective", ENGINE_CASES,
                         ids=map(_engine_id, ENGINE_CASES))
def test_engines_compile_for_a_slice(topo, impl, name, dtype, d, collective):
  target = targets.get(topo)
  if impl == "blockwise":
    n, sharding, mesh = 1, SingleDeviceSharding(target.devices[0]), None
  else:
    mesh = targets.mesh(target)
    n, sharding = len(target.devices), NamedSharding(mesh, P("data"))
  x, y = _pair(d, dtype, sharding, B_ENGINES)
  compiled = _compile(_loss(name, impl, mesh), x, y, _extras(name, B_ENGINES, sharding))
  _check_outputs(compiled, x)
  text = compiled.as_text()
  if collective is None:
    assert "all-gather" not in text and "collective-permute" not in text
  else:
    assert collective in text
  if impl == "ring":
    assert "all-gather" not in text  # the keys travel, they are never gathered
  # The fused kernels wherever a sharded engine runs on a TPU or GPU: on the gathered keys (allgather,
  # with the fused backward on TPU), at every hop of the ring (its loop body and its last step are two
  # copies of the hop; its backward rings run the dq and the dk kernel).
  flavour = "triton" if target.platform == "gpu" else "mosaic"  # Triton: the column pass is separate
  calls = {"blockwise": 0, "allgather": _expected_calls(name, flavour == "triton", True),
           "ring": 2 * _expected_calls(name, flavour == "triton", False)}[impl]
  assert targets.kernel_calls(compiled) == {"mosaic": 0, "triton": 0, flavour: calls}
  if impl == "ring" and flavour == "mosaic":
    _check_double_buffered(text)
  local = B_ENGINES // n
  inputs = 2 * local * d * jnp.dtype(dtype).itemsize
  assert inputs <= targets.memory(compiled).argument_bytes <= inputs + (64 << 10)  # a shard per device
  _check_temp_bytes(compiled, local, B_ENGINES, d, local if impl == "ring" else B_ENGINES,
                    tile=blockwise.DEFAULT_TILE)
