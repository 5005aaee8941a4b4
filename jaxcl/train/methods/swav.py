"""SwAV: "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (Caron et al.,
NeurIPS 2020).

The `ImageModel` scores each view's L2-normalised projection against K learned prototypes (the columns
of a bias-free Dense layer named "prototypes"); each of the first two views' scores give Sinkhorn-Knopp
codes over the global batch, which the other views predict (`losses.swav`). As in the authors'
`main_swav.py`: the prototypes are renormalised to unit length before every step (here: at
initialisation and after every optimizer update, `constrain_params`), and held fixed over the first
`config.swav.freeze_prototypes_steps` train steps (micro-steps under gradient accumulation): their
gradient is zero (`constrain_grads`: the optimizer's state for them does not move, as with the authors'
`p.grad = None`) and their value is the step's starting one (weight decay does not move them either). Multi-crop
(`config.swav.small_crops`): small views of another image size, run through the model as a second view
group (`view_groups`; the encoder's BatchNorm normalises each group by its own statistics, as the
authors' per-resolution forward passes do, and so does the projection head here, which the authors run
on the concatenated groups).

The queue (`config.swav.queue_size` = Q > 0; the authors' `--queue_length`, for small batches): the
L2-normalised projections of the assigned views (the first two) of the last Q / B batches,
`method_state["queue"]` (2, Q, E), written first in, first out after each step's loss from step
`config.swav.queue_start_step` on (the authors' `--epoch_queue_starts`). Once it is full, its scores
against the step's prototypes join the batch's in the Sinkhorn-Knopp (`losses.swav`'s `queue_scores`; only
the batch's codes are kept), as in `main_swav.py` (the loss reads the prototypes from the parameters,
`Method.loss_reads_params`; the queue's scores carry no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl.train.methods import base


def swav_section() -> ml_collections.ConfigDict:
  """`config.swav`: prototypes and the Sinkhorn-Knopp codes (the authors' ImageNet defaults)."""
  c = ml_collections.ConfigDict()
  c.num_prototypes = 3000  # K
  c.epsilon = 0.05  # ε of the codes' entropic regularisation
  c.sinkhorn_iterations = 3
  c.freeze_prototypes_steps = 313  # the prototypes stay fixed over the first steps (about one epoch)
  # Multi-crop: besides the config.num_views = 2 views of the run's augmentation, `small_crops` views
  # cropped from `small_crop_scale` of the area and resized to small_crop_size² (SwAV: 6 of 96² from
  # 5-14 %, next to 2 of 224² from 14-100 %). They predict the codes of the two large views.
  c.small_crops = 0
  c.small_crop_size = 96
  c.small_crop_scale = (0.05, 0.14)
  # The queue of the assigned views' earlier embeddings (0: off; else a multiple of the batch size; the
  # authors use 3840 with batches of 256), filled from `queue_start_step` on and used once full.
  c.queue_size = 0
  c.queue_start_step = 0
  return c


ASSIGNED_VIEWS = (0, 1)  # the views whose codes are targets: the two large crops


def _unit_columns(kernel: jax.Array) -> jax.Array:
  """Each prototype (a column of the (E, K) kernel) scaled to unit length."""
  return kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)


class SwAV(base.ViewsMethod):
  name = "swav"
  loss_names = ("swav",)
  loss_reads_params = True  # the queue's scores against the prototypes

  def config_sections(self):
    return {"swav": swav_section()}

  def check(self, config):
    super().check(config)
    s = config.swav
    if s.num_prototypes < 2:
      raise ValueError(f"`config.swav.num_prototypes` must be >= 2, got {s.num_prototypes}.")
    if not s.epsilon > 0:
      raise ValueError(f"`config.swav.epsilon` must be > 0, got {s.epsilon}.")
    if s.sinkhorn_iterations < 1:
      raise ValueError(f"`config.swav.sinkhorn_iterations` must be >= 1, got {s.sinkhorn_iterations}.")
    if s.freeze_prototypes_steps < 0:
      raise ValueError(f"`config.swav.freeze_prototypes_steps` must be >= 0, got {s.freeze_prototypes_steps}.")
    if s.small_crops < 0 or s.small_crop_size < 1:
      raise ValueError(f"`config.swav.small_crops` must be >= 0 and `config.swav.small_crop_size` >= 1, got "
                       f"{s.small_crops} and {s.small_crop_size}.")
    base.check_queue_size("config.swav.queue_size", s.queue_size, config.batch_size, allow_zero=True)
    if s.queue_start_step < 0:
      raise ValueError(f"`config.swav.queue_start_step` must be >= 0, got {s.queue_start_step}.")
    if s.small_crops and not config.model.encoder.startswith("resnet"):
      raise ValueError(f"`config.swav.small_crops` > 0 (views of another image size) needs a convolutional "
                       f"encoder (`config.model.encoder` 'resnet*'), got {config.model.encoder!r}.")

  def grad_cache_conflict(self, config):
    return "multi-crop views (`config.swav.small_crops` > 0)" if config.swav.small_crops else None

  def init_state(self, config, variables, key, num_ids):
    """With a queue: {"queue": zeros (2, Q, E), "queue_rows": 0 (rows written, at most Q), "queue_ptr": 0,
    "queue_wait": `config.swav.queue_start_step` (steps left before the first write)}; {} without."""
    size = config.swav.queue_size
    if not size:
      return {}
    embed_dim = variables["params"]["prototypes"]["kernel"].shape[0]
    return {"queue": jnp.zeros((len(ASSIGNED_VIEWS), size, embed_dim), jnp.float32),
            "queue_rows": jnp.zeros((), jnp.int32), "queue_ptr": jnp.zeros((), jnp.int32),
            "queue_wait": jnp.asarray(config.swav.queue_start_step, jnp.int32)}

  def view_groups(self, config, aug):
    large = ((config.num_views, aug),)
    s = config.swav
    if not s.small_crops:
      return large
    small = {**dict(aug), "crop_scale": tuple(s.small_crop_scale), "output_size": int(s.small_crop_size)}
    return large + ((s.small_crops, small),)

  def build_model(self, config, text_side):
    m = config.model
    return base.ImageModel(base.build_encoder(config), tuple(m.projection_dims), m.predictor_dim, norm=m.norm,
                           num_prototypes=config.swav.num_prototypes)

  def constrain_grads(self, config, grads, step):
    frozen = step < config.swav.freeze_prototypes_steps
    kernel = grads["prototypes"]["kernel"]
    return {**grads, "prototypes": {**grads["prototypes"], "kernel": jnp.where(frozen, 0.0, kernel).astype(kernel.dtype)}}

  def constrain_params(self, config, params, previous=None, step=None):
    kernel = _unit_columns(params["prototypes"]["kernel"])
    if previous is not None:  # frozen: the step's starting prototypes, unit-norm already
      kernel = jnp.where(step < config.swav.freeze_prototypes_steps, previous["prototypes"]["kernel"], kernel)
    return {**params, "prototypes": {**params["prototypes"], "kernel": kernel}}

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None, params=None):
    scores = jnp.swapaxes(outputs["prototype_scores"], 0, 1)  # (V, B, K) -> (B, V, K)
    s = config.swav
    swav = lambda queue_scores=None: losses.swav(  # noqa: E731
        scores, temperature=config.loss.temperature, epsilon=s.epsilon, iterations=s.sinkhorn_iterations,
        assign_views=ASSIGNED_VIEWS, queue_scores=queue_scores)
    if not s.queue_size:
      return swav(), state, {}
    return queue_loss_and_state(swav, outputs["projection"], params["prototypes"]["kernel"], state)

  def positive_pairs(self, outputs, extras):
    return base.first_two_views(outputs["projection"])


def queue_loss_and_state(swav, projection: jax.Array, prototypes: jax.Array, state: dict) -> tuple[jax.Array, dict, dict]:
  """The loss `swav(queue_scores)` with the queue's scores <queue row, prototype> (Q, 2, K; `prototypes`
  the (E, K) kernel, no gradient through these scores) once the queue is full, `swav()` before; and the
  state with this batch's L2-normalised assigned-view projections (from `projection`, (V, B, E)) written
  into the queue once `queue_wait` steps have passed (a step whose update is not finite keeps the whole
  state, this count too). The queue is written after the loss: a batch is never in its own queue."""
  queue = jax.lax.stop_gradient(state["queue"])
  queue_scores = lambda: jnp.einsum("aqe,ek->qak", queue, jax.lax.stop_gradient(prototypes))  # noqa: E731
  full = state["queue_rows"] >= queue.shape[1]
  loss = jax.lax.cond(full, lambda: swav(queue_scores()), lambda: swav())  # the scores only once it is full
  rows = jax.lax.stop_gradient(losses.l2_normalize(projection[jnp.asarray(ASSIGNED_VIEWS)]))  # (2, B, E)
  written, ptr = jax.vmap(base.fifo_enqueue, in_axes=(0, None, 0))(queue, state["queue_ptr"], rows)
  write = state["queue_wait"] <= 0
  new = {**state,
         "queue": jnp.where(write, written, queue),
         "queue_ptr": jnp.where(write, ptr[0], state["queue_ptr"]),
         "queue_rows": jnp.where(write, jnp.minimum(state["queue_rows"] + rows.shape[1], queue.shape[1]),
                                 state["queue_rows"]),
         "queue_wait": jnp.maximum(state["queue_wait"] - 1, 0)}
  return loss, new, {}


base.register(SwAV())
