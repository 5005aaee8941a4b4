"""NNCLR: "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual
Representations" (Dwibedi et al., ICCV 2021).

Two augmented views; the anchor of view 1 is its nearest neighbour in a support set of projections of
earlier batches, contrasted with view 2's predictions (`losses.nnclr`), and symmetrically. The support set
is `TrainState.method_state["support"]` ((Q, E), Q = `config.nnclr.support_size`): L2-normalised view-1
projections written first in, first out at `method_state["support_ptr"]` after each step's loss. It starts
as random unit vectors, as in solo-learn's and lightly's implementations (the authors released no code),
and holds only real projections after Q / B steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl.train.methods import base


def nnclr_section() -> ml_collections.ConfigDict:
  """`config.nnclr`: the support set."""
  c = ml_collections.ConfigDict()
  c.support_size = 98_304  # Q, the paper's ImageNet setting; a multiple of config.batch_size
  return c


class NNCLR(base.ViewsMethod):
  """NNCLR with a prediction head when `config.model.predictor_dim` > 0 (the paper's setting), else
  each view's projection is the candidate of the other's neighbour."""

  name = "nnclr"
  loss_names = ("nnclr",)

  def config_sections(self):
    return {"nnclr": nnclr_section()}

  def check(self, config):
    super().check(config)
    base.check_queue_size("config.nnclr.support_size", config.nnclr.support_size, config.batch_size,
                          allow_zero=False)

  def init_state(self, config, variables, key, num_ids):
    shape = (config.nnclr.support_size, config.model.projection_dims[-1])
    return {"support": losses.l2_normalize(jax.random.normal(jax.random.fold_in(key, 11), shape, jnp.float32)),
            "support_ptr": jnp.zeros((), jnp.int32)}

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z = outputs["projection"]
    p = outputs.get("prediction", z)
    support = jax.lax.stop_gradient(state["support"])
    t, engine = config.loss.temperature, base.engine_options(config, mesh)
    loss = 0.5 * (losses.nnclr(z[0], p[1], support, temperature=t, **engine)
                  + losses.nnclr(z[1], p[0], support, temperature=t, **engine))
    written = losses.l2_normalize(jax.lax.stop_gradient(z[0]))
    support, ptr = base.fifo_enqueue(state["support"], state["support_ptr"], written)
    return loss, {"support": support, "support_ptr": ptr}, {}

  def positive_pairs(self, outputs, extras):
    return base.first_two_views(outputs["projection"])


base.register(NNCLR())
