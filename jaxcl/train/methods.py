"""Methods as configuration: which views, which model outputs and which loss.

A method is not a trainer. Each one is a loss over the outputs of one of two model shapes:
- `ImageModel` (encoder → projection → optional predictor): simclr, dcl, supcon, multiview (views of the
  same image), moco and byol (with an EMA target network), simsiam (stop-gradient);
- `jaxcl.models.DualEncoder` (image tower + text tower, learnable logit scale/bias): clip, siglip, and lit
  (the text tower is the locked pretrained MiniLM encoder whose embeddings arrive precomputed).

Losses with per-example state (`STATEFUL_LOSSES`: iSogCLR's per-example temperatures and moving-average
normalisers; the cluster of every example in a later stage of Multistage Contrastive Learning) keep it in
`TrainState.loss_state`, indexed by the batch's stable example id `batch["index"]`: `init_loss_state`
builds it and `stateful_loss` returns `(loss, new_loss_state)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl import models
from jaxcl import ops
from jaxcl.ops import pallas
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.train import mcl

SELF_SUPERVISED = ("simclr", "dcl", "supcon", "multiview", "moco", "byol", "simsiam")
IMAGE_TEXT = ("clip", "siglip", "lit")
METHODS = SELF_SUPERVISED + IMAGE_TEXT
WITH_TARGET_NETWORK = ("moco", "byol")
# Losses that carry per-example state between steps (config.loss.name -> the methods that accept it).
STATEFUL_LOSSES = {"isogclr": ("simclr",), mcl.LOSS_NAME: ("simclr",)}


class ImageModel(nn.Module):
  """encoder → projection head → (optional) prediction head."""

  encoder: nn.Module
  projection_dims: tuple[int, ...]
  predictor_dim: int = 0
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = models.ProjectionHead(
        hidden_dims=tuple(self.projection_dims[:-1]), out_dim=self.projection_dims[-1], norm=self.norm
    )(h, train=train)
    out = {"features": h, "projection": z}
    if self.predictor_dim:
      out["prediction"] = models.PredictionHead(
          hidden_dim=self.predictor_dim, out_dim=self.projection_dims[-1]
      )(z, train=train)
    return out


def check_method(config: ml_collections.ConfigDict) -> None:
  if config.method not in METHODS:
    raise ValueError(f"`config.method` must be one of {METHODS}, got {config.method!r}.")
  if config.method in ("simclr", "dcl", "supcon", "moco", "byol", "simsiam") and config.num_views != 2:
    raise ValueError(f"`config.num_views` must be 2 for method {config.method!r}, got {config.num_views}.")
  if config.method == "multiview" and config.num_views < 2:
    raise ValueError(f"`config.num_views` must be >= 2 for 'multiview', got {config.num_views}.")
  if config.loss.name in STATEFUL_LOSSES and config.method not in STATEFUL_LOSSES[config.loss.name]:
    raise ValueError(
        f"`config.loss.name={config.loss.name!r}` works with the methods {STATEFUL_LOSSES[config.loss.name]}, "
        f"not {config.method!r}.")
  names = loss_names(config)
  if config.loss.name not in names:
    raise ValueError(f"`config.loss.name` for method {config.method!r} must be one of {names}, got "
                     f"{config.loss.name!r}.")
  mcl.check_config(config)
  check_encoder(config)
  if config.method in ("byol", "simsiam") and not config.model.predictor_dim:
    raise ValueError(f"method {config.method!r} needs `config.model.predictor_dim` > 0 (a predictor).")
  impls = ("auto",) + ops.available_impls() + SHARDED_IMPLS
  if config.loss.impl not in impls:
    raise ValueError(f"`config.loss.impl` must be one of {impls}, got {config.loss.impl!r}.")
  if config.loss.impl in SHARDED_IMPLS and config.loss.name not in SHARDABLE_LOSSES:
    raise ValueError(
        f"`config.loss.impl={config.loss.impl!r}` (a sharded engine) works with the losses "
        f"{SHARDABLE_LOSSES}, not {config.loss.name!r}; use 'auto' (GSPMD partitions it).")
  loss_impl(config)  # config.loss.pallas


def loss_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The values `config.loss.name` may take with `config.method`: the losses the method's loss function
  (`self_supervised_loss`, `stateful_loss`, `image_text_loss`) dispatches to."""
  method = config.method
  stateful = tuple(name for name, accepted in STATEFUL_LOSSES.items() if method in accepted)
  if method in ("simclr", "dcl"):
    return tuple(_pairwise_losses(config)) + stateful
  if method == "multiview":
    return tuple(MULTIVIEW_LOSSES) + ("pairwise_nt_xent",)
  if method in IMAGE_TEXT:
    return IMAGE_TEXT_LOSSES
  return {"supcon": ("supcon",), "moco": ("infonce",), "byol": ("negative_cosine",),
          "simsiam": ("negative_cosine",)}[method]


def check_encoder(config: ml_collections.ConfigDict) -> None:
  """`config.model.encoder` names an image encoder of `jaxcl.models.build_model`."""
  names = tuple(n for n in models.model_names() if n != "text_transformer")
  try:
    encoder = models.build_model(config.model.encoder) if isinstance(config.model.encoder, str) else None
  except (ValueError, TypeError):  # an unknown name; the text tower (it needs a vocabulary)
    encoder = None
  if encoder is None or isinstance(encoder, models.TextTransformer):
    raise ValueError(f"`config.model.encoder` must be one of {names} (an image encoder of "
                     f"jaxcl.models.build_model), got {config.model.encoder!r}.")
  if not isinstance(config.model.remat, bool):
    raise ValueError(f"`config.model.remat` must be True or False, got {config.model.remat!r}.")
  if config.model.remat and not hasattr(encoder, "remat"):
    raise ValueError(f"`config.model.remat` = True needs an encoder made of blocks (resnet*, vit*), got "
                     f"`config.model.encoder` = {config.model.encoder!r}: set it False.")


def build_model(config: ml_collections.ConfigDict, text_side: Any = None) -> nn.Module:
  """The model of `config.method`; image–text methods need the text side (vocabulary or locked tower)."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  options = {"dtype": dtype, **({"remat": True} if m.remat else {})}
  if m.encoder.startswith("resnet"):
    options.update(width=m.width, small_image=m.small_image, norm=m.norm)
  encoder = models.build_model(m.encoder, **options)
  if config.method in SELF_SUPERVISED:
    return ImageModel(encoder, tuple(m.projection_dims), m.predictor_dim, norm=m.norm)
  bias = config.loss.logit_bias_init if config.loss.name == "siglip" else None
  scale_init = math.log(config.loss.logit_scale_init)  # the model learns log(scale), CLIP-style
  if config.method == "lit":
    return models.DualEncoder(encoder, None, text_side.embed_dim, scale_init, bias, max_logit_scale=100.0)
  text = models.build_model(
      m.text_encoder, vocab_size=text_side.vocab_size, width=m.text_width, depth=m.text_depth,
      heads=m.text_heads, max_len=m.text_max_len, dtype=dtype, remat=m.remat,
  )
  return models.DualEncoder(encoder, text, m.embed_dim, scale_init, bias, max_logit_scale=100.0)


def loss_impl(config: ml_collections.ConfigDict):
  """The `impl=` of the losses: `config.loss.impl`, or for "pallas" with `config.loss.pallas` fields
  set (not None), the pallas engine with those settings (`jaxcl.ops.pallas.Settings`, the other fields
  from the process default). The fields apply only to the pallas engine: set with another impl, they
  are an error.

  >>> from jaxcl.train import config as config_lib
  >>> c = config_lib.base_config()
  >>> c.loss.impl, c.loss.pallas.block_rows = "pallas", 256
  >>> loss_impl(c).block_rows
  256
  """
  fields = {name: value for name, value in config.loss.pallas.items() if value is not None}
  if not fields:
    return config.loss.impl
  if config.loss.impl != "pallas":
    raise ValueError(
        f"`config.loss.pallas` ({', '.join(f'{k}={v!r}' for k, v in fields.items())}) sets the pallas "
        f"engine's settings, which need `config.loss.impl='pallas'`; got {config.loss.impl!r}.")
  return pallas.DEFAULT.replace(where="config.loss.pallas.", **fields)


def _engine(config, mesh, shardable: bool | None = None) -> dict:
  """The `impl=` keyword of the losses, plus the mesh and its axes (the batch is split over every mesh
  axis) for the sharded engines: "allgather" / "ring", and "auto" when the mesh has more than one
  device and the loss has a sharded form (`shardable`; default: `config.loss.name` is in
  `SHARDABLE_LOSSES`), so that no device builds the global (B, B) similarity matrix."""
  impl = loss_impl(config)
  if shardable is None:
    shardable = config.loss.name in SHARDABLE_LOSSES
  if impl == "auto" and shardable and mesh is not None and mesh.size > 1:
    return {"impl": impl, "axis_name": tuple(mesh.axis_names), "mesh": mesh}
  if impl not in SHARDED_IMPLS:
    return {"impl": impl}
  if mesh is None:
    raise ValueError(f"`config.loss.impl={impl!r}` splits the loss over the device mesh, but no mesh was given.")
  return {"impl": impl, "axis_name": tuple(mesh.axis_names), "mesh": mesh}


def _pairwise_losses(config) -> dict:
  """Two-view losses of the simclr/dcl methods: name -> f(z1, z2, temperature, impl options)."""
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


MULTIVIEW_LOSSES = {"multiview_infonce": losses.multiview_infonce, "mv_dhel": losses.mv_dhel}  # + pairwise_nt_xent
IMAGE_TEXT_LOSSES = ("clip", "siglip")

SHARDABLE_LOSSES = ("nt_xent", "dcl", "dclw", "supcon", "infonce", "clip", "siglip", "macl", "hn_nce",
                    mcl.LOSS_NAME)


def self_supervised_loss(config, online: dict, target: dict | None, labels, queue, *, mesh=None) -> jax.Array:
  """The loss of a multi-view method. `online`/`target` hold (V, B, E) projections (and predictions);
  `mesh` is needed by the sharded engines."""
  name, t = config.loss.name, config.loss.temperature
  engine = _engine(config, mesh)
  impl = engine["impl"]
  z = online["projection"]
  method = config.method
  if method in ("simclr", "dcl"):
    table = _pairwise_losses(config)
    if name not in table:
      raise ValueError(f"`config.loss.name` for {method!r} must be one of {tuple(table)}, got {name!r}.")
    return table[name](z[0], z[1], t, engine)
  if method == "supcon":
    return losses.supcon(jnp.swapaxes(z, 0, 1), labels, temperature=t, **engine)
  if method == "multiview":
    table = MULTIVIEW_LOSSES
    if name == "pairwise_nt_xent":  # average of NT-Xent over all view pairs
      v = z.shape[0]
      pairs = [(i, j) for i in range(v) for j in range(i + 1, v)]
      return sum(losses.nt_xent(z[i], z[j], temperature=t, impl=impl) for i, j in pairs) / len(pairs)
    if name not in table:
      raise ValueError(
          f"`config.loss.name` for 'multiview' must be one of {tuple(table) + ('pairwise_nt_xent',)}, got {name!r}."
      )
    return table[name](z, temperature=t, impl=impl)
  if method == "moco":
    q = online.get("prediction", z)
    k = jax.lax.stop_gradient(target["projection"])
    if config.momentum.queue_size:  # MoCo v2: the queue holds the negatives
      neg = jax.lax.stop_gradient(queue)
      return 0.5 * (
          losses.infonce(q[0], k[1], temperature=t, negatives=neg, in_batch_negatives=False, **engine)
          + losses.infonce(q[1], k[0], temperature=t, negatives=neg, in_batch_negatives=False, **engine)
      )
    return 0.5 * (  # MoCo v3: symmetric, in-batch negatives
        losses.infonce(q[0], k[1], temperature=t, **engine)
        + losses.infonce(q[1], k[0], temperature=t, **engine)
    )
  if method == "byol":
    p, k = online["prediction"], target["projection"]
    return losses.negative_cosine(p[0], k[1]) + losses.negative_cosine(p[1], k[0])
  if method == "simsiam":
    p = online["prediction"]
    return 0.5 * (losses.negative_cosine(p[0], z[1]) + losses.negative_cosine(p[1], z[0]))
  raise ValueError(f"not a multi-view method: {method!r}")


def has_loss_state(config) -> bool:
  """Whether `config.loss.name` keeps per-example state in `TrainState.loss_state`."""
  return config.loss.name in STATEFUL_LOSSES and config.method in STATEFUL_LOSSES[config.loss.name]


def init_loss_state(config, num_ids: int) -> Any:
  """The initial per-example loss state for example ids in [0, num_ids); {} for stateless losses.

  iSogCLR: `losses.isogclr_state(num_ids, tau_init=config.loss.isogclr_tau_init)` (u = 0, τ = τ₀).
  MCL: {"cluster_ids": zeros}; the loop fills in the clusters of the earlier stages (`mcl.cluster_ids`).
  """
  if not has_loss_state(config):
    return {}
  if config.loss.name == mcl.LOSS_NAME:
    return mcl.init_state(int(num_ids))
  return losses.isogclr_state(int(num_ids), tau_init=config.loss.isogclr_tau_init)


def stateful_loss(config, online: dict, ids, state, *, mesh=None) -> tuple[jax.Array, Any]:
  """(loss, new_state) of a loss in `STATEFUL_LOSSES`; `ids` (B,) are the batch's stable example ids.

  iSogCLR ("Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic
  Temperature Individualization", Qiu et al., 2023) on the two views of simclr, with the
  `config.loss.isogclr_*` hyper-parameters. Under gradient accumulation (`config.grad_accum_steps` > 1)
  the state is updated at every micro-step (each micro-batch is its own iSogCLR step).
  MCL (`mcl.loss`): negatives restricted to the anchor's cluster; the state does not change.
  """
  if config.loss.name == mcl.LOSS_NAME:
    return mcl.loss(config, online, ids, state, **_engine(config, mesh)), state
  # iSogCLR: single-device engines only (check_method rejects the sharded ones for it)
  if config.loss.name != "isogclr":
    raise ValueError(f"`config.loss.name` {config.loss.name!r} has no per-example state.")
  z = online["projection"]
  c = config.loss
  out = losses.isogclr(
      z[0], z[1], ids, state, gamma=c.isogclr_gamma, rho=c.isogclr_rho, eta=c.isogclr_eta,
      beta=c.isogclr_beta, tau_min=c.isogclr_tau_min, tau_max=c.isogclr_tau_max, impl=loss_impl(config))
  return out.loss, out.state


def image_text_loss(config, out: dict, *, mesh=None) -> jax.Array:
  name, engine = config.loss.name, _engine(config, mesh)
  if name == "clip":
    return losses.clip(out["image"], out["text"], logit_scale=out["logit_scale"], **engine)
  if name == "siglip":
    return losses.siglip(
        out["image"], out["text"], logit_scale=out["logit_scale"], logit_bias=out["logit_bias"], **engine
    )
  raise ValueError(f"`config.loss.name` for {config.method!r} must be 'clip' or 'siglip', got {name!r}.")


def in_batch_accuracy(config, out: dict, target: dict | None = None, *, mesh=None) -> dict:
  """In-batch top-1 retrieval accuracy (`losses.retrieval_accuracy`, both directions, no gradient) for
  the methods whose positives lie on the diagonal: image → text and back for the image-text methods,
  view 1 → view 2 and back for simclr / dcl (of the projections) and moco (queries against the other
  view's keys). `out`: the model outputs (image-text) or the online (V, B, E) outputs; {} for other
  methods."""
  if config.method in IMAGE_TEXT:
    a, b, names = out["image"], out["text"], ("accuracy_image_to_text", "accuracy_text_to_image")
  elif config.method in ("simclr", "dcl"):
    a, b, names = out["projection"][0], out["projection"][1], ("accuracy_view1_to_view2", "accuracy_view2_to_view1")
  elif config.method == "moco":
    a, b = out.get("prediction", out["projection"])[0], target["projection"][1]
    names = ("accuracy_view1_to_view2", "accuracy_view2_to_view1")
  else:
    return {}
  engine = _engine(config, mesh, shardable=True)  # retrieval_accuracy has a sharded form for any loss
  return dict(zip(names, losses.retrieval_accuracy(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b), **engine)))


def ema(target: Any, online: Any, decay: float) -> Any:
  """target ← decay · target + (1 − decay) · online."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)
