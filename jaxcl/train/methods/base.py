"""What a training method is (`Method`), the two model shapes methods share, and the loss engine options.

A method tells the one train step (`jaxcl.train.step`) what differs between SimCLR, MoCo, CLIP, ...:

- `image_text`: the model sees (image, caption) pairs (a `jaxcl.models.DualEncoder`), else `num_views`
  augmented views of each image (an `ImageModel`), or with `text_only` the token ids of `num_views`
  sentences per example (the batch's "text", (B, V, L); no image: `methods.sentence`);
- `build_model(config, text_side)` and `text_side(config, info)` (what turns captions into model inputs);
- `initial_params(config, text_side, params)`: the parameters training starts from (pretrained weights;
  the model's random init for most methods), and `initial_model_name(config)`, the name of the
  evaluation's baseline row for them ("random_init", "pretrained");
- `init_state(config, variables, key, num_ids)`: the method's own part of the train state
  (`TrainState.method_state`: an EMA target network, a queue of keys, per-example loss state; {} when
  it has none), laid out by `state_shardings(mesh, abstract)`;
- `loss(config, outputs, batch, state, *, mesh, forward) -> (loss, new_state, extras)`: the loss of the
  model's outputs for the batch; `forward(params, batch_stats)` runs the model on the step's inputs
  again (for a target network); with `loss_reads_params`, also `params=` (the model's parameters,
  differentiated: CSR's autoencoder weights);
- `after_update(config, state, params, updated)`: the method state once the optimizer has updated the
  parameters (EMA targets);
- `earlier_models` and `init_state_from_data`: trained models the method builds on (MCL's earlier
  stages: their features come first in the evaluation, and their clusters are a fresh run's state);
- `constrain_grads(config, grads, step)` and `constrain_params(config, params, previous, step)`: the
  gradients the optimizer gets and the parameters a step ends with, where a method holds some fixed or
  on a constraint set (SwAV's prototypes: frozen over the first steps, unit-norm after every update);
- `view_groups(config, aug)` (views methods): the views as groups of one image size, each run through
  the model once (SwAV's multi-crop small views);
- `evaluate(config, setup, variables)`: the method's own held-out evaluation (a results dict with
  "_projection" and "_labels" for the plots), or None for the trainer's (kNN, linear probe, zero-shot,
  alignment and uniformity of images);
- `positive_pairs(outputs, extras)`: the two (B, E) embeddings whose diagonal pairs are positives, for
  the logged in-batch retrieval accuracy (None: not logged);
- `config_sections()`: the method's own config sections (`config.momentum`, `config.isogclr`), merged
  into `base_config()`; `check(config)` and `grad_cache_conflict(config)`: its config checks.

A method is registered under its name (`jaxcl.train.methods.register`); `config.method` picks it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl import models
from jaxcl import ops
from jaxcl.ops import pallas
from jaxcl.data import sources
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.train import devices
from jaxcl.train import text

# The values of `config.loss.name` that have a sharded form (`impl="allgather" | "ring"`).
SHARDABLE_LOSSES = ("nt_xent", "dcl", "dclw", "supcon", "infonce", "clip", "siglip", "macl", "hn_nce",
                    "mcl_nt_xent", "nnclr", "multiview_infonce", "mv_dhel", "pairwise_nt_xent", "isogclr",
                    "isogclr_clip", "ce_clip", "csr", "gram", "simcse")


_REGISTRY: dict[str, "Method"] = {}


def register(method: "Method") -> "Method":
  """Makes `method` the one `config.method = method.name` selects (replacing one of the same name)."""
  if not method.name:
    raise ValueError(f"a method needs a name, got {method.name!r} ({type(method).__name__}).")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> "Method":
  """Removes the method registered as `name` and returns it (a ValueError if there is none)."""
  return _REGISTRY.pop(get(name).name)


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> "Method":
  """The method registered as `name`; a ValueError names `config.method` and the choices otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"`config.method` must be one of {names()}, got {name!r}.")
  return _REGISTRY[name]


def config_sections() -> dict[str, ml_collections.ConfigDict]:
  """{section name: its defaults} of every registered method (`Method.config_sections`), which
  `base_config()` merges in. Two methods may share a section only with the same defaults."""
  merged, owner = {}, {}
  for method in _REGISTRY.values():
    for name, section in method.config_sections().items():
      if name in merged and merged[name].to_dict() != section.to_dict():
        raise ValueError(f"methods {owner[name]!r} and {method.name!r} both declare `config.{name}`, with "
                         "different defaults.")
      merged.setdefault(name, section)
      owner.setdefault(name, method.name)
  return merged


def section_owners(name: str) -> tuple[str, ...]:
  """The registered methods that declare the config section `name`."""
  return tuple(m.name for m in _REGISTRY.values() if name in m.config_sections())


class Method:
  """A training method: a loss over the outputs of one of two model shapes, and the state it keeps.

  Subclass it, set `name` and `loss_names`, override what differs (see the module docstring), and
  `register` an instance. The defaults: no method state, no accuracy logged, every loss of `loss_names`.
  """

  name: ClassVar[str] = ""
  loss_names: ClassVar[tuple[str, ...]] = ()  # the values `config.loss.name` may take
  image_text: ClassVar[bool] = False
  # `loss` also gets `params=`, the model's parameters (CSR: the autoencoder's weights decode the codes).
  loss_reads_params: ClassVar[bool] = False
  text_only: ClassVar[bool] = False  # the views are sentences (token ids), not augmented images

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the config key when `config` does not suit the method."""
    if config.loss.name in self.loss_names:
      return
    others = tuple(n for n in names() if config.loss.name in get(n).loss_names)
    which = f", which works with the methods {others}" if others else ""
    raise ValueError(f"`config.loss.name` for method {self.name!r} must be one of {self.loss_names}, got "
                     f"{config.loss.name!r}{which}.")

  def config_sections(self) -> dict[str, ml_collections.ConfigDict]:
    """The method's own config sections, {name: defaults} (`config.<name>.<key>`); a fresh copy each call."""
    return {}

  def grad_cache_conflict(self, config: ml_collections.ConfigDict) -> str | None:
    """Why the method cannot run with gradient caching (`config.grad_cache_chunks` > 1), or None."""
    return None

  def text_side(self, config: ml_collections.ConfigDict, info: sources.SourceInfo) -> Any:
    """What prepares the batch's text for the model (`jaxcl.train.text`): nothing for image methods."""
    return text.NoText()

  def build_model(self, config: ml_collections.ConfigDict, text_side: Any) -> nn.Module:
    """The Flax model whose outputs `loss` takes (`text_side`: what `text_side` returned)."""
    raise NotImplementedError

  def initial_params(self, config: ml_collections.ConfigDict, text_side: Any, params: Any) -> Any:
    """The parameters training starts from, given the model's random init `params` (the same pytree
    structure): pretrained weights where the method fine-tunes them; `params` for most methods."""
    return params

  def initial_model_name(self, config: ml_collections.ConfigDict) -> str:
    """The name of the evaluation's baseline row for the initial parameters (`initial_params`)."""
    return "random_init"

  def evaluate(self, config, setup: Any, variables: dict) -> dict | None:
    """The method's own held-out evaluation of `variables` ({"params", "batch_stats"}): a results dict
    of floats plus "_projection" (N, F) and "_labels" (N,) or None, for the plots; None: the trainer's
    evaluation of image features (`jaxcl.train.evaluation.evaluate`)."""
    return None

  def init_state(self, config: ml_collections.ConfigDict, variables: dict, key: jax.Array, num_ids: int) -> Any:
    """The method's part of the train state; `variables` the model's initial {"params", "batch_stats"},
    `num_ids` the length of per-example state (example ids are in [0, num_ids))."""
    return {}

  def state_shardings(self, mesh: jax.sharding.Mesh, abstract: Any) -> Any:
    """How each array of the method state (`abstract`: its shapes) is laid out: as parameters are."""
    return jax.tree.map(lambda x: devices.param_sharding(mesh, x), abstract)

  def earlier_models(self, config, abstract: Any, shardings: Any) -> tuple:
    """The variables ({"params", "batch_stats"}) of trained models whose backbone features come before
    this model's in the evaluation (MCL: the earlier stages), restored with this run's structure
    (`abstract`, `shardings`: the train state's); () for most methods."""
    return ()

  def init_state_from_data(self, config, setup, state: Any, earlier: tuple, embed) -> Any:
    """A fresh run's initial state once the data and the `earlier` models are at hand (MCL: the
    clusters of the earlier stages' features of the train split); `embed(variables, images)` gives
    backbone features. The state as it is for most methods."""
    return state

  def loss(self, config, outputs: dict, batch: dict, state: Any, *, mesh=None, forward=None) -> tuple[jax.Array, Any, dict]:
    """(loss, new method state, extras for `positive_pairs`)."""
    raise NotImplementedError

  def after_update(self, config, state: Any, params: Any, updated: jax.Array) -> Any:
    """The method state after the optimizer step; `updated` is False on gradient-accumulation micro-steps."""
    return state

  def constrain_grads(self, config, grads: Any, step: jax.Array) -> Any:
    """The gradients the optimizer gets at `step` (a train step, a micro-step under gradient
    accumulation): where a method holds parameters fixed for a while (SwAV's prototypes: zero, so their
    optimizer state does not move either). The gradients as they are for most methods."""
    return grads

  def constrain_params(self, config, params: Any, previous: Any = None, step: jax.Array | None = None) -> Any:
    """The parameters the optimizer step at `step` ends with, from its update `params` and the step's
    starting parameters `previous`: where a method keeps parameters on a constraint set or holds some
    fixed for a while (SwAV: unit-norm prototypes, frozen over the first steps). Also applied to the
    initial parameters (`previous` and `step` None). The parameters as they are for most methods."""
    return params

  def positive_pairs(self, outputs: dict, extras: dict) -> tuple[jax.Array, jax.Array, tuple[str, str]] | None:
    """(a, b, (name a → b, name b → a)): two (B, E) embeddings whose row i are positives, for the logged
    in-batch top-1 accuracy (`in_batch_accuracy`); None: no accuracy is logged."""
    return None


# The per-example outputs of a views method's model that its `loss` sees, (V, B, ...) by view.
VIEW_OUTPUTS = ("projection", "prediction", "prototype_scores", "temperature_embedding")

VIEW_ACCURACY_NAMES = ("accuracy_view1_to_view2", "accuracy_view2_to_view1")


def first_two_views(z: jax.Array) -> tuple[jax.Array, jax.Array, tuple[str, str]]:
  """`positive_pairs` of (V, B, E) view embeddings: view 1 and view 2, row by row."""
  return z[0], z[1], VIEW_ACCURACY_NAMES


# The iSogCLR losses keep log u = −inf for an example never seen; the train state holds only finite
# values (a step that would write a non-finite value is not applied, a checkpoint holding one is not
# restored), so it stores this number instead. A seen example's log u is at least −2/τ − log n > −3e30
# for any temperature the losses accept (τ >= 2^-100): far above it.
UNSEEN_LOG_U = float(jnp.finfo(jnp.float32).min)


def stored_log_u(state: Any, fields: tuple[str, ...]) -> Any:
  """`state` (a NamedTuple) as the train state keeps it: its log-u `fields` with −inf stored as
  `UNSEEN_LOG_U`."""
  return state._replace(**{f: jnp.where(jnp.isneginf(getattr(state, f)), UNSEEN_LOG_U, getattr(state, f))
                           for f in fields})


def loss_log_u(stored: Any, fields: tuple[str, ...]) -> Any:
  """The inverse of `stored_log_u`: the state the loss takes (`UNSEEN_LOG_U` back to −inf)."""
  return stored._replace(**{f: jnp.where(getattr(stored, f) <= UNSEEN_LOG_U, -jnp.inf, getattr(stored, f))
                            for f in fields})


def check_queue_size(key: str, size: int, batch_size: int, *, allow_zero: bool) -> None:
  """A queue written a whole batch at a time (`fifo_enqueue`) holds a positive multiple of the batch
  size rows (or is off, 0, when `allow_zero`); the ValueError names the config key."""
  if (size == 0 and allow_zero) or (size > 0 and size % batch_size == 0):
    return
  what = "0 or a positive multiple" if allow_zero else "a positive multiple"
  raise ValueError(f"`{key}` must be {what} of the batch size {batch_size}, got {size} (each step writes "
                   "a whole batch).")


def fifo_enqueue(queue: jax.Array, ptr: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A first-in first-out queue of embeddings (a MoCo queue, an NNCLR support set): `rows` (n, E) written
  over the oldest n entries of `queue` (Q, E) at `ptr`, and the next pointer (ptr + n) mod Q. Q must be
  a multiple of n (the methods check it), so a write never wraps."""
  queue = jax.lax.dynamic_update_slice(queue, rows.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + rows.shape[0]) % queue.shape[0]


class ImageModel(nn.Module):
  """encoder → projection head → (optional) prediction head and prototype scores."""

  encoder: nn.Module
  projection_dims: tuple[int, ...]
  predictor_dim: int = 0
  norm: str = "batch"
  num_prototypes: int = 0  # > 0: "prototype_scores" <ẑ, c_k> against K learned prototypes (SwAV)

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
    if self.num_prototypes:  # a bias-free Dense whose (E, K) kernel columns are the prototypes
      out["prototype_scores"] = nn.Dense(self.num_prototypes, use_bias=False, name="prototypes")(
          losses.l2_normalize(z))
    return out


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module:
  """The image encoder `config.model.encoder` with the model settings of `config.model`."""
  m = config.model
  options = {"dtype": jnp.dtype(m.dtype), **({"remat": True} if m.remat else {})}
  if m.encoder.startswith("resnet"):
    options.update(width=m.width, small_image=m.small_image, norm=m.norm)
  return models.build_model(m.encoder, **options)


class ViewsMethod(Method):
  """A method over `num_views` augmented views of each image and an `ImageModel`; `outputs` of `loss` are
  the model's (V, B, E) "projection" (and "prediction" with a predictor head)."""

  num_views: ClassVar[int | None] = 2  # None: any number >= 2 (`config.num_views`)
  needs_predictor: ClassVar[bool] = False

  def check(self, config):
    super().check(config)
    if self.num_views is not None and config.num_views != self.num_views:
      raise ValueError(f"`config.num_views` must be {self.num_views} for method {self.name!r}, got "
                       f"{config.num_views}.")
    if self.num_views is None and config.num_views < 2:
      raise ValueError(f"`config.num_views` must be >= 2 for {self.name!r}, got {config.num_views}.")
    if self.needs_predictor and not config.model.predictor_dim:
      raise ValueError(f"method {self.name!r} needs `config.model.predictor_dim` > 0 (a predictor).")

  def build_model(self, config, text_side):
    m = config.model
    return ImageModel(build_encoder(config), tuple(m.projection_dims), m.predictor_dim, norm=m.norm)

  def view_groups(self, config, aug) -> tuple[tuple[int, Any], ...]:
    """The views of each example as groups of one image shape, ((count, augmentation config), ...); the
    model runs once per group and `loss` sees the groups' views in this order along V. Default: one
    group of `config.num_views` views of the run's augmentation `aug`. (SwAV's multi-crop adds a group
    of small crops.)"""
    return ((config.num_views, aug),)


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


def check_loss_impl(config: ml_collections.ConfigDict) -> None:
  """`config.loss.impl` names an engine, a sharded one only for a loss with a sharded form, and
  `config.loss.pallas` settings only with the pallas engine."""
  impls = ("auto",) + ops.available_impls() + SHARDED_IMPLS
  if config.loss.impl not in impls:
    raise ValueError(f"`config.loss.impl` must be one of {impls}, got {config.loss.impl!r}.")
  if config.loss.impl in SHARDED_IMPLS and config.loss.name not in SHARDABLE_LOSSES:
    raise ValueError(
        f"`config.loss.impl={config.loss.impl!r}` (a sharded engine) works with the losses "
        f"{SHARDABLE_LOSSES}, not {config.loss.name!r}; use 'auto' (GSPMD partitions it).")
  loss_impl(config)


def engine_options(config: ml_collections.ConfigDict, mesh, shardable: bool | None = None) -> dict:
  """The engine keyword arguments of the losses: `impl=`, plus `axis_name=` and `mesh=` (the batch is
  split over every mesh axis) for the sharded engines: "allgather" / "ring", and "auto" when the mesh
  has more than one device and the loss has a sharded form (`shardable`; default: `config.loss.name`
  is in `SHARDABLE_LOSSES`), so that no device builds the global (B, B) similarity matrix."""
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


def in_batch_accuracy(config, pairs, *, mesh=None) -> dict:
  """{names[0]: top-1 a → b, names[1]: b → a} of `pairs` = (a, b, names) (`losses.retrieval_accuracy`,
  no gradient); {} for None."""
  if pairs is None:
    return {}
  a, b, names = pairs
  engine = engine_options(config, mesh, shardable=True)  # retrieval_accuracy has a sharded form for any loss
  return dict(zip(names, losses.retrieval_accuracy(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b), **engine)))
