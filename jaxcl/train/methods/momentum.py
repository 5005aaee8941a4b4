"""Methods with an EMA target network: MoCo and BYOL.

The target network's variables live in `TrainState.method_state["target"]` ({"params", "batch_stats"}):
it runs on the same views as the online network (no gradient; its batch statistics are updated as the
online network's) and follows the online parameters by an exponential moving average,
target ← m · target + (1 − m) · online with m = `config.momentum.ema`, after every optimizer update
(not at gradient-accumulation micro-steps).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl.train.methods import base


def ema(target: Any, online: Any, decay: float) -> Any:
  """target ← decay · target + (1 − decay) · online."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


def momentum_section() -> ml_collections.ConfigDict:
  """`config.momentum`: the EMA target network (both methods) and MoCo v2's queue."""
  c = ml_collections.ConfigDict()
  c.ema = 0.99  # m of target ← m · target + (1 − m) · online
  c.queue_size = 0  # moco v2: > 0 (a queue of the last Q keys); moco v3 and byol: 0 (in-batch negatives)
  return c


class WithTargetNetwork(base.ViewsMethod):
  """A views method whose loss compares the online outputs with an EMA target network's."""

  def config_sections(self):
    return {"momentum": momentum_section()}

  def check(self, config):
    super().check(config)
    if not 0.0 <= config.momentum.ema <= 1.0:
      raise ValueError(f"`config.momentum.ema` must be in [0, 1], got {config.momentum.ema}.")

  def grad_cache_conflict(self, config):
    return "an EMA target network"

  def init_state(self, config, variables, key, num_ids):
    return {"target": {"params": jax.tree.map(jnp.copy, variables["params"]),
                       "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"])}}

  def run_target(self, state, forward) -> tuple[jax.Array, dict]:
    """The target network's (V, B, E) projections of the step's views (no gradient), and the method
    state with its new batch statistics."""
    out, batch_stats = forward(state["target"]["params"], state["target"]["batch_stats"])
    target = {"params": state["target"]["params"], "batch_stats": batch_stats}
    return jax.lax.stop_gradient(out["projection"]), {**state, "target": target}

  def after_update(self, config, state, params, updated):
    target = ema(state["target"]["params"], params, config.momentum.ema)
    if updated is not True:  # gradient accumulation: the target follows optimizer updates, not micro-steps
      target = jax.tree.map(lambda n, o: jnp.where(updated, n, o), target, state["target"]["params"])
    return {**state, "target": {**state["target"], "params": target}}


class MoCo(WithTargetNetwork):
  """MoCo v3 ("An Empirical Study of Training Self-Supervised Vision Transformers", Chen et al., 2021):
  the online queries (predictions when there is a predictor head) against the target's keys of the other
  view, symmetric, in-batch negatives. With `config.momentum.queue_size` = Q > 0, MoCo v2 ("Improved
  Baselines with Momentum Contrastive Learning", Chen et al., 2020): the negatives are a queue of the
  last Q keys (`method_state["queue"]`, (Q, E), written at `method_state["queue_ptr"]`), not the batch."""

  name = "moco"
  loss_names = ("infonce",)

  def check(self, config):
    super().check(config)
    base.check_queue_size("config.momentum.queue_size", config.momentum.queue_size, config.batch_size,
                          allow_zero=True)

  def init_state(self, config, variables, key, num_ids):
    state = super().init_state(config, variables, key, num_ids)
    size = config.momentum.queue_size
    if size:
      q = jax.random.normal(jax.random.fold_in(key, 7), (size, config.model.projection_dims[-1]), jnp.float32)
      state["queue"] = q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-6)
      state["queue_ptr"] = jnp.zeros((), jnp.int32)
    return state

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    q = outputs.get("prediction", outputs["projection"])
    k, state = self.run_target(state, forward)
    t, engine = config.loss.temperature, base.engine_options(config, mesh)
    if config.momentum.queue_size:  # MoCo v2: the queue holds the negatives
      neg = jax.lax.stop_gradient(state["queue"])
      loss = 0.5 * (
          losses.infonce(q[0], k[1], temperature=t, negatives=neg, in_batch_negatives=False, **engine)
          + losses.infonce(q[1], k[0], temperature=t, negatives=neg, in_batch_negatives=False, **engine))
      queue, ptr = base.fifo_enqueue(state["queue"], state["queue_ptr"], losses.l2_normalize(k[1]))
      state = {**state, "queue": queue, "queue_ptr": ptr}
    else:  # MoCo v3: symmetric, in-batch negatives
      loss = 0.5 * (losses.infonce(q[0], k[1], temperature=t, **engine)
                    + losses.infonce(q[1], k[0], temperature=t, **engine))
    return loss, state, {"keys": k}

  def positive_pairs(self, outputs, extras):
    q = outputs.get("prediction", outputs["projection"])
    return q[0], extras["keys"][1], base.VIEW_ACCURACY_NAMES


class BYOL(WithTargetNetwork):
  """BYOL ("Bootstrap Your Own Latent", Grill et al., 2020): each view's prediction regresses the target
  network's projection of the other view; no negatives."""

  name = "byol"
  loss_names = ("negative_cosine",)
  needs_predictor = True

  def check(self, config):
    super().check(config)
    if config.momentum.queue_size:
      raise ValueError(f"`config.momentum.queue_size` is MoCo's queue of negatives; BYOL has no negatives: "
                       f"set it to 0, got {config.momentum.queue_size}.")

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    p = outputs["prediction"]
    k, state = self.run_target(state, forward)
    return losses.negative_cosine(p[0], k[1]) + losses.negative_cosine(p[1], k[0]), state, {}


base.register(MoCo())
base.register(BYOL())
