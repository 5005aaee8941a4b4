"""SimCLR and DCL: two views of each image, a contrastive loss between them.

`config.loss.name` picks the two-view loss (`TWO_VIEW_LOSSES`: NT-Xent, DCL, DCLW, MACL, HN-NCE,
positive-aware InfoNCE). SimCLR also takes the losses that keep per-example state in
`TrainState.method_state`, indexed by the batch's stable example id `batch["index"]` and split over the
devices along the example axis:
- `isogclr`: "Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic
  Temperature Individualization" (Qiu et al., 2023): per-example temperatures and moving-average
  normalisers (`losses.isogclr_state`), the hyper-parameters in `config.isogclr`. Under gradient
  accumulation the state is updated at every micro-step (each micro-batch is its own iSogCLR step).
- `mcl_nt_xent`: a later stage of Multistage Contrastive Learning (`jaxcl.train.mcl`, settings in
  `config.mcl`): negatives restricted to the anchor's cluster of the earlier stages' features; the
  clusters do not change.
"""

from __future__ import annotations

import jax
import ml_collections

from jaxcl import losses
from jaxcl.data import sources
from jaxcl.train import devices, mcl
from jaxcl.train.methods import base


def two_view_losses(config) -> dict:
  """name -> f(z1, z2, temperature, engine options) of the two-view losses."""
  sigma = config.loss.sigma
  return {
      "nt_xent": lambda a, b, t, e: losses.nt_xent(a, b, temperature=t, **e),
      "dcl": lambda a, b, t, e: losses.dcl(a, b, temperature=t, **e),
      "dclw": lambda a, b, t, e: losses.dclw(a, b, temperature=t, sigma=sigma, **e),
      # Objectives of docs/objectives.md that fit two views (positive_aware_infonce: single-device only):
      "macl": lambda a, b, t, e: losses.macl(a, b, temperature=t, **e),
      "hn_nce": lambda a, b, t, e: losses.hn_nce(a, b, temperature=t, **e),
      "positive_aware_infonce": lambda a, b, t, e: 0.5 * (
          losses.positive_aware_infonce(a, b, temperature=t) + losses.positive_aware_infonce(b, a, temperature=t)),
  }


TWO_VIEW_LOSSES = ("nt_xent", "dcl", "dclw", "macl", "hn_nce", "positive_aware_infonce")
PER_EXAMPLE_LOSSES = ("isogclr", mcl.LOSS_NAME)


class TwoViews(base.ViewsMethod):
  """Two views of each image, a two-view loss of `TWO_VIEW_LOSSES` between their projections."""

  loss_names = TWO_VIEW_LOSSES

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z = outputs["projection"]
    engine = base.engine_options(config, mesh)
    return two_view_losses(config)[config.loss.name](z[0], z[1], config.loss.temperature, engine), state, {}

  def positive_pairs(self, outputs, extras):
    return base.first_two_views(outputs["projection"])


def isogclr_section() -> ml_collections.ConfigDict:
  """`config.isogclr`: defaults of the authors' implementation for unimodal tasks (LibAUC GCLoss_v1,
  enable_isogclr=True)."""
  c = ml_collections.ConfigDict()
  c.tau_init = 0.1  # τ₀ of every example
  c.gamma = 0.9  # moving-average weight of the normaliser u
  c.rho = 0.3  # DRO radius ρ
  c.eta = 0.01  # step size of the temperature update
  c.beta = 0.9  # momentum of the temperature gradient
  c.tau_min = 0.05
  c.tau_max = 0.7
  return c


class SimCLR(TwoViews):
  """The two-view losses, and the per-example-state losses `PER_EXAMPLE_LOSSES`."""

  def config_sections(self):
    return {"isogclr": isogclr_section(), "mcl": mcl.config_section()}

  name = "simclr"
  loss_names = TWO_VIEW_LOSSES + PER_EXAMPLE_LOSSES

  def grad_cache_conflict(self, config):
    return "per-example loss state" if config.loss.name in PER_EXAMPLE_LOSSES else None

  def init_state(self, config, variables, key, num_ids):
    """iSogCLR: `losses.isogclr_state(num_ids, tau_init=config.isogclr.tau_init)` (log u unseen, τ = τ₀).
    MCL: {"cluster_ids": zeros}; the loop fills in the clusters of the earlier stages (`mcl.cluster_ids`)."""
    if config.loss.name == mcl.LOSS_NAME:
      return mcl.init_state(int(num_ids))
    if config.loss.name == "isogclr":  # log u = −inf (unseen) stored finite: `base.stored_log_u`
      return base.stored_log_u(losses.isogclr_state(int(num_ids), tau_init=config.isogclr.tau_init), ("log_u",))
    return {}

  def earlier_models(self, config, abstract, shardings):
    """MCL: the final variables of the earlier stages (`config.mcl.previous_stages`)."""
    if config.loss.name != mcl.LOSS_NAME:
      return ()
    return mcl.final_variables(mcl.previous_stages(config), abstract, shardings)

  def init_state_from_data(self, config, setup, state, earlier, embed):
    """MCL: {"cluster_ids": the joint k-means clusters of the earlier stages' features, per example id};
    every process streams the whole train split (`sources.split_batches`, `mcl.FEATURE_BATCH` at a time)."""
    if not earlier:
      return state
    _, train = sources.split_batches(config.data, config.data.train_split, mcl.FEATURE_BATCH)
    ids = mcl.cluster_ids(config, list(earlier), embed, train, state.method_state["cluster_ids"].shape[0])
    cluster_ids = jax.device_put(ids, state.method_state["cluster_ids"].sharding)
    return state.replace(method_state={"cluster_ids": cluster_ids})

  def state_shardings(self, mesh, abstract):
    return jax.tree.map(lambda x: devices.example_sharding(mesh, x), abstract)

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    if config.loss.name == mcl.LOSS_NAME:
      return mcl.loss(config, outputs, batch["index"], state, **base.engine_options(config, mesh)), state, {}
    if config.loss.name == "isogclr":  # on a mesh: the sharded engine, the state gathered whole and returned whole
      z, c = outputs["projection"], config.isogclr
      out = losses.isogclr(z[0], z[1], batch["index"], base.loss_log_u(state, ("log_u",)), gamma=c.gamma, rho=c.rho,
                           eta=c.eta, beta=c.beta, tau_min=c.tau_min, tau_max=c.tau_max,
                           **base.engine_options(config, mesh))
      return out.loss, base.stored_log_u(out.state, ("log_u",)), {}
    return super().loss(config, outputs, batch, state, mesh=mesh)


class DCL(TwoViews):
  """The two-view losses only (DCL's recipe: `config.loss.name = "dcl"`)."""

  name = "dcl"


base.register(SimCLR())
base.register(DCL())
