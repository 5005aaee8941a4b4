"""jaxcl.models.resnet: forward passes against the float64 NumPy reference, parameter counts, stems,
BatchNorm state, group and layer norms, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models.resnet import ResNet
from jaxcl.models.resnet import ResNet18
from jaxcl.models.resnet import ResNet50
from tests.helpers import abstract_init, assert_close, key, n_params, randn, random_variables
from tests.models.reference import f64, np_resnet


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("small_image", [True, False])
def test_resnet_matches_numpy_reference(block, small_image):
  stage_sizes = (2, 1)
  model = ResNet(stage_sizes=stage_sizes, block=block, width=4, small_image=small_image)
  x = randn(0, 2, 16, 16, 3)
  variables = random_variables(model, x, train=False, seed=2)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  want = np_resnet(variables["params"], variables["batch_stats"], x.astype(np.float64), stage_sizes,
                   block, small_image)
  assert got.shape == (2, model.output_dim) == want.shape
  assert_close(got, want)


@pytest.mark.parametrize(
    "model,image,want",
    [
        (ResNet18(small_image=False), 224, 11_176_512),  # torchvision resnet18: 11,689,512 − fc 513,000
        (ResNet18(small_image=True), 32, 11_168_832),    # 7x7x3x64 stem → 3x3x3x64
        (ResNet50(small_image=False), 224, 23_508_032),  # torchvision resnet50: 25,557,032 − fc 2,049,000
    ],
)
def test_resnet_parameter_counts(model, image, want):
  variables = abstract_init(model, 1, image, image, 3)
  assert n_params(variables) == want
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, image, image, 3)), train=False), variables)
  assert out.shape == (2, model.output_dim)
  assert model.output_dim == (512 if model.block == "basic" else 2048)


@pytest.mark.parametrize("small_image,stage1_size", [(True, 32), (False, 8)])
def test_resnet_stems(small_image, stage1_size):
  model = ResNet18(small_image=small_image)
  x = jnp.zeros((1, 32, 32, 3))
  variables = abstract_init(model, 1, 32, 32, 3)
  _, state = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
      variables,
  )
  inter = state["intermediates"]
  stem = inter["stem_conv"]["__call__"][0].shape
  assert stem == (1, 32 if small_image else 16, 32 if small_image else 16, 64)
  k = 3 if small_image else 7
  assert variables["params"]["stem_conv"]["kernel"].shape == (k, k, 3, 64)
  sizes = [inter[f"stage{i}_block1"]["__call__"][0].shape[1] for i in (1, 2, 3, 4)]
  assert sizes == [stage1_size, stage1_size // 2, stage1_size // 4, stage1_size // 8]


def test_resnet_batch_stats_update_in_train_mode_only():
  model = ResNet(stage_sizes=(1, 1), width=4)
  x = randn(3, 4, 8, 8, 3)
  variables = random_variables(model, x, train=False, seed=3)
  stats0 = variables["batch_stats"]
  out, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
  )
  # Running averages: new = 0.9 · old + 0.1 · batch statistic (biased variance).
  conv = np.asarray(updates["intermediates"]["stem_conv"]["__call__"][0], np.float64)
  new, old = updates["batch_stats"]["stem_norm"], f64(stats0["stem_norm"])
  assert_close(new["mean"], 0.9 * old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)), atol=1e-6)
  assert_close(new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)), atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(a, b)
  # Eval mode: nothing to update, statistics untouched, and an example's output does not depend on
  # the rest of its batch; in train mode (batch statistics) it does.
  eval_out, eval_state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(eval_state["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  alone = model.apply(variables, x[:1], train=False)
  assert_close(alone[0], np.asarray(eval_out[0], np.float64), atol=1e-6)
  train_alone, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
  assert not np.allclose(train_alone[0], out[0], atol=1e-4)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_resnet_group_and_layer_norm(norm):
  model = ResNet(stage_sizes=(1, 1), width=8, norm=norm, groups=4)
  x = randn(4, 3, 8, 8, 3)
  variables = random_variables(model, x, train=True, seed=4)
  assert set(variables) == {"params"}  # no running statistics
  if norm == "group":
    assert variables["params"]["stem_norm"]["scale"].shape == (8,)
  out = model.apply(variables, x, train=True)
  assert out.shape == (3, 16) and np.all(np.isfinite(out))
  # Per-example normalisation: an example's features do not depend on its batch.
  assert_close(model.apply(variables, x[1:2], train=True)[0], np.asarray(out[1], np.float64), atol=1e-5)


def test_resnet_bad_inputs():
  model = ResNet(stage_sizes=(1,), width=4)
  with pytest.raises(ValueError, match=r"`x` must have rank 4.*\(2, 8, 8\)"):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros((2, 8, 8)), train=False))
  with pytest.raises(ValueError, match=r"`norm` must be one of .*'batchnorm'"):
    jax.eval_shape(lambda: ResNet(stage_sizes=(1,), norm="batchnorm").init(key(0), jnp.zeros((1, 8, 8, 3))))
  with pytest.raises(ValueError, match=r"`block` must be one of"):
    jax.eval_shape(lambda: ResNet(stage_sizes=(1,), block="wide").init(key(0), jnp.zeros((1, 8, 8, 3))))
  with pytest.raises(TypeError, match=r"`x` must be a floating-point array"):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros((1, 8, 8, 3), jnp.int32), train=False))



def test_resnet_feature_map_is_the_last_stage_before_the_pool():
  model = ResNet(stage_sizes=(1, 1), width=4)  # 8x8 → stage 2 (stride 2) 4x4
  x = randn(6, 2, 8, 8, 3)
  variables = random_variables(model, x, train=False, seed=5)

  def run(v, x):
    train_map = model.apply(v, x, train=True, method="feature_map", mutable=["batch_stats"])[1]
    train_call = model.apply(v, x, train=True, mutable=["batch_stats"])[1]
    return model.apply(v, x, method="feature_map"), model.apply(v, x), train_map, train_call

  fmap, pooled, stats_map, stats_call = jax.jit(run)(variables, x)
  assert fmap.shape == (2, 4, 4, model.output_dim)
  np.testing.assert_array_equal(np.asarray(jnp.mean(fmap, axis=(1, 2))), np.asarray(pooled))
  # Train mode: the same running-statistics update whichever method runs.
  for a, b in zip(jax.tree.leaves(stats_map), jax.tree.leaves(stats_call)):
    np.testing.assert_array_equal(a, b)
