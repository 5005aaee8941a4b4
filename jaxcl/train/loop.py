"""The one training loop of every method: sharded jit step, checkpoints, logging, evaluation.

`train_and_evaluate(config, workdir)` trains `config.total_steps` steps (resuming from the latest
checkpoint in `workdir/checkpoints` together with the data iterator), evaluates on the held-out split,
and writes `results.json`, `metrics.jsonl`, TensorBoard events and PNG plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcl import _paths
from jaxcl import eval as eval_lib
from jaxcl import grad_cache
from jaxcl import losses
from jaxcl.data import augment, digits, pipeline, sources
from jaxcl.train import checkpoints as checkpoints_lib
from jaxcl.train import config as config_lib
from jaxcl.train import mcl, methods, optim
from jaxcl.train import metrics as metrics_lib
from jaxcl.train import text as text_lib
from jaxcl.train import workdir as workdir_lib

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any  # EMA target network (moco, byol); {} otherwise
  target_batch_stats: Any
  queue: Any  # MoCo v2 negatives (Q, E); {} otherwise
  queue_ptr: jax.Array
  # Per-example loss state indexed by the stable example id batch["index"] (iSogCLR: u, τ, τ-gradient
  # of every example, each (N,) with N = loss_state_size(...)); {} otherwise. Sharded along the example
  # axis over the batch mesh axes; checkpointed with the rest of the state.
  loss_state: Any


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss, gradient or updated state and `on_nonfinite == "stop"`."""


# ----------------------------------------------------------------------------------------- validation
def validate_config(config: ml_collections.ConfigDict, *, data: bool = True, num_devices: int | None = None) -> dict:
  """Every check that can fail before compute starts; `train_and_evaluate` calls it first.

  The config's keys and value types against `base_config()` (unknown keys, wrong types), the method,
  value ranges, the batch size against the device and process counts, and (`data=True`) both data
  splits: the train and the evaluation source are opened, so an empty or unreadable image folder or a
  captions file with missing entries fails here, not after training. Returns {split: source info}.
  `num_devices`: the device count the batch is split over (default `jax.device_count()`; the planner
  passes the target's).
  """
  config_lib.check_config_schema(config)
  methods.check_method(config)
  n = jax.device_count() if num_devices is None else int(num_devices)
  if config.batch_size <= 0 or config.batch_size % n:
    raise ValueError(
        f"`config.batch_size` must be a positive multiple of the device count {n}, got {config.batch_size}."
    )
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"`config.batch_size` must divide evenly over {jax.process_count()} processes, got {config.batch_size}."
    )
  for key in ("total_steps", "checkpoint_every", "eval_every", "log_every", "keep_checkpoints",
              "grad_accum_steps", "grad_cache_chunks"):
    if int(config[key]) <= 0:
      raise ValueError(f"`config.{key}` must be a positive integer, got {config[key]}.")
  check_grad_cache(config, n)
  for key in ("learning_rate", "weight_decay", "grad_clip_norm", "warmup_steps"):
    if not config[key] >= 0 or not np.isfinite(config[key]):
      raise ValueError(f"`config.{key}` must be a finite number >= 0, got {config[key]}.")
  scale = config.loss.logit_scale_init
  if config.method in methods.IMAGE_TEXT and not (scale > 0 and np.isfinite(scale)):
    raise ValueError(f"`config.loss.logit_scale_init` must be a finite number > 0 (the model learns its "
                     f"logarithm), got {scale}.")
  if not 0 <= config.seed < 2**32:
    raise ValueError(f"`config.seed` must be an integer in [0, 2**32), got {config.seed}.")
  choices = {"on_nonfinite": ("stop", "skip"), "optimizer": ("lars", "adamw", "sgd"),
             "model.dtype": ("float32", "bfloat16", "float16"), "data.name": sources.SOURCE_NAMES,
             "data.transfer_dtype": TRANSFER_DTYPES}
  for path, allowed in choices.items():
    value = config
    for part in path.split("."):
      value = value[part]
    if value not in allowed:
      raise ValueError(f"`config.{path}` must be one of {allowed}, got {value!r}.")
  q = config.momentum.queue_size
  if q and (config.method != "moco" or q % config.batch_size):
    raise ValueError(
        f"`config.momentum.queue_size` ({q}) is for method 'moco' and must be a multiple of the batch "
        f"size {config.batch_size}."
    )
  if not data:
    return {}
  infos = {}
  for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
    _, infos[split] = sources.build_source(config.data, split)
  shapes = {tuple(i["image_shape"]) for i in infos.values()}
  if len(shapes) > 1:
    raise ValueError(
        f"The train split {config.data.train_split!r} and the eval split {config.data.eval_split!r} have "
        f"different image shapes {sorted(shapes)}: set `config.data.image_size`.")
  train_info = infos[config.data.train_split]
  if config.method in methods.IMAGE_TEXT and not (train_info["has_captions"] or train_info["num_classes"]):
    raise ValueError(
        f"method {config.method!r} trains on image-caption pairs, but the data {config.data.name!r} has "
        "neither captions nor class labels to make them from (for a folder: set "
        "`config.data.captions_file`, or put the images in class subfolders).")
  return infos


def check_grad_cache(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """`config.grad_cache_chunks` = k > 1 needs a method whose step is one forward of the online model
  and a loss over the batch (not an EMA target network, a queue or per-example loss state), and k must
  divide each device's batch."""
  k = int(config.grad_cache_chunks)
  if k == 1:
    return
  reason = ("an EMA target network" if config.method in methods.WITH_TARGET_NETWORK else
            "per-example loss state" if methods.has_loss_state(config) else
            "a queue of keys" if config.momentum.queue_size else None)
  if reason:
    raise ValueError(f"`config.grad_cache_chunks` = {k} does not support method {config.method!r} with "
                     f"loss {config.loss.name!r} ({reason}): set it to 1.")
  per_device = config.batch_size // num_devices
  if per_device % k:
    raise ValueError(f"`config.grad_cache_chunks` = {k} must divide each device's batch: "
                     f"`config.batch_size` {config.batch_size} over {num_devices} devices is {per_device}.")


# ------------------------------------------------------------------------------------------- sharding
def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp) mesh over `devices` (default: every device here; the planner passes a
  `jaxcl.targets.Target`'s)."""
  n, fsdp = (jax.device_count() if devices is None else len(devices)), int(config.mesh.fsdp)
  data = int(config.mesh.data) if config.mesh.data > 0 else n // fsdp
  if data * fsdp != n:
    raise ValueError(f"`config.mesh` data × fsdp = {data} × {fsdp} must equal the device count {n}.")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(auto, auto), devices=devices)


def param_sharding(mesh: jax.sharding.Mesh, x: Any) -> NamedSharding:
  """Replicated, or (FSDP) sharded along the largest axis the `fsdp` mesh axis divides."""
  fsdp = mesh.shape["fsdp"]
  shape = getattr(x, "shape", ())
  if fsdp > 1 and len(shape) >= 1:
    order = sorted(range(len(shape)), key=lambda a: -shape[a])
    for axis in order:
      if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
        spec = [None] * len(shape)
        spec[axis] = "fsdp"
        return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Per-process NumPy batch → global jax.Arrays sharded along the batch axis."""
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


TRANSFER_DTYPES = ("float32", "uint8")


def encode_images(images: np.ndarray, transfer_dtype: str) -> np.ndarray:
  """(b, H, W, C) images in [0, 1] → (b, H·W·C) `transfer_dtype` ("float32"; "uint8": round(255·x)), the
  form the train step receives (`decode_images` undoes it on the devices).

  Flat: a TPU lays a 4-D image array out with the batch as its minor dimension, so a slice of examples
  (a gradient-caching chunk) would not be contiguous; a 2-D array is batch-major, each chunk a
  contiguous slice reshaped to images on its own. uint8 holds an 8-bit source exactly in a quarter of
  the bytes (6.9 GiB less device memory per v5e chip for 16,384 224-px RGB images).

  >>> encode_images(np.array([[[[0.0], [1.0]], [[0.5], [1 / 255]]]], np.float32), "uint8").tolist()
  [[0, 255, 128, 1]]
  """
  flat = np.asarray(images).reshape(len(images), -1)
  if transfer_dtype == "uint8":
    return np.round(np.clip(flat, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
  return flat.astype(np.float32, copy=False)


def decode_images(images: jax.Array, image_shape) -> jax.Array:
  """`encode_images`' (b, H·W·C) (or already (b, H, W, C)) → (b, H, W, C) float32 in [0, 1] (uint8 / 255)."""
  images = images.reshape((images.shape[0],) + tuple(image_shape))
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / jnp.float32(255.0)
  return images.astype(jnp.float32)


# ---------------------------------------------------------------------------------------- model/state
class Setup(flax.struct.PyTreeNode):
  """What the loop builds once from the config (static: not part of the checkpoint)."""

  model: Any = flax.struct.field(pytree_node=False)
  tx: Any = flax.struct.field(pytree_node=False)
  text: Any = flax.struct.field(pytree_node=False)
  aug: Any = flax.struct.field(pytree_node=False)
  info: Any = flax.struct.field(pytree_node=False)
  mesh: Any = flax.struct.field(pytree_node=False, default=None)  # for the sharded loss engines


def build_setup(config: ml_collections.ConfigDict, info: dict | None = None, mesh=None) -> Setup:
  """`info`: the train split's source info when already known (from `validate_config`); `mesh`: the
  device mesh, which `config.loss.impl = "allgather" | "ring"` splits the loss over."""
  if info is None:
    _, info = sources.build_source(config.data, config.data.train_split)
  text = text_lib.build_text_side(config, info)
  model = methods.build_model(config, text)
  return Setup(model=model, tx=optim.make_optimizer(config), text=text,
               aug=augment.default_aug_config(config.augment.strength), info=info, mesh=mesh)


def sample_inputs(config, setup: Setup, batch: int) -> tuple:
  image = jnp.zeros((batch,) + tuple(setup.info["image_shape"]), jnp.float32)
  if config.method in methods.IMAGE_TEXT:
    return image, setup.text.dummy(batch)
  return (image,)


def loss_state_size(config, info: dict, num_devices: int | None = None) -> int:
  """The length N of the per-example loss state: one slot per possible example id, padded up to a
  multiple of the device count so the state shards evenly along the batch mesh axes.

  Ids are `batch["index"]`: the position in the split, except where the data has its own ids (the
  bundled digits: the position in `load_digits()`, over both splits), so the id range is
  `info["num_ids"]` when the source gives it, `digits.NUM_EXAMPLES` for the digits, else
  `info["num_examples"]`. The padding slots are never indexed and keep their initial values.
  """
  if "num_ids" in info:
    num_ids = int(info["num_ids"])
  elif config.data.name == "digits":
    num_ids = digits.NUM_EXAMPLES
  else:
    num_ids = int(info["num_examples"])
  n = jax.device_count() if num_devices is None else int(num_devices)
  return -(-num_ids // n) * n


def loss_state_sharding(mesh: jax.sharding.Mesh, x: Any) -> NamedSharding:
  """A per-example state array: split along its first (example) axis over the batch mesh axes."""
  size = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  shape = getattr(x, "shape", ())
  if len(shape) >= 1 and shape[0] % size == 0:
    return NamedSharding(mesh, P(BATCH_AXES))
  return NamedSharding(mesh, P())


def init_state(config, setup: Setup, key: jax.Array) -> TrainState:
  variables = setup.model.init({"params": key}, *sample_inputs(config, setup, 2), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  has_target = config.method in methods.WITH_TARGET_NETWORK
  embed = config.model.projection_dims[-1]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=setup.tx.init(params),
      target_params=jax.tree.map(jnp.copy, params) if has_target else {},
      target_batch_stats=jax.tree.map(jnp.copy, batch_stats) if has_target else {},
      queue=_init_queue(key, config.momentum.queue_size, embed),
      queue_ptr=jnp.zeros((), jnp.int32),
      loss_state=methods.init_loss_state(
          config, loss_state_size(config, setup.info, setup.mesh.size if setup.mesh is not None else None)),
  )


def _init_queue(key, size: int, dim: int) -> jax.Array:
  if not size:
    return {}
  q = jax.random.normal(jax.random.fold_in(key, 7), (size, dim), jnp.float32)
  return q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-6)


def state_shardings(config, setup: Setup, mesh):
  abstract = jax.eval_shape(functools.partial(init_state, config, setup), jax.random.key(0))
  shardings = jax.tree.map(lambda x: param_sharding(mesh, x), abstract)
  shardings = shardings.replace(loss_state=jax.tree.map(lambda x: loss_state_sharding(mesh, x), abstract.loss_state))
  return abstract, shardings


# ----------------------------------------------------------------------------------------- train step
def jit_train_step(config, setup: Setup, shardings: TrainState):
  """`train_step` jitted as the loop runs it (and `jaxcl.plan` compiles it): the state donated, the new
  state laid out as `shardings`."""
  return jax.jit(functools.partial(train_step, config, setup), donate_argnums=(0,),
                 out_shardings=(shardings, None))


def train_step(config, setup: Setup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimisation step (jit-compiled by the loop). Non-finite steps leave the state unchanged: a
  non-finite loss or gradient norm, or an update that would put a NaN or inf anywhere into the state
  (parameters, optimizer state, batch statistics, ...; `finite_parts`).

  `batch["image"]`: (B, H, W, C) float32, or as the loop sends it (`encode_images`: (B, H·W·C) float32
  or uint8), decoded where the images are augmented (`decode_images`; per chunk under gradient caching)."""
  model = setup.model
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  images = batch["image"]
  b = images.shape[0]
  v = config.num_views
  self_supervised = config.method in methods.SELF_SUPERVISED
  # Per-example augmentation keys: the views of example i are the same whether the batch is augmented
  # at once or a chunk at a time (gradient caching augments inside each chunk).
  keys = augment.example_keys(key, b, v if self_supervised else None)

  def model_inputs(images, keys, *rest):
    """The model's inputs from raw images (augmented here) and the other fields of (a chunk of) the batch."""
    images = decode_images(images, setup.info["image_shape"])
    if self_supervised:
      views = augment.augment_examples(keys, images, setup.aug)
      # Sample-major (b, v) order: each device keeps its own samples' views, so the batch sharding
      # survives the merge (view-major would split no device-contiguous block and gather the batch).
      return (jnp.swapaxes(views, 0, 1).reshape((-1,) + views.shape[2:]),)
    return (augment.augment_examples(keys, images, setup.aug), *rest)

  raw = (images, keys) if self_supervised else (images, keys, batch["text"])

  def apply(params, batch_stats, *xs):
    return model.apply({"params": params, "batch_stats": batch_stats}, *xs, train=True,
                       mutable=["batch_stats"])

  def logged_only(metric):
    """metric() on the steps whose metrics the loop writes (every `config.log_every`-th and the last),
    zeros on the others: a metric-only pass over the batch is not paid at every step."""
    logged = ((state.step + 1) % config.log_every == 0) | (state.step + 1 == config.total_steps)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(metric))
    return jax.lax.cond(logged, metric, zeros)

  def loss_fn(params):
    inputs = model_inputs(*raw)
    out, mutated = apply(params, state.batch_stats, *inputs)
    if config.method in methods.WITH_TARGET_NETWORK:
      t_out, t_mut = apply(state.target_params, state.target_batch_stats, *inputs)
      return loss_of(out, mutated.get("batch_stats", {}), (t_out, t_mut))
    return loss_of(out, mutated.get("batch_stats", {}))

  def loss_of(out, batch_stats, target_outputs=None):
    """The loss of the model's outputs `out` for the whole batch (and the target network's outputs
    and batch statistics, for methods with one), with the logged aux."""
    aux = {"batch_stats": batch_stats, "target_batch_stats": state.target_batch_stats}
    if not self_supervised:
      aux["logit_scale"] = out["logit_scale"]
      aux["accuracy"] = logged_only(lambda: methods.in_batch_accuracy(config, out, mesh=setup.mesh))
      return methods.image_text_loss(config, out, mesh=setup.mesh), aux
    by_view = lambda x: jnp.swapaxes(x.reshape((b, v) + x.shape[1:]), 0, 1)  # -> (v, b, ...)
    online = {k: by_view(out[k]) for k in ("projection", "prediction") if k in out}
    target = None
    if config.method in methods.WITH_TARGET_NETWORK:
      t_out, t_mut = target_outputs
      target = {"projection": jax.lax.stop_gradient(by_view(t_out["projection"]))}
      aux["target_batch_stats"] = t_mut.get("batch_stats", {})
      aux["keys"] = target["projection"][1]
    aux["accuracy"] = logged_only(lambda: methods.in_batch_accuracy(config, online, target, mesh=setup.mesh))
    if methods.has_loss_state(config):
      loss, aux["loss_state"] = methods.stateful_loss(config, online, batch["index"], state.loss_state,
                                                      mesh=setup.mesh)
      return loss, aux
    return methods.self_supervised_loss(config, online, target, batch["label"], state.queue,
                                        mesh=setup.mesh), aux

  if config.grad_cache_chunks == 1:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    (loss, aux), grads = _cached_loss_and_grads(config, setup, state, raw, model_inputs, apply, loss_of)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  grad_finite = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = state.replace(params=params, opt_state=opt_state, batch_stats=aux["batch_stats"],
                      target_batch_stats=aux["target_batch_stats"])
  if "loss_state" in aux:  # kept, like everything else, when the step is not finite (below)
    new = new.replace(loss_state=jax.lax.stop_gradient(aux["loss_state"]))
  if config.method in methods.WITH_TARGET_NETWORK:
    target = methods.ema(state.target_params, params, config.momentum.ema)
    if isinstance(setup.tx, optax.MultiSteps):  # the target follows optimizer updates, not micro-steps
      updated = setup.tx.has_updated(opt_state)
      target = jax.tree.map(lambda n, o: jnp.where(updated, n, o), target, state.target_params)
    new = new.replace(target_params=target)
  if config.momentum.queue_size:
    keys = losses.l2_normalize(aux["keys"])
    new = new.replace(
        queue=jax.lax.dynamic_update_slice(state.queue, keys.astype(state.queue.dtype), (state.queue_ptr, 0)),
        queue_ptr=(state.queue_ptr + b) % config.momentum.queue_size,
    )
  state_finite = finite_parts(new)  # the update itself: no non-finite value enters the state
  finite = finite & jnp.all(jnp.stack(list(state_finite.values())))
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  new = new.replace(step=state.step + 1)
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "grad_finite": grad_finite,
             "state_finite": state_finite, "learning_rate": optim.learning_rate_at(config, state.step)}
  if "logit_scale" in aux:
    metrics["logit_scale"] = aux["logit_scale"]
  metrics.update(aux["accuracy"])  # in-batch top-1 retrieval, for methods with diagonal positives
  return new, metrics


def _cached_loss_and_grads(config, setup: Setup, state: TrainState, raw: tuple, model_inputs, apply, loss_of):
  """`jax.value_and_grad` of the step's loss by gradient caching (`jaxcl.grad_cache`), the model run on
  `config.grad_cache_chunks` chunks of each device's examples (`raw`: images, augmentation keys, text),
  each chunk augmented inside (`model_inputs`; the same views as the whole batch's, and only one
  chunk's augmented images alive): the per-example outputs (projections; image and text embeddings)
  of every chunk, the loss of the whole batch once (the learned logit scale and bias read from the
  parameters), each chunk's augmentation and forward again under vjp. BatchNorm normalises each chunk
  by its own statistics; the new running statistics are the average of the chunks' updates (the
  running mean as from the whole batch, the running variance from the within-chunk variances)."""
  per_example = ("projection", "prediction", "image", "text")

  def embed(params, chunk):
    out, mutated = apply(params, state.batch_stats, *model_inputs(*chunk))
    return {k: out[k] for k in per_example if k in out}, mutated.get("batch_stats", {})

  def loss(params, outputs):
    out = dict(outputs)
    if config.method in methods.IMAGE_TEXT:
      out["logit_scale"], out["logit_bias"] = setup.model.apply({"params": params}, method="scale_and_bias")
    return loss_of(out, {})

  shards = 1 if setup.mesh is None else int(np.prod([setup.mesh.shape[a] for a in BATCH_AXES]))
  run = grad_cache.value_and_grad(embed, loss, chunks=int(config.grad_cache_chunks), shards=shards,
                                  has_aux=True, embed_has_aux=True, unroll=bool(config.grad_cache_unroll))
  (value, aux), grads = run(state.params, raw)
  loss_aux = dict(aux["loss"], batch_stats=jax.tree.map(lambda x: jnp.mean(x, axis=0), aux["embed"]))
  return (value, loss_aux), grads


def _floating_leaves(tree) -> list[tuple[str, jax.Array]]:
  """(path, array) of the floating-point leaves of `tree` (the ones that can hold NaN or ±inf)."""
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def finite_parts(state: TrainState) -> dict[str, jax.Array]:
  """{field: all(isfinite(x)) over every floating leaf x of that field of `state`} (traced in the step)."""
  parts = {}
  for field in dataclasses.fields(state):
    leaves = [x for _, x in _floating_leaves(getattr(state, field.name))]
    if leaves:
      parts[field.name] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return parts


def nonfinite_leaves(tree) -> list[str]:
  """The paths ("params/encoder/dense0/kernel") of the floating leaves of `tree` holding a NaN or ±inf;
  [] when all are finite.

  One jitted computation on the devices, all(isfinite(x)) of every leaf stacked into one (L,) vector
  (replicated), and one transfer of those L booleans; no host loop over the arrays.
  """
  named = _floating_leaves(tree)
  if not named:
    return []
  names, leaves = zip(*named)
  sharding = getattr(leaves[0], "sharding", None)
  out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
  ok = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]), out_shardings=out)(list(leaves))
  return [name for name, good in zip(names, np.asarray(ok)) if not good]


# -------------------------------------------------------------------------------- host side of steps
def read_metrics(m: dict) -> dict:
  """A step's metrics on the host: one transfer of the small arrays (the loop's only read of a step's
  outputs; it waits for that step to finish)."""
  return jax.device_get(m)


class StepReport:
  """Checks and logs each step's metrics one step late, so the host never waits for the step it just
  dispatched.

  `dispatched(s, m)` keeps step s's metrics (device arrays) and reads those of step s - 1, which the
  devices finish while step s is queued behind it. `flush()` reads the kept ones at once; the loop calls
  it before every checkpoint and evaluation, and at the end. Reading a step: if `m["finite"]` is false
  the step's update was not applied (`train_step`), and `config.on_nonfinite="stop"` raises
  NonFiniteError naming that step (after the next step was dispatched, whose result is discarded),
  "skip" prints a warning naming it; then the metrics of every `log_every`-th and the last step are
  written, with examples/s over the steps since the previous logged one.
  """

  def __init__(self, config, workdir: str, writer, bar, start: int, good: int | None):
    self.config, self.workdir, self.writer, self.bar = config, workdir, writer, bar
    self.good = good  # the newest checkpoint verified finite (restored or saved), for the message
    self._pending = None
    self._since = (start, time.perf_counter())  # (step, time) of the previous logged step

  def dispatched(self, step: int, m: dict) -> None:
    previous, self._pending = self._pending, (step, m)
    if previous is not None:
      self._read(*previous)

  def flush(self) -> None:
    previous, self._pending = self._pending, None
    if previous is not None:
      self._read(*previous)

  def _read(self, step: int, m: dict) -> None:
    config = self.config
    m = read_metrics(m)
    if not bool(m["finite"]):
      msg = nonfinite_message(step, m) + "; the update was not applied"
      if config.on_nonfinite == "stop":
        kept = f"step {self.good}" if self.good is not None else "none yet"
        raise NonFiniteError(msg + f"; stopping (config.on_nonfinite='stop'). The last good checkpoint "
                             f"({kept}) is kept in {self.workdir}/checkpoints.")
      print("warning: " + msg + "; skipping it (config.on_nonfinite='skip').")
    if step % config.log_every == 0 or step == int(config.total_steps):
      (last, since), now = self._since, time.perf_counter()
      record = {k: float(v) for k, v in m.items() if k not in ("finite", "grad_finite", "state_finite")}
      record["examples_per_sec"] = (step - last) * config.batch_size / max(now - since, 1e-9)
      self.writer.write(step, record)
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_sec']:.0f}")
      self._since = (step, now)


class DataState:
  """A data iterator's state (`get_state()`) at one moment, saved as the iterator itself would be:
  the loop has already taken the next batch (prefetch) when it saves the state after the last one a
  saved step consumed."""

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return self._state


# ------------------------------------------------------------------------------------------ checkpoint
# Orbax saves a replicated array "replica-parallel": each replica writes a slice, cut out on its device
# by an eager jax slice (one dispatch, and one compile per shape, per array and replica). For small
# arrays that costs more than it saves (a tiny CLIP run's two saves on 8 CPU devices: 1,440 slices,
# 112 compiles; the run took 25.2 s with them, 18.6 s without); an array whose slices would be smaller
# than this is written whole by one replica. Big arrays (a ViT's weights on a pod) still save in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def use_replica_parallel_saves_for_big_arrays_only() -> None:
  """Registers orbax's `jax.Array` handler with `min_slice_bytes_for_replica_parallel` =
  `MIN_REPLICA_SLICE_BYTES` (orbax's global handler registry is where this option lives; the default
  handler's other settings, including its array metadata store, are kept)."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  store = getattr(default, "_array_metadata_store", None)  # orbax's default: a Store()
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, array_metadata_store=store), override=True)


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
  import grain

  use_replica_parallel_saves_for_big_arrays_only()

  # Each step is written to a temporary directory and renamed when complete, so a process killed in
  # the middle of a write leaves no step that all_steps() lists; cleanup_tmp_directories removes such
  # leftovers when the next run starts.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(config.keep_checkpoints), create=True,
      enable_async_checkpointing=bool(config.async_checkpointing),
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
      _paths.as_path(workdir) / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
  )


def save_checkpoint(manager, step: int, state: TrainState, data_iter) -> None:
  """Saves `state` and the data iterator's state (`data_iter.get_state()`: the iterator, or a
  `DataState` taken after the last batch the saved step consumed) as step `step`."""
  import grain

  saved = manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)
  if not saved:
    raise RuntimeError(f"orbax did not save the checkpoint of step {step} in {manager.directory}.")


def restore_checkpoint(manager, abstract_state, shardings, data_iter) -> tuple[TrainState | None, int]:
  """Restores the newest good checkpoint, falling back to older ones; (None, 0) if there is none.

  Good: orbax reads it into this config's state, and every floating leaf of the state is finite
  (`nonfinite_leaves`; the parameters, the optimizer state, ...). The unreadable or non-finite newer
  checkpoints are moved to workdir/checkpoints_quarantine (`quarantine_checkpoint`), never deleted: a
  transient read error must not destroy a good checkpoint. When none is good nothing is moved and a
  RuntimeError lists why each failed.
  """
  import grain

  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  steps = sorted(manager.all_steps(), reverse=True)
  errors = {}
  for step in steps:
    other = checkpoints_lib.shape_mismatches(manager, step, target)
    if other:  # not read at all (orbax's reads would fail one by one)
      restored = None
      errors[step] = f"holds arrays of other shapes than this config's ({checkpoints_lib.summary(other)})"
    else:
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # pylint: disable=broad-except
        restored, errors[step] = None, f"is unreadable ({type(e).__name__}: {e})"
    if not workdir_lib.every_process(restored is not None):  # every process resumes from the same step
      errors.setdefault(step, "is unreadable on another process (its output says why)")
      print(f"warning: checkpoint at step {step} {errors[step]}; trying an older one")
      continue
    bad = nonfinite_leaves(restored["state"])
    if bad:
      shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
      errors[step] = f"holds non-finite values (NaN or inf in {len(bad)} array(s): {shown})"
      print(f"warning: checkpoint at step {step} {errors[step]}; trying an older one")
      continue
    for newer in steps:  # orbax never saves at or below its latest step: move the bad ones aside
      if newer > step:
        moved = quarantine_checkpoint(manager, newer)
        print(f"warning: moved the checkpoint of step {newer}, which {errors[newer]}, to {moved}; "
              f"resuming from step {step}")
    return restored["state"], step
  if steps:
    raise RuntimeError(
        f"none of the checkpoints {sorted(steps)} in {manager.directory} can be restored into this "
        "config (a changed model or optimizer setting?). Use another --workdir or remove them.\n"
        + "\n".join(f"step {s} {why}" for s, why in errors.items()))
  return None, 0


def quarantine_checkpoint(manager, step: int) -> str:
  """Moves the checkpoint of `step` out of `manager`'s folder (workdir/checkpoints) to
  workdir/checkpoints_quarantine/<step>-<UTC time>, and returns that path (on an object store the
  folder also gets a README.txt: a folder there exists only once an object lies in it).

  The manager is reloaded, so the step leaves its step list (and `keep_checkpoints` counts only the
  steps still there). Several processes: the first moves it, all wait for the move, then reload.
  """
  source = _paths.as_path(manager.directory) / str(step)
  folder = _paths.as_path(manager.directory).parent / "checkpoints_quarantine"
  moved = folder / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  error = None
  if jax.process_index() == 0:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      if not _paths.is_local(folder):  # an object store's folder exists once an object lies in it
        (folder / "README.txt").write_text("Checkpoints jaxcl moved aside as unreadable or non-finite; "
                                           "move one back into checkpoints/ to use it again.\n")
      suffix, base = 1, str(moved)
      while moved.exists():  # the same step quarantined twice within one second
        moved, suffix = _paths.as_path(f"{base}.{suffix}"), suffix + 1
      source.rename(moved)
    except OSError as e:
      error = e
  if not workdir_lib.every_process(error is None):  # all wait for the move, and all fail if it failed
    raise RuntimeError(f"could not move the checkpoint {source} aside to {moved}: "
                       f"{error or 'see process 0'}") from error
  manager.reload()
  return str(moved)


# ------------------------------------------------------------------------------------------ evaluation
def embed_images(config, setup: Setup, variables, images: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
  """Backbone features (and joint-space embeddings for image-text models) of `images`, in chunks."""
  f = _embed_fn(setup.model, config.method in methods.IMAGE_TEXT)
  outs = []
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk]
    n = len(x)
    if n < chunk:  # pad to one compiled shape
      x = np.concatenate([x, np.zeros((chunk - n,) + x.shape[1:], x.dtype)])
    outs.append(jax.tree.map(lambda a: np.asarray(a[:n]), f(variables, jnp.asarray(x))))
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=8)
def _embed_fn(model, image_text: bool):
  """A jitted (variables, images) → embeddings function; variables are arguments, never baked in."""

  def f(variables, x):
    if image_text:
      return model.apply(variables, x, train=False, method="encode_image_features")
    out = model.apply(variables, x, train=False)
    return {"features": out["features"], "projection": out["projection"]}

  return jax.jit(f)


def stream_split(config, setup: Setup, split: str, fn) -> dict[str, jax.Array]:
  """`fn(images, rows, n)` over the split `split` streamed in global batches of `config.batch_size`
  (`sources.split_batches`: each process reads its share, put on the devices sharded along the batch
  axes), outputs concatenated: {key: (N, ...) jax.Array} of fn's row-wise outputs, plus "label" (N,).

  Only one batch of images is on the host at a time; what is kept are fn's outputs (the embeddings),
  on the devices. `rows` are the batch's rows in the split (N − 1 past its end), N its length.
  """
  mesh = setup.mesh if setup.mesh is not None else make_mesh(config)
  n, batches = sources.split_batches(config.data, split, int(config.batch_size),
                                     process_index=jax.process_index(), process_count=jax.process_count())
  outs = []
  for host in batches:
    batch = to_global({k: host[k] for k in ("image", "label", "row")}, mesh)
    outs.append(dict(fn(batch["image"], batch["row"], n), label=batch["label"]))
  return {k: jnp.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def eval_views(config, setup: Setup, n: int):
  """A jitted (images, rows) → (view 1, view 2) of the evaluation's alignment and uniformity: row i's
  views are those of `augment.make_views(jax.random.key(config.seed + 1), all n images, 2, setup.aug)`
  (per-example keys split over the whole split), computed a batch at a time."""
  params = augment.parse_aug_config(setup.aug)
  key = jax.random.key(config.seed + 1)

  def f(images, rows):
    per_example = lambda k: jax.random.split(k, n)[rows]
    return tuple(jax.vmap(augment.augment_image, in_axes=(0, 0, None))(per_example(k), images, params)
                 for k in jax.random.split(key, 2))

  return jax.jit(f)


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a global array on this host (gathered over the processes when they share it)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(config, setup: Setup, variables, earlier: tuple = ()) -> dict[str, Any]:
  """kNN / linear-probe accuracy of the backbone features, zero-shot accuracy (image-text) or alignment
  and uniformity (self-supervised), on `config.data.train_split` (reference) and `eval_split`.
  `earlier`: the variables of earlier MCL stages, whose features are concatenated in front of this
  model's (`knn_accuracy_this_stage` is this model's alone).

  Both splits are streamed (`stream_split`): every process reads its share a batch at a time, the
  batches are embedded sharded over the devices, and only the embeddings are kept (on the devices), so
  host memory does not grow with the split; kNN (query chunks against the sharded reference set) and
  the linear probe run on the devices. Also returns "_projection" (the test features) and "_labels"
  (the test labels) as NumPy arrays, for the plots.
  """
  num_classes = setup.info["num_classes"]
  image_text = config.method in methods.IMAGE_TEXT
  embed = _embed_fn(setup.model, image_text)

  def features(images) -> dict:
    out = embed(variables, images)
    keep = {"features": out["features"]}
    if image_text:
      keep["embedding"] = out["embedding"]
    if earlier:
      keep["own"] = out["features"]
      keep["features"] = jnp.concatenate([embed(v, images)["features"] for v in earlier] + [out["features"]], 1)
    return keep

  views_of = {}  # n → eval_views(config, setup, n): one compiled function for the whole split

  def test_fn(images, rows, n):
    keep = features(images)
    if not image_text:  # alignment / uniformity of the projections of two augmented views
      if n not in views_of:
        views_of[n] = eval_views(config, setup, n)
      views = views_of[n](images, rows)
      keep["view1"], keep["view2"] = (embed(variables, v)["projection"] for v in views)
    return keep

  tr = stream_split(config, setup, config.data.train_split, lambda images, rows, n: features(images))
  te = stream_split(config, setup, config.data.eval_split, test_fn)
  knn = dict(knn_k=config.eval.knn_k, knn_temperature=config.eval.knn_temperature)
  own = {}
  if earlier:
    own = eval_lib.evaluate_embeddings(tr["own"], tr["label"], te["own"], te["label"], num_classes=num_classes,
                                       linear_probe=False, **knn)
  result = eval_lib.evaluate_embeddings(
      tr["features"], tr["label"], te["features"], te["label"], num_classes=num_classes,
      linear_probe=config.eval.linear_probe, **knn)
  if own:
    result["knn_accuracy_this_stage"] = own["knn_accuracy"]
  if image_text:
    encode = functools.partial(setup.text.encode_for_eval, setup.model, variables)
    class_emb = eval_lib.class_embeddings(encode, setup.info["class_names"], setup.text.templates)
    result["zero_shot_accuracy"] = float(eval_lib.zero_shot_accuracy(te["embedding"], class_emb, te["label"]))
  else:
    result.update(eval_lib.alignment_uniformity(te["view1"], te["view2"]))
  result = {k: float(v) for k, v in result.items()}
  result["_projection"] = host_array(te["features"])
  result["_labels"] = host_array(te["label"])
  return result


def raw_pixel_baseline(config, setup: Setup) -> dict[str, float]:
  """kNN / linear-probe accuracy of the flattened pixels (the splits streamed as in `evaluate`)."""
  flat = lambda images, rows, n: {"features": images.reshape(images.shape[0], -1)}
  tr, te = (stream_split(config, setup, split, flat) for split in (config.data.train_split, config.data.eval_split))
  r = eval_lib.evaluate_embeddings(
      tr["features"], tr["label"], te["features"], te["label"],
      num_classes=setup.info["num_classes"], knn_k=config.eval.knn_k, knn_temperature=config.eval.knn_temperature,
      linear_probe=config.eval.linear_probe)
  return {k: float(v) for k, v in r.items()}


def final_variables(workdirs, abstract: TrainState, shardings: TrainState) -> tuple:
  """The variables ({"params", "batch_stats"}) of the final checkpoint of each of `workdirs` (finished
  runs), restored with this run's model structure and shardings (`mcl.load_stage_variables`)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        _variables(abstract), _variables(shardings))
  return tuple(mcl.load_stage_variables(w, target) for w in workdirs)


def mcl_earlier_stages(config, abstract: TrainState, shardings: TrainState) -> tuple:
  """The variables of the earlier Multistage Contrastive Learning stages (`config.loss.mcl_previous_stages`,
  see jaxcl/train/mcl.py); () for other losses."""
  if config.loss.name != mcl.LOSS_NAME:
    return ()
  return final_variables(mcl.previous_stages(config), abstract, shardings)


def mcl_loss_state(config, setup: Setup, earlier: tuple, shardings: TrainState, train: dict) -> dict:
  """{"cluster_ids": the joint k-means clusters of the earlier stages' features, per example id};
  `train`: the train split's arrays (`sources.load_arrays`)."""
  embed = lambda variables, images: embed_images(config, setup, variables, images)["features"]
  ids = mcl.cluster_ids(config, list(earlier), embed, train, loss_state_size(config, setup.info))
  return jax.device_put({"cluster_ids": ids}, shardings.loss_state)


def _variables(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _fmt_table(results: dict) -> str:
  keys = [k for k in ("knn_accuracy", "linear_probe_accuracy", "zero_shot_accuracy") if k in results]
  rows = [("trained", results)] + list(results.get("baselines", {}).items())
  lines = ["| encoder | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, r in rows:
    cells = [f"{r[k]:.4f}" if r.get(k) is not None else "n/a" for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the loop
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_at: int | None = None
) -> dict:
  """Trains to `config.total_steps` (resuming from `workdir`), evaluates, writes the run's outputs.

  `stop_at` ends this invocation after that step with a checkpoint and no evaluation, as a preemption
  would (SIGTERM does the same at the next step boundary); running again resumes. Returns the results
  dict, or {"step": s, "stopped": True} when the run stopped early.

  `workdir` is a local folder or a URI `etils.epath` opens (`gs://bucket/run`; `jaxcl._paths`). Before
  anything is computed the workdir is checked to be writable and the config validated (its data opened);
  the run then holds the workdir's lock and checks the config against the one recorded there
  (`jaxcl.train.workdir`).
  """
  workdir = _paths.resolve(workdir)  # a local folder, or a URI such as gs://bucket/run (jaxcl._paths)
  workdir_lib.check_writable(workdir)
  infos = validate_config(config)
  with workdir_lib.claim(config, workdir):
    return _train_and_evaluate(config, workdir, infos, progress=progress, stop_at=stop_at)


def _train_and_evaluate(config, workdir: str, infos: dict, *, progress: bool, stop_at: int | None) -> dict:
  lead = jax.process_index() == 0
  mesh = make_mesh(config)
  setup = build_setup(config, infos[config.data.train_split], mesh)
  loader = pipeline.make_train_loader(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size, seed=config.seed)
  data_iter = iter(loader)

  abstract, shardings = state_shardings(config, setup, mesh)
  manager = checkpoint_manager(config, workdir)
  state, start = restore_checkpoint(manager, abstract, shardings, data_iter)
  good = start if state is not None else None  # the newest checkpoint verified finite (restored or saved)
  earlier = mcl_earlier_stages(config, abstract, shardings)
  # One program for the run's initial state and the random-init baseline (compiled once).
  init_fn = jax.jit(functools.partial(init_state, config, setup), out_shardings=shardings)
  if state is None:
    state = init_fn(jax.random.key(config.seed))
    if earlier:  # a later MCL stage: the clusters of the earlier stages' features, once per run
      train = sources.load_arrays(config.data, config.data.train_split)
      state = state.replace(loss_state=mcl_loss_state(config, setup, earlier, shardings, train))
  else:
    print(f"Resumed from checkpoint at step {start} in {workdir}")

  step_fn = jit_train_step(config, setup, shardings)
  writer = metrics_lib.MetricsWriter(workdir, enabled=lead, purge_step=start + 1 if start else None)
  if lead:  # steps after the checkpoint were lost (kill -9) and run again: log them once
    metrics_lib.rewind(workdir, start)
    if start == int(config.total_steps):  # a finished run evaluates again: one row per evaluation
      metrics_lib.forget_evaluation(workdir, start)
  total = int(config.total_steps)
  bar = _progress(progress and lead, start, total)
  step = start
  end = total if stop_at is None else min(total, int(stop_at))
  report = StepReport(config, workdir, writer, bar, start, good)
  preempted = _PreemptionFlag()

  def fetch(step: int) -> tuple[dict, DataState]:
    """The global batch of (0-based) step `step`, and the data-iterator state once it is consumed."""
    host = next(data_iter)
    host = dict(setup.text.prepare(config, host, step))
    host["image"] = encode_images(host["image"], config.data.transfer_dtype)
    return to_global(host, mesh), DataState(data_iter.get_state())

  consumed = DataState(data_iter.get_state())  # the iterator after the last batch a dispatched step used
  try:
    # Step s+1 is dispatched before anything of step s is read on the host; the batch of step s+1 is
    # loaded and put on the devices while step s runs; step s's metrics are checked (finite) and logged
    # after step s+1 is dispatched (`StepReport`), and before any checkpoint or evaluation.
    upcoming = fetch(step) if step < end else None
    while step < end and not preempted.is_set(manager, step):
      batch, after = upcoming
      state, m = step_fn(state, batch)
      step += 1
      consumed = after
      upcoming = fetch(step) if step < end else None  # prefetch: the next batch while this step runs
      report.dispatched(step, m)  # checks the previous step: waits for it, not for this one
      saving = step % config.checkpoint_every == 0 or step == total
      evaluating = step % config.eval_every == 0 and step != total
      if saving or evaluating:
        report.flush()  # nothing is saved or evaluated before every step it covers was checked
      if saving:
        save_checkpoint(manager, step, state, consumed)
        report.good = step  # every step's guard covered the whole state (`train_step`)
      if evaluating:
        r = evaluate(config, setup, _variables(state), earlier=earlier)
        writer.write(step, {f"eval/{k}": v for k, v in r.items() if not k.startswith("_")})
      bar.update(1)
    report.flush()
    if step < total:  # stopped early (stop_at or SIGTERM): keep everything, skip the evaluation
      if manager.latest_step() != step:
        save_checkpoint(manager, step, state, consumed)
      print(f"Stopped at step {step}; a checkpoint is in {workdir}/checkpoints, run again to resume.")
  finally:
    preempted.restore()
    bar.close()
    manager.wait_until_finished()
  if step < total:
    writer.close()
    manager.close()
    return {"step": step, "stopped": True}

  results = evaluate(config, setup, _variables(state), earlier=earlier)
  projection, labels = results.pop("_projection"), results.pop("_labels")
  writer.write(step, {f"eval/{k}": v for k, v in results.items()})
  if config.eval.baselines:
    init = init_fn(jax.random.key(config.seed))
    random_init = {k: v for k, v in evaluate(config, setup, _variables(init)).items() if not k.startswith("_")}
    results["baselines"] = {"random_init": random_init, "raw_pixels": raw_pixel_baseline(config, setup)}
  results["step"] = step
  if lead:
    (_paths.as_path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
    metrics_lib.write_plots(workdir, metrics_lib.pca_2d(projection), labels)
    print(_fmt_table(results))
  writer.close()
  manager.close()
  return results


def nonfinite_message(step: int, m: dict) -> str:
  """Names the step and what was not finite: the loss, the gradients of which parameters, and which
  fields of the updated state (`m["state_finite"]`, e.g. "params, opt_state")."""
  loss = float(m["loss"])
  parts = []
  if not np.isfinite(loss):
    parts.append(f"the loss is {loss}")
  bad = [jax.tree_util.keystr(path, simple=True, separator="/")
         for path, ok in jax.tree_util.tree_leaves_with_path(m["grad_finite"]) if not bool(ok)]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    parts.append(f"the gradient of {len(bad)} parameter array(s) is not finite ({shown}; gradient norm "
                 f"{float(m['grad_norm'])})")
  elif not np.isfinite(float(m["grad_norm"])):
    parts.append(f"the gradient norm is {float(m['grad_norm'])}")
  bad_state = [field for field, ok in m.get("state_finite", {}).items() if not bool(ok)]
  if bad_state:
    parts.append(f"the updated state would hold them in {', '.join(bad_state)}")
  return f"step {step}: non-finite values: " + "; ".join(parts or ["(unknown quantity)"])


class _PreemptionFlag:
  """SIGTERM (how preemptible TPU VMs are stopped) asks the loop to checkpoint and exit cleanly.

  One process: a Python SIGTERM handler sets a flag, read at every step boundary. Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`) owns SIGTERM and
  `manager.reached_preemption(step)` is True on every process at the same step, so all of them stop
  and save that step; no Python handler is installed then, as it would replace the service's own. If
  the service is disabled (`jax_enable_preemption_service=False`), the local flags are combined over
  the processes at every step instead.
  """

  def __init__(self):
    import signal
    import threading

    self._set = False
    self._previous = None
    self._sync = jax.process_count() > 1 and _preemption_service_running()
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._set = True

  def is_set(self, manager, step: int) -> bool:
    if self._sync:
      return bool(manager.reached_preemption(step))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      return bool(np.any(multihost_utils.process_allgather(np.int32(self._set))))
    return self._set

  def restore(self) -> None:
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _preemption_service_running() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.preemption_sync_manager is not None
  except Exception:  # pylint: disable=broad-except
    return False


class _NoBar:
  def update(self, n): ...
  def set_postfix(self, **kw): ...
  def close(self): ...


def _progress(enabled: bool, start: int, total: int):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm

  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
