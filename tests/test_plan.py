"""jaxcl.plan: a recipe's real train step compiled for a TPU slice / GPU machine, without running it."""

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from jaxcl import plan, targets
from jaxcl.data import pipeline, sources
from jaxcl.train import devices, methods, validation
from jaxcl.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def recipe(name, **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def tiny_digits(**overrides):
  """SimCLR on the bundled digits with an MLP encoder: compiles in seconds."""
  return recipe("simclr_digits", **{"model.encoder": "mlp", "model.projection_dims": (16, 8), **overrides})


# ---------------------------------------------------------------------------------------- collectives
def test_collective_stats_of_a_program_with_known_collectives():
  """A sum over a batch split 4 ways (an all-reduce of f32[128]) and the batch gathered whole (an
  all-gather of f32[32, 128]) on a v5e:2x2, counted from the compiled TPU program."""
  mesh = targets.mesh(targets.get("v5e:2x2"))
  x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  replicated = NamedSharding(mesh, P())
  compiled = jax.jit(lambda x: (x.sum(0), x), out_shardings=(replicated, replicated)).lower(x).compile()
  stats = plan.collective_stats(compiled.as_text())
  assert stats["all-reduce"] == {"count": 1, "bytes": 128 * 4}
  assert stats["all-gather"] == {"count": 1, "bytes": 32 * 128 * 4}
  assert all(stats[k]["count"] == 0 for k in ("reduce-scatter", "collective-permute", "all-to-all"))


def test_collective_stats_async_pairs_count_once_with_their_output():
  text = ("%s = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %x), dimensions={0}\n"
          "%d = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %s)\n"
          "%p = (bf16[4,4]{1,0}, bf16[4,4]{1,0}) collective-permute-start(bf16[4,4]{1,0} %y)\n"
          "%f = f32[2]{0} fusion(f32[2]{0} %all-reduce.3), kind=kLoop\n")
  stats = plan.collective_stats(text)
  assert stats["all-gather"] == {"count": 1, "bytes": 32 * 4}
  assert stats["collective-permute"] == {"count": 1, "bytes": 4 * 4 * 2}
  assert stats["all-reduce"]["count"] == 0  # an operand named all-reduce.3 is not an instruction


def test_collective_stats_of_the_compiled_tpu_ring():
  """The ring compiled for v5e:2x2: TPU's collective-permute-start tuples end in scalar u32 context
  values, which are not the bytes sent; each start counts the (B/n, D) block or vector it sends."""
  from jaxcl import losses, targets  # noqa: PLC0415

  mesh = targets.mesh(targets.get("v5e:2x2"))
  x = jax.ShapeDtypeStruct((4 * 1024, 128), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P("data")))
  loss = lambda a, b: losses.clip(a, b, logit_scale=10.0, impl="ring", mesh=mesh, normalize=False)
  with jax.default_matmul_precision("default"):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, x).compile()
  stats = plan.collective_stats(compiled.as_text())["collective-permute"]
  block = 1024 * 128 * 2  # one device's (B/n, D) bf16 block of keys or queries
  # Three ring loops (forward; backward: key blocks for dq, query blocks for dk), each sending a block.
  assert stats["count"] >= 3 and stats["bytes"] >= 3 * block, stats


# ------------------------------------------------------------------------------------------ the plan
def _state_and_batch_bytes(config, num_devices):
  """Bytes of the train state (every leaf, replicated) and of one device's share of the batch,
  counted from the abstract arrays with NumPy, independently of the compiler."""
  info = sources.abstract_info(config.data, config.data.train_split)
  setup = state_lib.build_setup(config, info)
  state = jax.eval_shape(lambda: state_lib.init_state(config, setup, jax.random.key(0)))
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  b = config.batch_size // num_devices
  image_bytes = b * int(np.prod(info.image_shape)) * 4  # float32 (labels and ids: SimCLR ignores them)
  return state_bytes, param_bytes, image_bytes


def test_plan_arguments_are_the_state_and_the_batch_share_on_a_gpu():
  """One H100: the step's arguments are exactly the whole state plus the images of the batch (jit drops
  the labels and ids, which SimCLR does not read), the outputs reuse the donated state, and the JSON's
  numbers are consistent with each other."""
  config = tiny_digits(batch_size=32)
  p = plan.plan(config, "h100:1x1x1")
  state_bytes, param_bytes, batch_bytes = _state_and_batch_bytes(config, 1)
  c = p["per_chip"]
  assert p["param_bytes"] == param_bytes
  assert c["argument_bytes"] == state_bytes + batch_bytes
  assert c["alias_bytes"] >= state_bytes - 16  # donated: the new state lives in the old buffers
  assert c["total_bytes"] == c["argument_bytes"] + c["temp_bytes"] + c["output_bytes"] - c["alias_bytes"]
  assert p["fits"] is (c["total_bytes"] <= p["hbm_per_chip_bytes"]) and p["fits"]
  assert p["hbm_per_chip_bytes"] == targets.get("h100:1x1x1").hbm_bytes
  assert p["cost_model_step_seconds"] is None  # the GPU compiler has no cost model
  assert (p["chips"], p["global_batch"], p["mesh"]) == (1, 32, {"data": 1, "fsdp": 1})


def test_plan_with_the_pallas_engine_compiles_the_targets_kernels():
  """`config.loss.impl = "pallas"` with 16 × 16 blocks (`config.loss.pallas`) planned for an H100: the
  planner names the target's flavour (Triton, compiled), so blocks legal only for Triton compile (with
  flavour "auto" the Mosaic variant would be traced too and refuse them), and the step holds the
  kernels: the NT-Xent forward and its fused backward."""
  config = tiny_digits(batch_size=32, **{"loss.impl": "pallas", "loss.pallas.block_rows": 16,
                                         "loss.pallas.block_cols": 16})
  p = plan.plan(config, "h100:1x1x1")
  assert p["kernel_calls"] == {"mosaic": 0, "triton": 2}
  assert config.loss.pallas.flavour is None  # the caller's config is not changed


def test_plan_fsdp_splits_the_parameters_over_the_chips():
  """v5e:2x2 with fsdp=4: each chip holds at least a quarter of the parameters (and their optimizer
  state), and less than the replicated plan's arguments; the cross-chip traffic shows as collectives."""
  config = tiny_digits(batch_size=16)
  replicated = plan.plan(config, "v5e:2x2")
  sharded = plan.plan(tiny_digits(batch_size=16, **{"mesh.fsdp": 4}), "v5e:2x2")
  assert sharded["mesh"] == {"data": 1, "fsdp": 4} and sharded["chips"] == 4
  params = replicated["param_bytes"]
  assert sharded["param_bytes"] == params
  assert replicated["per_chip"]["argument_bytes"] >= params
  assert params / 4 <= sharded["per_chip"]["argument_bytes"] < replicated["per_chip"]["argument_bytes"]
  assert sum(v["count"] for v in sharded["collectives"].values()) > 0
  assert set(sharded["collectives"]) == set(plan.COLLECTIVES)


def test_max_batch_bisection_against_a_linear_memory_model(monkeypatch):
  """`max_batch` with the compile replaced by total(B) = a + b·B (bytes): for every HBM size from
  below the smallest batch to beyond the search limit, the answer is the largest multiple of the 4
  devices with a + b·B <= HBM (closed form), the next multiple exceeds it, and the compiles made are
  about 2·log2 of the answer."""
  monkeypatch.setattr(plan, "batch_unit", lambda config, topology: 4)
  a, b = 1000, 37
  calls = []

  def fake_plan(config, topology):
    calls.append(config.batch_size)
    total = a + b * config.batch_size
    return {"global_batch": config.batch_size, "fits": total <= hbm, "hbm_per_chip_bytes": hbm,
            "per_chip": {"total_bytes": total}}

  monkeypatch.setattr(plan, "plan", fake_plan)
  for start in (4, 64, 1000):
    for hbm in (a + b * 4, a + b * 4 + 1, a + b * 100, a + b * 103 - 1, a + b * 5000):
      calls.clear()
      best, over = plan.max_batch(tiny_digits(batch_size=start), "v5e:2x2", limit=1 << 16)
      expected = (hbm - a) // b // 4 * 4
      assert best["global_batch"] == expected and best["fits"]
      assert over["global_batch"] == expected + 4 and not over["fits"]
      assert len(calls) <= 2 * np.log2(max(expected, start) / 4) + 3
      if expected >= 100:  # with a 1/8 tolerance: a bracket at most 1/8 of the answer wide, fewer compiles
        exact = len(calls)
        calls.clear()
        best, over = plan.max_batch(tiny_digits(batch_size=start), "v5e:2x2", limit=1 << 16, tolerance=0.125)
        assert best["fits"] and not over["fits"]
        assert best["global_batch"] <= expected < over["global_batch"] <= best["global_batch"] * 1.125 + 4
        assert len(calls) < exact
    with pytest.raises(plan.PlanError, match="even the smallest global batch, 4"):
      hbm = a + b * 4 - 1
      plan.max_batch(tiny_digits(batch_size=start), "v5e:2x2")
  hbm = a + b * (1 << 20)
  with pytest.raises(plan.PlanError, match="the search stops at 256"):
    plan.max_batch(tiny_digits(batch_size=64), "v5e:2x2", limit=256)


@pytest.mark.slow
def test_a_step_the_compiler_refuses_is_a_plan_that_does_not_fit():
  """SimCLR with the dense loss at global batch 65,536 on v5e:2x2: GSPMD's (B, B) temporaries exceed a
  chip's 16 GiB and the TPU compiler refuses the program (RESOURCE_EXHAUSTED) instead of reporting its
  memory. The plan says it does not fit, with the compiler's figure for the temporaries (a (B/4, B)
  float32 similarity block alone is 4 GiB; the refusal names at least that), and the summary says so."""
  p = plan.plan(tiny_digits(batch_size=65536, **{"loss.impl": "dense"}), "v5e:2x2")
  assert not p["fits"] and p["global_batch"] == 65536
  refused = p["compiler_refused"]
  assert refused["temp_bytes"] == p["per_chip"]["temp_bytes"] >= 65536 * 65536 // 4 * 4
  assert refused["temp_bytes"] > refused["available_bytes"] > 15 << 30
  assert p["per_chip"]["total_bytes"] is None and p["collectives"] is None
  assert "DOES NOT FIT" in plan.summary(p) and "RESOURCE_EXHAUSTED" in refused["message"]
  json.dumps(p)


def test_out_of_memory_reads_only_the_compilers_refusal():
  assert plan.out_of_memory("... required for HLO temporaries (1.5G) exceeds available HBM (1G)") is None
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(512.00M) exceeds available HBM (15.75G).")
  assert plan.out_of_memory(message) == (512 << 20, round(15.75 * (1 << 30)))


def test_max_batch_with_the_compiler(monkeypatch):
  """The search over real compiles (64 px digits, so memory grows with the batch), in steps of 32 to
  keep it to three compiles (the exact steps are `test_max_batch_bisection_against_a_linear_memory_model`):
  with a v5e chip's HBM set between the totals of the global batches 64 and 128, the answer is 64 or 96,
  fits, and the next step compiled does not."""
  config = lambda b: tiny_digits(batch_size=b, **{"data.image_size": 64})  # noqa: E731
  real_plan, compiled, hbm = plan.plan, {}, 1 << 62

  def plan_once(config, topology):  # each batch compiled once; `fits` against the HBM set below
    if config.batch_size not in compiled:
      compiled[config.batch_size] = real_plan(config, topology)
    p = dict(compiled[config.batch_size])
    return dict(p, fits=p["per_chip"]["total_bytes"] <= hbm)

  monkeypatch.setattr(plan, "plan", plan_once)
  monkeypatch.setattr(plan, "batch_unit", lambda config, topology: 32)
  small, large = (plan.plan(config(b), "v5e:2x2")["per_chip"]["total_bytes"] for b in (64, 128))
  hbm = (small + large) // 2
  assert large > small
  best, over = plan.max_batch(config(64), "v5e:2x2")
  assert best["global_batch"] in (64, 96) and best["per_chip"]["total_bytes"] <= hbm
  assert over["global_batch"] == best["global_batch"] + 32 and over["per_chip"]["total_bytes"] > hbm
  assert sorted(compiled) == [64, 96, 128]


# ------------------------------------------------------------------------------------------- the CLI
def _cli(*args, hide_libtpu=False):
  prelude = ("import importlib.util as u; real = u.find_spec; "
             "u.find_spec = lambda n, *a: None if n == 'libtpu' else real(n, *a); ") if hide_libtpu else ""
  code = prelude + ("import runpy, sys; sys.argv = ['jaxcl.plan'] + sys.argv[1:]; "
                    "runpy.run_module('jaxcl.plan', run_name='__main__')")
  env = dict(os.environ, JAX_PLATFORMS="")  # the planner itself must choose the CPU
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)


def test_cli_prints_a_summary_and_json_last():
  r = _cli("--config=configs/simclr_digits.py", "--topology=v5e:2x2", "--config.batch_size=16",
           "--config.model.encoder=mlp")
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  p = json.loads(lines[-1])
  assert lines[0].startswith("compiled for v5e:2x2 (4 chips")
  assert {"topology", "chips", "global_batch", "hbm_per_chip_bytes", "per_chip", "fits", "flops_per_step",
          "collectives", "cost_model_step_seconds"} <= set(p)
  assert (p["topology"], p["chips"], p["global_batch"], p["hbm_per_chip_bytes"]) == ("v5e:2x2", 4, 16, 16 << 30)
  assert set(p["per_chip"]) >= {"argument_bytes", "temp_bytes", "output_bytes", "total_bytes"}


@pytest.mark.parametrize("args, hide_libtpu, says", [
    (("--topology=v9z:2x2",), False, "unknown topology 'v9z:2x2': expected a TPU slice like 'v5e:2x2'"),
    (("--topology=v5e:2x2", "--config.batch_size=6"), False,
     "`config.batch_size` must be a positive multiple of the device count 4, got 6"),
    (("--topology=v5e:2x2",), True, "needs libtpu: pip install 'jax[tpu]=="),
])
def test_cli_errors_are_one_line_with_status_2(args, hide_libtpu, says):
  r = _cli("--config=configs/simclr_digits.py", *args, hide_libtpu=hide_libtpu)
  assert r.returncode == plan.PLAN_ERROR_STATUS
  assert "Traceback" not in r.stderr and r.stdout == ""
  errors = [line for line in r.stderr.splitlines() if line.startswith("jaxcl.plan: error:")]
  assert len(errors) == 1 and says in errors[0], r.stderr[-2000:]


# ---------------------------------------------------------------------------------- paper-scale recipes
def _vit_params(width, depth, mlp, tokens, patch_in=0):
  """Parameter count of a pre-LN transformer: per block 2 LayerNorms, q/k/v/out and the MLP (biases on)."""
  block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
  embed = patch_in * width + width if patch_in else 0
  return embed + tokens * width + depth * block + 2 * width


def _param_count(config):
  """Parameters of the recipe's model at its own image size, from an abstract `init` (no compile)."""
  info = sources.abstract_info(config.data, config.data.train_split)
  setup = state_lib.build_setup(config, info)
  state = jax.eval_shape(lambda: state_lib.init_state(config, setup, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)), setup


@pytest.mark.parametrize("name", ["clip_vitb16", "siglip_vitb16"])
def test_vitb16_recipes_have_the_papers_towers(name):
  """ViT-B/16 at 224 px (the ViT paper's 86M) + the 12-layer 512-wide text tower, counted by formula."""
  config = recipe(name)
  count, setup = _param_count(config)
  vit = _vit_params(768, 12, 3072, 1 + (224 // 16) ** 2, patch_in=16 * 16 * 3) + 768  # + the [CLS] token
  text = setup.text.vocab_size * 512 + _vit_params(512, 12, 2048, config.model.text_max_len)
  joint = 768 * 512 + 512 * 512 + 1 + (name == "siglip_vitb16")  # projections, logit scale (and bias)
  assert 85.5e6 < vit < 86.5e6
  assert count == vit + text + joint


def test_simclr_r50_recipe_has_resnet50_and_the_simclr_head():
  """ResNet-50 (23.5M trunk parameters with BatchNorm: torchvision's count less the classifier) and the
  2048-2048-128 projection head (Dense without bias → BN → ReLU → Dense)."""
  count, _ = _param_count(recipe("simclr_r50"))
  trunk = 25_557_032 - (2048 * 1000 + 1000)
  head = 2048 * 2048 + 2 * 2048 + 2048 * 128 + 128
  assert count == trunk + head


# Compiling the paper-scale towers takes many minutes on a shared 2-core CPU (ViT-B/16 at 32 px did not
# finish within 20); the compile tests keep each recipe's method, loss, optimizer, text tower width, data
# layout and mesh, with a smaller image tower (an MLP; ResNet-18 at width 8), 32 px images and a 1-block
# text tower.
@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, moments", [
    ("clip_vitb16", {"model.encoder": "mlp", "model.remat": False, "model.text_depth": 1}, 3),
    ("simclr_r50", {"model.encoder": "resnet18", "model.width": 8}, 2),
])
def test_recipes_compile_for_a_slice(name, overrides, moments):
  """The plan of each recipe (reduced, above) on a v5e:2x2: the parameter bytes are those of the
  abstract init, and a chip holds at least the parameters and the optimizer's moments (AdamW: 2,
  LARS: 1) as arguments."""
  config = recipe(name, batch_size=8, **{"data.image_size": 32, **overrides})
  p = plan.plan(config, "v5e:2x2")
  count, _ = _param_count(config)
  assert p["param_bytes"] == 4 * count
  assert p["per_chip"]["argument_bytes"] >= moments * p["param_bytes"]
  assert p["fits"] and p["global_batch"] == 8 and p["flops_per_step"] > 0
  if name == "simclr_r50":  # the two views of a chip's own images stay on it: no resharding between them
    assert p["collectives"]["all-to-all"]["count"] == 0
    assert p["collectives"]["collective-permute"]["count"] == 0


class JaxclTestImagenetLike(tfds.core.GeneratorBasedBuilder):
  """The format of tfds `imagenet2012`: JPEG `Image` features of varying sizes, a 1000-way `ClassLabel`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(8)), "validation": self._generate_examples(range(8, 12))}

  def _generate_examples(self, ids):
    for i in ids:
      pixels = np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels).save(buf, format="JPEG")
      yield i, {"image": buf.getvalue(), "label": 997 - i}


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  JaxclTestImagenetLike(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


@pytest.mark.parametrize("name", ["clip_vitb16", "siglip_vitb16", "simclr_r50"])
def test_recipe_data_path_on_an_imagenet_like_tfds_dataset(name, imagenet_like):
  """The recipe's data config, pointed at a fabricated dataset of imagenet2012's format: validated (the
  declared 1000 classes match), batches of 224 px RGB images and labels, captions tokenized to the
  text tower's length."""
  config = recipe(name, batch_size=4, **{"data.tfds_name": "jaxcl_test_imagenet_like",
                                         "data.data_dir": imagenet_like, "data.worker_count": 0})
  infos = validation.validate_config(config, num_devices=1)
  assert infos["train"].num_classes == 1000 and infos["validation"].num_examples == 4
  assert infos["train"].image_shape == sources.abstract_info(config.data, "train").image_shape
  host = next(iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=4, seed=0)))
  assert host["image"].shape == (4, 224, 224, 3) and host["image"].dtype == np.float32
  assert 0.0 <= host["image"].min() and host["image"].max() <= 1.0
  # sent as uint8 (the recipes' data.transfer_dtype), a quarter of the bytes: the images resized to 224 px
  # by the source are rounded to the nearest of 256 levels
  sent = devices.encode_images(host["image"], config.data.transfer_dtype)
  assert sent.dtype == np.uint8 and sent.shape == (4, 224 * 224 * 3)
  np.testing.assert_allclose(np.asarray(devices.decode_images(sent, (224, 224, 3))), host["image"], atol=0.5 / 255 + 1e-6)
  assert set(host["label"].tolist()) <= set(range(990, 998))
  batch = methods.get(config.method).text_side(config, infos["train"]).prepare(config, host, 0)
  if name == "simclr_r50":
    assert "text" not in batch
  else:
    assert batch["text"].shape == (4, config.model.text_max_len) and batch["text"].dtype == np.int32
  with config.unlocked():
    config.data.num_classes = 10
  with pytest.raises(ValueError, match="`data_config.num_classes` is 10 but the data has 1000"):
    validation.validate_config(config, num_devices=1)
