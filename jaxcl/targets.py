"""Accelerators that are not here: the devices of a named TPU slice or GPU machine, to compile for.

XLA compiles for a TPU or GPU it cannot see ("deviceless" compilation): `libtpu` (installed by
`pip install "jax[tpu]==<jax version>"`) describes any TPU slice, and `jax-cuda12-plugin` (same version as
jax; the nvidia-* wheels are not needed) describes a GPU from its target spec, shipped here for an H100
SXM and an H200. The devices of a `Target` build a `jax.sharding.Mesh` like real ones; a program lowered
with `jax.ShapeDtypeStruct`s sharded over that mesh and `.compile()`d runs the real XLA TPU compiler and
Mosaic (the Pallas TPU kernels), or the XLA GPU compiler and Triton, and reports per-device memory
(`compiled.memory_analysis()`). Nothing runs: the numbers are the compiler's, not a measurement.

Topology names: a TPU generation and its chip grid as libtpu names them (`v5e:2x2` is 4 chips,
`v5e:16x16` 256, `v4:2x2x1`, `v5p:4x4x8`), or a GPU and "slices x hosts x GPUs" (`h200:1x1x8`: one host
with eight H200). Run with `JAX_PLATFORMS=cpu` (the test suite and `jaxcl.plan` set it).

    target = targets.get("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(target.devices), ("data",))
    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct(shape, dtype, sharding=...)).compile()

Per-device memory: TPU v4 (and v2, v3) show two devices per chip here (the cores; a v4 program run on a
real slice uses both cores of a chip as one device), so their `hbm_bytes` is a core's share of the chip.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import os
import re

import jax

GiB = 1 << 30

# HBM per jax device (per chip; per core where the topology gives a device per core).
TPU_HBM_BYTES = {
    "v2": 8 * GiB,
    "v3": 16 * GiB,
    "v4": 16 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
}
# GPU target specs shipped in `jaxcl/gpu_targets/` (XLA's GpuTargetConfig text format).
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}

_NAME = re.compile(r"^(?P<family>[a-z0-9]+):(?P<grid>[0-9]+(x[0-9]+)*)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices of one named slice or machine.

  Attributes:
    name: the topology name as given ("v5e:2x2").
    platform: "tpu" or "gpu" (what `jax.lax.platform_dependent` and the kernels dispatch on).
    devices: the jax devices, in the order libtpu / the GPU plugin give them.
    device_kind: e.g. "TPU v5 lite", "NVIDIA H200 141GB HBM3e".
    hbm_bytes: memory of one device.
    chips: number of chips (TPU v2-v4 have two devices, the cores, per chip).
  """

  name: str
  platform: str
  devices: tuple
  device_kind: str
  hbm_bytes: int
  chips: int


def names_help() -> str:
  return ("a TPU slice like 'v5e:2x2', 'v5e:16x16', 'v4:2x2x1', 'v5p:4x4x8' (generations: "
          f"{', '.join(TPU_HBM_BYTES)}) or GPUs like 'h200:1x1x8' (slices x hosts x GPUs; GPUs: "
          f"{', '.join(GPU_SPECS)})")


def parse(name: str) -> tuple[str, str]:
  """`name` -> (family, grid), checked before any compiler is loaded.

  >>> parse("v5e:2x2")
  ('v5e', '2x2')
  """
  match = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
  if match is None or match["family"] not in {**TPU_HBM_BYTES, **GPU_SPECS}:
    raise ValueError(f"unknown topology {name!r}: expected {names_help()}.")
  family, grid = match["family"], match["grid"]
  if family in GPU_SPECS and grid.count("x") != 2:
    raise ValueError(f"topology {name!r}: a GPU topology is '{family}:SLICESxHOSTSxGPUS', e.g. '{family}:1x1x8'.")
  return family, grid


@functools.cache
def get(name: str) -> Target:
  """The `Target` of a topology name (see the module docstring); cached per name.

  Errors say what to install when libtpu or the CUDA plugin is missing, and name the topology when the
  compiler refuses it.
  """
  family, grid = parse(name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if family in GPU_SPECS:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
      raise RuntimeError(
          f"compiling for {name!r} needs the CUDA plugin: pip install 'jax-cuda12-plugin=={jax.__version__}' "
          "(or `pip install 'jaxcl[compile]'`), then run with JAX_PLATFORMS=cpu.")
    spec = importlib.resources.files("jaxcl.gpu_targets").joinpath(GPU_SPECS[family]).read_text()
    try:
      topo = topologies.get_topology_desc(family, "cuda", target_config=spec, topology=grid)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(f"the CUDA plugin refused topology {name!r}: {_first_line(e)}") from e
    devices = tuple(topo.devices)
    memory = int(re.search(r"device_memory_size:\s*(\d+)", spec).group(1))
    return Target(name, "gpu", devices, devices[0].device_kind, memory, len(devices))
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        f"compiling for {name!r} needs libtpu: pip install 'jax[tpu]=={jax.__version__}' "
        "(or `pip install 'jaxcl[compile]'`), then run with JAX_PLATFORMS=cpu.")
  # Describing a slice holds no chip: let several processes (planners, test runs) load libtpu at once
  # instead of the second failing on libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topo = topologies.get_topology_desc(topology_name=f"{family}:{grid}", platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"libtpu refused topology {name!r}: {_first_line(e)}; expected {names_help()}.") from e
  devices = tuple(topo.devices)
  chips = len({tuple(d.coords) for d in devices})
  return Target(name, "tpu", devices, devices[0].device_kind, TPU_HBM_BYTES[family], chips)


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def mesh(target: Target, axis_names: tuple[str, ...] = ("data",), shape: tuple[int, ...] | None = None):
  """A mesh over the target's devices (all along the first axis unless `shape` is given), Auto axes."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  shape = (len(target.devices),) + (1,) * (len(axis_names) - 1) if shape is None else tuple(shape)
  if int(np.prod(shape)) != len(target.devices) or len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} over axes {axis_names} does not hold the {len(target.devices)} "
                     f"devices of {target.name!r}.")
  auto = (jax.sharding.AxisType.Auto,) * len(axis_names)
  return jax.sharding.Mesh(np.array(target.devices).reshape(shape), axis_names, axis_types=auto)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of a compiled program (`compiled.memory_analysis()`)."""

  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int

  @property
  def total_bytes(self) -> int:
    """Arguments + temporaries + outputs, less the outputs that reuse (donated) argument buffers."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def memory(compiled) -> Memory:
  m = compiled.memory_analysis()
  return Memory(int(m.argument_size_in_bytes), int(m.temp_size_in_bytes), int(m.output_size_in_bytes),
                int(m.alias_size_in_bytes))


def kernel_calls(compiled) -> dict[str, int]:
  """Counts of the fused-kernel custom calls in compiled HLO: Mosaic (TPU) and Triton (GPU)."""
  text = compiled.as_text()
  return {"mosaic": text.count('custom_call_target="tpu_custom_call"'),
          "triton": text.count('custom_call_target="__gpu$xla.gpu.triton"')}
