"""jaxcl.train.devices: the (data, fsdp) mesh and the FSDP parameter sharding, and the images sent to
the devices as float32 or uint8 (`encode_images` / `decode_images`)."""

import jax
import numpy as np
import pytest

from jaxcl.train import devices, loop, validation
from jaxcl.train import state as state_lib
from tests.helpers import load_recipe, step_and_batches, tiny


def test_fsdp_mesh_and_gradient_accumulation(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=2)
  config.mesh.fsdp = 2  # 4 data × 2 fsdp over the 8 test devices
  config.grad_accum_steps = 2
  config.eval.at_end = True  # the evaluation embeds with the FSDP-sharded parameters
  mesh = devices.make_mesh(config)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  setup = state_lib.build_setup(config)
  _, shardings = state_lib.state_shardings(config, setup, mesh)
  specs = [s.spec for s in jax.tree.leaves(shardings.params, is_leaf=lambda x: hasattr(x, "spec"))]
  assert any("fsdp" in tuple(spec) for spec in specs)  # some parameters really are sharded
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 2 and np.isfinite(results["knn_accuracy"])


def test_uint8_transfer_is_the_step_on_the_images_rounded_to_8_bits(data_dir):
  """`config.data.transfer_dtype = "uint8"`: the loop sends (b, H·W·C) uint8 (`encode_images`) and the
  step decodes it; the result is the float32 step on the same images rounded to 256 levels (to float32
  rounding; the images are perturbed off the digits' 8-bit levels so that rounding is visible). The flat
  float32 form decodes to the (b, H, W, C) images themselves."""
  config = tiny(load_recipe("clip_digits"), data_dir)
  setup, state, step, batches, mesh = step_and_batches(config)
  host = setup.text.prepare(config, next(batches), 0)
  images = np.clip(host["image"] + np.random.default_rng(0).uniform(-0.002, 0.002, host["image"].shape), 0, 1)
  host = dict(host, image=images.astype(np.float32))
  rounded = (np.round(host["image"] * 255) / 255).astype(np.float32)
  assert not np.array_equal(rounded, host["image"])
  flat = devices.encode_images(rounded, "float32")
  assert flat.shape == (rounded.shape[0], rounded[0].size)
  np.testing.assert_array_equal(np.asarray(devices.decode_images(flat, setup.info.image_shape)), rounded)
  encoded = devices.encode_images(host["image"], "uint8")
  assert encoded.dtype == np.uint8
  # the step's own u8 / 255 against the rounded float32 images (the compiler may multiply by 1/255)
  (got, got_metrics), (want, want_metrics) = (
      step(state, devices.to_global(dict(host, image=image), mesh)) for image in (encoded, flat))
  np.testing.assert_allclose(float(got_metrics["loss"]), float(want_metrics["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with config.unlocked():
    config.data.transfer_dtype = "float16"
  with pytest.raises(ValueError, match=r"`config.data.transfer_dtype` must be one of \('float32', 'uint8'\), "
                                       r"got 'float16'"):
    validation.validate_config(config, data=False)
