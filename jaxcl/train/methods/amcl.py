"""AMCL: "Adaptive Multi-head Contrastive Learning" (Wang, Koniusz, Gedeon & Zheng, ECCV 2024).

Two views of each image, an encoder and H projection heads (`config.amcl.num_heads`), and the
pair-adaptive temperature network (`jaxcl.models.AMCLTemperature`, shared by the heads) as trained
parameters of the model; the loss is `losses.amcl` over the heads' embeddings with the network's
per-pair temperatures. As in the authors' code (LeiWangR/cl, `amcl/models.py` `SimCLR` and
`MultiHeadProjector`, `amcl/train.py`): 3 independent heads of one architecture (theirs: Linear(512) →
ReLU → Linear(128); here each head is the run's `config.model.projection_dims` / `config.model.norm`
head), the temperature network sees the L2-normalised head embeddings WITH their gradient (the loss
also trains the heads through the temperatures), and it is a submodule of the model: one optimizer,
one learning rate and weight decay for every parameter (theirs: SGD, lr 0.06, weight decay 5e-4).
Defaults of `config.amcl` are those of their SimCLR recipe: H = 3, β = 1e-4, top-k = 100,
τ ∈ [1e-5, 2], hidden width 128.

The model runs per example: each view's "projection" is its H head embeddings side by side (B, H·E),
and "temperature_embedding" φ of each (B, H·E); the loss forms the (H, 2B, 2B) temperatures
(`models.amcl_pair_temperatures`). The evaluation's kNN / linear probe read the encoder's features;
its alignment / uniformity and the logged in-batch accuracy read the H heads side by side.

`amcl` is dense only (each pair has its own temperature from a non-linear network): on a multi-device
mesh GSPMD partitions it (`base.check_loss_impl` rejects the sharded engines), and it takes no engine
(`config.loss.impl` must stay "auto").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl import models
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.train.methods import base


def amcl_section() -> ml_collections.ConfigDict:
  """`config.amcl`: the authors' SimCLR recipe (LeiWangR/cl `amcl/train.py`, `runs/cifar10_simclr_amcl`)."""
  c = ml_collections.ConfigDict()
  c.num_heads = 3  # H projection heads
  c.beta = 1e-4  # β, weight of the temperature regulariser
  c.top_k = 100  # the k hardest negatives per anchor (capped at 2B − 2); 0: the log-sum-exp form
  c.tau_min = 1e-5
  c.tau_max = 2.0
  c.hidden_dim = 128  # hidden width of the temperature network φ (D → hidden → D)
  return c


class MultiHeadImageModel(nn.Module):
  """encoder → H projection heads → the temperature network's φ of each head's embedding.

  Outputs "features" (B, F), "projection" (B, H·E): the heads' embeddings side by side (head h in
  columns h·E … (h+1)·E − 1), and "temperature_embedding" (B, H·E): φ of each head's L2-normalised
  embedding (`models.AMCLTemperature.embed`, parameters under "temperature")."""

  encoder: nn.Module
  projection_dims: tuple[int, ...]
  num_heads: int
  temperature_hidden_dim: int
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    heads = [models.ProjectionHead(hidden_dims=tuple(self.projection_dims[:-1]), out_dim=self.projection_dims[-1],
                                   norm=self.norm, name=f"head{i}")(h, train=train) for i in range(self.num_heads)]
    z = jnp.stack(heads, axis=1)  # (B, H, E)
    phi = models.AMCLTemperature(hidden_dim=self.temperature_hidden_dim, name="temperature").embed(z)
    flat = lambda a: a.reshape(a.shape[0], -1)
    return {"features": h, "projection": flat(z), "temperature_embedding": flat(phi)}


def head_embeddings(config, outputs: dict) -> tuple[Any, Any]:
  """The (V, B, H, E) head embeddings and (V, B, H, E) temperature embeddings φ of the model's outputs."""
  split = lambda a: a.reshape(a.shape[:2] + (config.amcl.num_heads, -1))
  return split(outputs["projection"]), split(outputs["temperature_embedding"])


class AMCL(base.ViewsMethod):
  name = "amcl"
  loss_names = ("amcl",)

  def config_sections(self):
    return {"amcl": amcl_section()}

  def check(self, config):
    super().check(config)
    a = config.amcl
    if a.num_heads < 1:
      raise ValueError(f"`config.amcl.num_heads` must be >= 1, got {a.num_heads}.")
    if not a.beta >= 0:
      raise ValueError(f"`config.amcl.beta` must be >= 0, got {a.beta}.")
    if a.top_k < 0:
      raise ValueError(f"`config.amcl.top_k` must be >= 1 (the top-k form) or 0 (the log-sum-exp form), got {a.top_k}.")
    if not 0.0 < a.tau_min < a.tau_max:
      raise ValueError(f"`config.amcl.tau_min` and `config.amcl.tau_max` must satisfy 0 < tau_min < tau_max, got "
                       f"{a.tau_min} and {a.tau_max}.")
    if a.hidden_dim < 1:
      raise ValueError(f"`config.amcl.hidden_dim` must be >= 1, got {a.hidden_dim}.")
    if config.loss.impl not in ("auto",) + SHARDED_IMPLS:  # the sharded ones: `base.check_loss_impl`
      raise ValueError(f"`config.loss.impl` must be 'auto' for the loss 'amcl', which has no similarity engine (its "
                       f"per-pair temperatures need the dense (2B)² matrices; GSPMD partitions them), got "
                       f"{config.loss.impl!r}.")

  def build_model(self, config, text_side):
    m = config.model
    return MultiHeadImageModel(base.build_encoder(config), tuple(m.projection_dims), int(config.amcl.num_heads),
                               int(config.amcl.hidden_dim), norm=m.norm)

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    """`losses.amcl(z1, z2, τ)` with τ = `models.amcl_pair_temperatures(φ([z1; z2]))`."""
    a = config.amcl
    z, phi = head_embeddings(config, outputs)
    tau = models.amcl_pair_temperatures(jnp.concatenate([phi[0], phi[1]]), tau_min=a.tau_min, tau_max=a.tau_max)
    loss = losses.amcl(z[0], z[1], tau, beta=a.beta, top_k=int(a.top_k) or None)
    return loss, state, {}

  def positive_pairs(self, outputs, extras):
    return base.first_two_views(outputs["projection"])


base.register(AMCL())
