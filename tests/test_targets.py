"""jaxcl.targets: devices of TPU slices and GPUs that are not here, and what their compiled programs hold."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcl import targets


@pytest.mark.parametrize("name, platform, devices, chips, kind", [
    ("v5e:2x2", "tpu", 4, 4, "TPU v5 lite"),
    ("v5e:16x16", "tpu", 256, 256, "TPU v5 lite"),
    ("v4:2x2x1", "tpu", 8, 4, "TPU v4"),  # two cores (devices) per v4 chip
    ("v5p:4x4x8", "tpu", 128, 128, "TPU v5"),
    ("h200:1x1x8", "gpu", 8, 8, "NVIDIA H200 141GB HBM3e"),
    ("h100:1x1x1", "gpu", 1, 1, "NVIDIA H100 80GB HBM3"),
])
def test_named_topologies_give_their_devices(name, platform, devices, chips, kind):
  t = targets.get(name)
  assert (t.platform, len(t.devices), t.chips, t.device_kind) == (platform, devices, chips, kind)
  assert {d.platform for d in t.devices} == {platform}


def test_gpu_memory_comes_from_the_shipped_spec():
  assert targets.get("h200:1x1x1").hbm_bytes == 151_397_597_184
  assert targets.get("h100:1x1x1").hbm_bytes == 84_942_979_072


@pytest.mark.parametrize("name, match", [
    ("v5litepod-4", "unknown topology 'v5litepod-4': expected a TPU slice like 'v5e:2x2'"),
    ("v9z:2x2", "unknown topology 'v9z:2x2'"),
    ("tpu", "unknown topology 'tpu'"),
    ("h200:8", "a GPU topology is 'h200:SLICESxHOSTSxGPUS'"),
    ("v5e:3x5", "libtpu refused topology 'v5e:3x5'"),
])
def test_bad_topology_names_say_what_is_expected(name, match):
  with pytest.raises(ValueError, match=match):
    targets.get(name)


def test_missing_compiler_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n in ("libtpu", "jax_plugins.xla_cuda12") else real(n, *a))
  targets.get.cache_clear()
  try:
    with pytest.raises(RuntimeError, match=rf"needs libtpu: pip install 'jax\[tpu\]=={jax.__version__}'"):
      targets.get("v5e:2x2")
    with pytest.raises(RuntimeError, match=rf"needs the CUDA plugin: pip install 'jax-cuda12-plugin=={jax.__version__}'"):
      targets.get("h200:1x1x1")
  finally:
    targets.get.cache_clear()


def test_mesh_shapes_and_refuses_a_wrong_shape():
  t = targets.get("v5e:2x2")
  assert targets.mesh(t).shape == {"data": 4}
  assert targets.mesh(t, ("data", "fsdp"), (2, 2)).shape == {"data": 2, "fsdp": 2}
  with pytest.raises(ValueError, match=r"mesh shape \(3, 1\) over axes \('data', 'fsdp'\) does not hold the 4"):
    targets.mesh(t, ("data", "fsdp"), (3, 1))


@pytest.mark.parametrize("name", ["v5e:2x2", "h200:1x1x2"])
def test_memory_of_a_sharded_program_is_per_device(name):
  """A (4096·n, 256) float32 matrix split over n devices: 4 MiB arguments per device, whatever n."""
  t = targets.get(name)
  mesh = targets.mesh(t)
  n = len(t.devices)
  spec = jax.ShapeDtypeStruct((4096 * n, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  compiled = jax.jit(lambda x: x * 2.0).lower(spec).compile()
  m = targets.memory(compiled)
  assert m.argument_bytes == 4096 * 256 * 4
  assert m.output_bytes == 4096 * 256 * 4
  assert m.total_bytes == m.argument_bytes + m.temp_bytes + m.output_bytes - m.alias_bytes
  assert targets.kernel_calls(compiled) == {"mosaic": 0, "triton": 0}
