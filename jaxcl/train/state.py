"""The train state and what the trainer builds once from a config.

- `TrainState`: what a checkpoint holds (step, parameters, batch statistics, optimizer state, and the
  method's own state: an EMA target network, a queue, per-example loss state).
- `Setup` / `build_setup`: the model, optimizer, text side and augmentation of a config (static).
- `init_state` and `state_shardings`: the initial state, and how each of its arrays is laid out on the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxcl.data import augment, sources
from jaxcl.train import devices
from jaxcl.train import methods, optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # The method's own state (`Method.init_state`): an EMA target network and a MoCo queue, per-example
  # loss state indexed by the stable example id batch["index"] (iSogCLR, MCL; split along the example
  # axis over the batch mesh axes), or {}. Checkpointed with the rest of the state.
  method_state: Any


# ---------------------------------------------------------------------------------------- model/state
class Setup(flax.struct.PyTreeNode):
  """What the loop builds once from the config (static: not part of the checkpoint)."""

  model: Any = flax.struct.field(pytree_node=False)
  tx: Any = flax.struct.field(pytree_node=False)
  text: Any = flax.struct.field(pytree_node=False)
  aug: Any = flax.struct.field(pytree_node=False)
  info: Any = flax.struct.field(pytree_node=False)
  mesh: Any = flax.struct.field(pytree_node=False, default=None)  # for the sharded loss engines
  method: Any = flax.struct.field(pytree_node=False, default=None)  # the `methods.Method` of config.method


def build_setup(config: ml_collections.ConfigDict, info: dict | None = None, mesh=None) -> Setup:
  """`info`: the train split's source info when already known (from `validate_config`); `mesh`: the
  device mesh, which `config.loss.impl = "allgather" | "ring"` splits the loss over."""
  if info is None:
    _, info = sources.build_source(config.data, config.data.train_split)
  method = methods.get(config.method)
  text = method.text_side(config, info)
  return Setup(model=method.build_model(config, text), tx=optim.make_optimizer(config), text=text,
               aug=augment.default_aug_config(config.augment.strength), info=info, mesh=mesh, method=method)


def sample_inputs(config, setup: Setup, batch: int) -> tuple:
  if setup.method.text_only:
    return (setup.text.dummy(batch),)
  image = jnp.zeros((batch,) + tuple(setup.info.image_shape), jnp.float32)
  if setup.method.image_text:
    return image, setup.text.dummy(batch)
  return (image,)


def per_example_state_size(info: sources.SourceInfo, num_devices: int | None = None) -> int:
  """The length N of per-example state: one slot per possible example id (`batch["index"]` lies in
  [0, `info.num_ids`)), padded up to a multiple of the device count so the state shards evenly along
  the batch mesh axes. The padding slots are never indexed and keep their initial values."""
  n = jax.device_count() if num_devices is None else int(num_devices)
  return -(-int(info.num_ids) // n) * n


def init_state(config, setup: Setup, key: jax.Array) -> TrainState:
  """The initial state: the model initialised from `key` (or from the method's pretrained weights:
  `Method.initial_params`), the optimizer state, and the method's state."""
  variables = setup.model.init({"params": key}, *sample_inputs(config, setup, 2), train=False)
  params = setup.method.initial_params(config, setup.text, variables["params"])
  params = setup.method.constrain_params(config, params)
  batch_stats = variables.get("batch_stats", {})
  num_ids = per_example_state_size(setup.info, setup.mesh.size if setup.mesh is not None else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=setup.tx.init(params),
      method_state=setup.method.init_state(config, {"params": params, "batch_stats": batch_stats}, key, num_ids),
  )


def state_shardings(config, setup: Setup, mesh):
  """(abstract state, shardings): parameters and optimizer state replicated or FSDP-sharded
  (`devices.param_sharding`), the method state as the method lays it out (`Method.state_shardings`)."""
  abstract = jax.eval_shape(functools.partial(init_state, config, setup), jax.random.key(0))
  shardings = jax.tree.map(lambda x: devices.param_sharding(mesh, x), abstract)
  shardings = shardings.replace(method_state=setup.method.state_shardings(mesh, abstract.method_state))
  return abstract, shardings


def variables(state: TrainState) -> dict:
  """The model variables {"params", "batch_stats"} of `state` (of its abstract form or shardings too)."""
  return {"params": state.params, "batch_stats": state.batch_stats}
