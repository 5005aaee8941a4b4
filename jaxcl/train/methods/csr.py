"""CSR: "Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation" (Wen et al., ICML 2025).

A TopK sparse autoencoder (`jaxcl.models.SparseAutoencoder`) trained by `losses.csr` on the embeddings of
a FROZEN backbone. As in the authors' code (neilwen987/CSR_Adaptive_Rep, `Vision/main_visual.py`: a
pretrained timm backbone in eval mode, its embeddings computed once, the autoencoder trained on them),
only the autoencoder learns here:

- the backbone is the run's encoder (`config.model`), restored at the start of a fresh run from the final
  checkpoint of an earlier, finished run named by `config.csr.backbone` (any views method's run with the
  same `config.model`: its "encoder" parameters and batch statistics; `init_state_from_data`), or, with
  `config.csr.backbone = ""`, its random initialisation (random features: a baseline);
- frozen: it runs in inference mode (running batch statistics, which it never updates), its features
  carry no gradient (`stop_gradient`), and its parameters are held at their starting values after every
  update (`constrain_params`: weight decay does not move them; their gradient is zero, so the optimizer
  state does not move either);
- each example's two augmented views give two embeddings: x (view 1) and its positive (view 2) in
  `losses.csr` (the authors' vision recipe runs the same embedding through the autoencoder twice; the
  other view is this trainer's positive, and both views' embeddings are reconstructed);
- the dead-latent counters `steps_since_active` (H,) are the method state
  (`TrainState.method_state["steps_since_active"]`), carried from step to step (`CSROutput` returns the
  updated ones) and checkpointed with the run.

The model's "features" (what the evaluation's kNN and linear probe read) are the sparse codes at k (the
CSR representation), its "projection" the frozen backbone embeddings (the autoencoder's input; the
evaluation's alignment / uniformity are of those). No in-batch accuracy is logged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import _paths
from jaxcl import losses
from jaxcl import models
from jaxcl.train import mcl
from jaxcl.train.methods import base

BACKBONE = "encoder"  # the backbone's name in the parameters and batch statistics of a views model


def csr_section() -> ml_collections.ConfigDict:
  """`config.csr`: the authors' vision defaults (`Vision/main_visual.py`; `losses.csr`'s defaults)."""
  c = ml_collections.ConfigDict()
  c.backbone = ""  # work directory of a finished run whose encoder is restored and frozen ("": random init)
  c.hidden = 0  # H latents; 0: 4 × the backbone's feature size (the authors' default)
  c.k = 8  # active latents per code
  c.multi_k = 4  # the second reconstruction at multi_k · k latents ...
  c.multi_k_weight = 0.125  # ... with this weight
  c.aux_k = 512  # latents of the dead-latent auxiliary reconstruction
  c.aux_weight = 1 / 32  # β
  c.contrastive_weight = 0.1  # γ
  c.temperature = 0.2  # τ of the contrastive term on the codes
  c.dead_threshold = 10  # steps without firing after which a latent is dead
  return c


class SparseCodingModel(nn.Module):
  """A frozen backbone → the TopK sparse autoencoder of its features.

  Outputs "projection": the backbone's (B, D) float32 features, stop-gradient (the autoencoder's input);
  "features": the (B, H) sparse codes at k (parameters under "autoencoder")."""

  encoder: nn.Module
  hidden: int  # 0: 4·D
  k: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = jax.lax.stop_gradient(self.encoder(x, train=False).astype(jnp.float32))  # frozen: inference mode
    codes = models.SparseAutoencoder(hidden=self.hidden or 4 * h.shape[-1], k=self.k, name="autoencoder")(h)
    return {"features": codes, "projection": h}


class CSR(base.ViewsMethod):
  name = "csr"
  loss_names = ("csr",)
  loss_reads_params = True

  def config_sections(self):
    return {"csr": csr_section()}

  def check(self, config):
    super().check(config)
    c = config.csr
    for key in ("k", "multi_k", "aux_k", "dead_threshold"):
      if c[key] < 1:
        raise ValueError(f"`config.csr.{key}` must be >= 1, got {c[key]}.")
    if c.hidden < 0:
      raise ValueError(f"`config.csr.hidden` must be >= 1, or 0 for 4 × the backbone's feature size, got {c.hidden}.")
    if c.hidden and c.k > c.hidden:
      raise ValueError(f"`config.csr.k` must be at most `config.csr.hidden` ({c.hidden}), got {c.k}.")
    for key in ("multi_k_weight", "aux_weight", "contrastive_weight"):
      if not c[key] >= 0:
        raise ValueError(f"`config.csr.{key}` must be >= 0, got {c[key]}.")
    if not c.temperature > 0:
      raise ValueError(f"`config.csr.temperature` must be > 0, got {c.temperature}.")
    if c.backbone:
      mcl.stage_final_step(_paths.resolve(c.backbone), "config.csr.backbone")

  def build_model(self, config, text_side):
    return SparseCodingModel(base.build_encoder(config), int(config.csr.hidden), int(config.csr.k))

  def init_state(self, config, variables, key, num_ids):
    """{"steps_since_active": (H,) int32 zeros}: no latent has been idle yet."""
    hidden = variables["params"]["autoencoder"]["encoder"].shape[1]
    return {"steps_since_active": jnp.zeros((hidden,), jnp.int32)}

  def init_state_from_data(self, config, setup, state, earlier, embed):
    """A fresh run with `config.csr.backbone`: the encoder's parameters and batch statistics of that run's
    final checkpoint (`mcl.load_stage_variables` on the encoder's subtree), in place of the random ones."""
    if not config.csr.backbone:
      return state
    parts = {"params": state.params, "batch_stats": state.batch_stats}
    target = {name: {BACKBONE: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                            tree[BACKBONE])}
              for name, tree in parts.items() if BACKBONE in tree}
    restored = mcl.load_stage_variables(_paths.resolve(config.csr.backbone), target, key="config.csr.backbone",
                                        why="the backbone run must use this run's `config.model`")
    return state.replace(
        params={**state.params, BACKBONE: restored["params"][BACKBONE]},
        batch_stats={**state.batch_stats, **({BACKBONE: restored["batch_stats"][BACKBONE]}
                                             if "batch_stats" in restored else {})})

  def constrain_params(self, config, params, previous=None, step=None):
    """The backbone's parameters as the step started (frozen); the autoencoder's as updated."""
    if previous is None:
      return params
    return {**params, BACKBONE: previous[BACKBONE]}

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None, params=None):
    """`losses.csr(x, params["autoencoder"], positive=…, steps_since_active=…)` of the two views' frozen
    embeddings; the updated counters are the new method state."""
    c = config.csr
    x = outputs["projection"]  # (2, B, D)
    out = losses.csr(x[0], params["autoencoder"], k=int(c.k), positive=x[1],
                     steps_since_active=state["steps_since_active"], dead_threshold=int(c.dead_threshold),
                     multi_k=int(c.multi_k), multi_k_weight=c.multi_k_weight, aux_k=int(c.aux_k),
                     aux_weight=c.aux_weight, contrastive_weight=c.contrastive_weight, temperature=c.temperature,
                     **base.engine_options(config, mesh))
    return out.loss, {"steps_since_active": out.steps_since_active}, {}


base.register(CSR())
