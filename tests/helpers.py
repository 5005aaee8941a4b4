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


# The engines of a loss's padded-batch test (`assert_padded_equals_unpadded`) where the loss's file does
# not name them: dense. The masked reductions of the blockwise and Pallas engines are tested in
# tests/ops/ (test_reductions, test_blockwise, test_pallas) and through the losses they serve first
# (infonce, clip, supcon: every engine); the other losses pass the same mask to the same reductions.
PADDED_TEST_ENGINES = ("dense",)


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


# ----------------------------------------------------------------------------- the training system
# Recipes shrunk to run in seconds, runs of the command line, and reading their outputs back: shared by
# tests/train/, tests/test_configs.py, tests/test_paths.py and others. The training system is imported

def device_mesh(n_devices: int, axis_type=jax.sharding.AxisType.Auto) -> jax.sharding.Mesh:
  """A one-axis ("data") mesh over the first n_devices of the test process's 8 CPU devices."""
  return jax.make_mesh((n_devices,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n_devices])


def assert_sharded_equals_dense(loss, args, *, impl: str, n_devices: int, rtol: float = 1e-5):
  """`loss(*args, impl=impl, mesh=mesh)` on a mesh of n_devices (the loss splits its batch arguments
  over the mesh itself, `shardable`) has the value and the gradients, with respect to every float
  argument, of `loss(*args, impl="dense")` on one device.

  `loss` is a closure over the loss's other options, `lambda *args, **kw: losses.x(*args, t=…, **kw)`.
  Gradients are compared relative to the largest entry of the dense gradient (an argument the loss does
  not depend on has a zero gradient on both sides). The sharded call must run under `shard_map` (the
  engine itself, not a one-device fallback).
  """
  args = [jnp.asarray(a) for a in args]
  argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))

  def value_and_grads(**kw):
    """(the jaxpr, the value and gradients): traced once, compiled once."""
    traced = jax.jit(jax.value_and_grad(lambda *a: loss(*a, **kw), argnums=argnums)).trace(*args)
    return traced.jaxpr, traced.lower().compile()(*args)

  _, (want, want_grads) = value_and_grads(impl="dense")
  jaxpr, (got, got_grads) = value_and_grads(impl=impl, mesh=device_mesh(n_devices))
  assert "shard_map" in str(jaxpr), "the sharded call fell back to one device"
  assert_value_and_grads_close((got, got_grads), (want, want_grads), rtol=rtol,
                               names=[f"gradient of argument {n}" for n in argnums])


def assert_value_and_grads_close(got, want, *, rtol: float = 1e-5, names=None):
  """(value, grads) against (value, grads): the value to `rtol` relative, each gradient to `rtol` of its
  largest dense entry (an argument the loss does not depend on has a zero gradient on both sides)."""
  (value, grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(float(value), float(want_value), rtol=rtol, err_msg="value")
  names = names or [f"gradient {n}" for n in range(len(want_grads))]
  for name, g, w in zip(names, grads, want_grads):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    norm = max(np.max(np.abs(w)), 1e-30)
    np.testing.assert_allclose(g / norm, w / norm, atol=rtol, err_msg=name)

# inside the functions, so that the tests of the losses do not import it.
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


def load_recipe(name: str):
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny(config, data_dir, steps=4, encoder="mlp"):
  """A recipe shrunk to run in seconds on the CPU (same code paths), with no evaluation at the end (about
  half of such a run's time). The MLP encoder compiles in a fraction of the ResNet's time;
  `encoder="resnet18"` keeps the recipe's convolutional encoder (width 8)."""
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
  if encoder == "mlp":  # an MLP takes one image size: no multi-crop views of another
    config.swav.small_crops = 0
  config.eval.knn_k = 20
  config.eval.linear_probe = False
  config.eval.baselines = False
  config.eval.at_end = False  # what these runs check is the training; tests of the evaluation turn it on
  return config


def final_state(config, workdir, steps):
  """The state saved at the last step of a run in `workdir` (restored with the loop's shardings)."""
  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxcl.train import checkpoints, devices  # pylint: disable=import-outside-toplevel
  from jaxcl.train import state as state_lib  # pylint: disable=import-outside-toplevel

  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, workdir)
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size,
                                       seed=config.seed))
  state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  assert step == steps
  return state


def step_and_batches(config):
  """(setup, initial state, jitted `step_lib.train_step`, iterator of the loader's host batches, mesh) of
  `config`, built as the loop builds them (init key 0, data seed 0)."""
  import functools  # pylint: disable=import-outside-toplevel

  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxcl.train import devices  # pylint: disable=import-outside-toplevel
  from jaxcl.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxcl.train import step as step_lib  # pylint: disable=import-outside-toplevel

  setup = state_lib.build_setup(config)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup))(jax.random.key(0))
  step = jax.jit(functools.partial(step_lib.train_step, config, setup))
  batches = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size,
                                            seed=0))
  return setup, state, step, batches, devices.make_mesh(config)


# The tiny run of every subprocess test: the default recipe with an MLP encoder, ~20 ms per step.
TOTAL_STEPS = 40
CHECKPOINT_EVERY = 5
OVERRIDES = {
    "batch_size": 16,
    "total_steps": TOTAL_STEPS,
    "warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": CHECKPOINT_EVERY,
    "eval_every": 1000,
    "model.encoder": "mlp",
    "model.projection_dims": (32, 16),
    "eval.knn_k": 20,
    "eval.linear_probe": False,
    "eval.baselines": False,
    "eval.at_end": False,  # what these runs check is the training; tests of the evaluation turn it on
}


def tiny_config(data_dir: str, **changes):
  """configs/simclr_digits.py with OVERRIDES (and `changes`, dotted keys with "__" for ".")."""
  sys.path.insert(0, str(ROOT))
  try:
    from configs import simclr_digits  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = simclr_digits.get_config()
  config.data.data_dir = data_dir
  for key, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
    section = config
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
  return config


def cli_flags(data_dir: str, total_steps: int = TOTAL_STEPS, checkpoint_every: int = CHECKPOINT_EVERY) -> list[str]:
  values = {**OVERRIDES, "total_steps": total_steps, "checkpoint_every": checkpoint_every, "data.data_dir": data_dir}
  return [f"--config.{k}={v}".replace(" ", "") for k, v in values.items()]


def subprocess_env(devices: int = 2, compilation_cache: bool = True) -> dict[str, str]:
  """This environment on `devices` CPU devices, with the session's persistent compilation cache
  (tests/conftest.py: the first run compiles, the others load the executables) unless
  `compilation_cache=False` (a run compiled fresh)."""
  env = dict(os.environ)
  if not compilation_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  # The device count, and the CPU backend's optimisation level of this process (tests/conftest.py)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}"] + flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


class Run:
  """`python -m jaxcl.main` on `workdir` in the background, its output in workdir/../<name>.log."""

  def __init__(self, workdir: pathlib.Path, data_dir: str, name: str, total_steps: int = TOTAL_STEPS,
               compilation_cache: bool = True):
    self.workdir = workdir
    self.log_path = workdir.parent / f"{workdir.name}-{name}.log"
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={workdir}",
         *cli_flags(data_dir, total_steps)],
        cwd=ROOT, env=subprocess_env(compilation_cache=compilation_cache), stdout=self._log,
        stderr=subprocess.STDOUT)

  def wait(self, timeout: float = 240) -> int:
    try:
      rc = self.proc.wait(timeout)
    finally:
      self._log.close()
    return rc

  def output(self) -> str:
    return self.log_path.read_text()

  def kill(self, sig: int) -> None:
    self.proc.send_signal(sig)

  def running(self) -> bool:
    return self.proc.poll() is None


def logged_steps(workdir: pathlib.Path) -> list[int]:
  from jaxcl.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  return [r["step"] for r in metrics_lib.read_metrics(str(workdir)) if "loss" in r]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_until(predicate, run: Run, timeout: float = 240, poll: float = 0.005) -> bool:
  """Polls `predicate()` until it is true (True) or the run ends or times out (False)."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    if not run.running():
      return bool(predicate())
    time.sleep(poll)
  return False


def final_params(workdir: pathlib.Path, data_dir: str, step: int = TOTAL_STEPS):
  """The parameters of the checkpoint at `step` in `workdir` (restored as the loop restores them)."""
  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxcl.train import checkpoints, devices  # pylint: disable=import-outside-toplevel
  from jaxcl.train import state as state_lib  # pylint: disable=import-outside-toplevel

  config = tiny_config(data_dir)
  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, str(workdir))
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
  state, restored = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  assert restored == step
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_bit_identical(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def resumed_step(output: str) -> int:
  """The step a run resumed from (its "Resumed from checkpoint at step N" line), 0 if it started afresh."""
  lines = [l for l in output.splitlines() if l.startswith("Resumed from checkpoint at step ")]
  assert len(lines) <= 1, lines
  return int(lines[0].split()[5]) if lines else 0


def restore_full_state(workdir, config, step, target=None):
  """The whole state of checkpoint `step` in `workdir`, read by orbax alone (no check of its values);
  `target`: the restore target (ShapeDtypeStructs with shardings), built from `config` when None."""
  import grain  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxcl.train import checkpoints, devices  # pylint: disable=import-outside-toplevel
  from jaxcl.train import state as state_lib  # pylint: disable=import-outside-toplevel

  if target is None:
    setup = state_lib.build_setup(config)
    abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  manager = checkpoints.checkpoint_manager(config, str(workdir))
  try:
    # Restore exactly `step`: the manager restores the newest, so hide the newer ones from it.
    it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(it)))["state"]
  finally:
    manager.close()


def write_images(folder: pathlib.Path, names, size=(8, 8)):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for name in names:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)


def dead_pid() -> int:
  """The pid of a process that has ended and been reaped (as after a kill -9)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# ------------------------------------------------------------------------------------ the models
# Random variables without compiling an init, parameter counts, closeness to a float64 reference: shared
# by tests/models/ (whose float64 NumPy references are in tests/models/reference.py).
def key(seed):
  # The rbg generator: initialising with threefry costs seconds of XLA compilation on CPU per model.
  return jax.random.key(seed, impl="rbg")


def random_variables(model, *args, seed=0, **kwargs):
  """Variables of `model` with random values drawn in NumPy (no XLA compilation of an init): kernels
  N(0, 1/fan_in), norm scales 1 + N(0, 0.3²), biases and running means N(0, 0.2²), running variances
  U(0.5, 1.5), embeddings N(0, 0.5²). Random norm parameters and statistics make sure no γ = 0 or
  identity statistics hide a mistake in a reference comparison."""
  shapes = jax.eval_shape(lambda: model.init(key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if "'scale'" in name:
      value = 1.0 + 0.3 * rng.standard_normal(shape)
    elif "'bias'" in name or "'mean'" in name:
      value = 0.2 * rng.standard_normal(shape)
    elif "'var'" in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif "'kernel'" in name:
      fan_in = shape[0] if (len(shape) == 3 and "'out'" not in name) else np.prod(shape[:-1])
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    else:  # embeddings, position embeddings, [CLS]
      value = 0.5 * rng.standard_normal(shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def n_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def abstract_init(model, *shape, dtype=jnp.float32):
  return jax.eval_shape(lambda: model.init(key(0), jnp.zeros(shape, dtype), train=False))


def assert_close(got, want, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ the evaluation
def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def blobs(seed, n_per_class, num_classes, d, spread):
  """Gaussian clusters around random unit centres; returns (x, y) shuffled."""
  rng = np.random.default_rng(seed)
  centres = unit(rng.standard_normal((num_classes, d)))
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = centres[y] + spread * rng.standard_normal((len(y), d))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm].astype(np.int32)


# ------------------------------------------------------------------------------------------ data
# Shared by tests/data/: the digits and image-folder configs, small images (PNG files and bytes).
def digits_config(data_dir, **overrides):
  from jaxcl.data import sources  # pylint: disable=import-outside-toplevel

  cfg = sources.default_data_config("digits")
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


def pattern(i, h, w, c):
  rng = np.random.default_rng(100 + i)
  return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def png_bytes(array):
  import io  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buf, format="PNG")
  return buf.getvalue()


def save_image(path, array):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def folder_config(folder, **overrides):
  from jaxcl.data import sources  # pylint: disable=import-outside-toplevel

  cfg = sources.default_data_config("folder")
  cfg.folder = str(folder)
  cfg.update(overrides)
  return cfg
