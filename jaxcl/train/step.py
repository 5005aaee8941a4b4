"""One optimisation step of every method: `train_step`, and `jit_train_step` as the loop (and
`jaxcl.plan`) compiles it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import grad_cache
from jaxcl.data import augment
from jaxcl.train import devices
from jaxcl.train import finite as finite_lib
from jaxcl.train import methods, optim
from jaxcl.train.state import Setup, TrainState


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
  or uint8), decoded where the images are augmented (`decode_images`; per chunk under gradient caching).
  A text-only method's views are sentences instead: `batch["text"]` (B, V, L) token ids, no image.

  The model's dropout draws from `dropout_key(config.seed, step)` (one key per step, so a resumed run
  draws what the uninterrupted one did)."""
  model, method = setup.model, setup.method
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  examples = batch["text"] if method.text_only else batch["image"]  # what the views are made of
  b = examples.shape[0]
  dropout = dropout_key(config.seed, state.step)
  views = not method.image_text
  groups = method.view_groups(config, setup.aug) if views else ()  # ((count, augmentation), ...)
  v = sum(count for count, _ in groups)
  # Per-example augmentation keys: the views of example i are the same whether the batch is augmented
  # at once or a chunk at a time (gradient caching augments inside each chunk).
  keys = augment.example_keys(key, b, v if views else None)

  def model_inputs(examples, keys, *rest):
    """The model's inputs from raw images (augmented here) and the other fields of (a chunk of) the
    batch: a views method's (b·count, H, W, C) images of each view group; a text-only method's
    (b·V, L) token ids of its sentences, sample-major as the image views."""
    if method.text_only:
      return (examples.reshape((-1,) + examples.shape[2:]),)
    images = devices.decode_images(examples, setup.info.image_shape)
    if views:
      inputs, start = [], 0
      for count, aug in groups:
        augmented = augment.augment_examples(keys[:, start:start + count], images, aug)
        start += count
        # Sample-major (b, v) order: each device keeps its own samples' views, so the batch sharding
        # survives the merge (view-major would split no device-contiguous block and gather the batch).
        inputs.append(jnp.swapaxes(augmented, 0, 1).reshape((-1,) + augmented.shape[2:]))
      return tuple(inputs)
    return (augment.augment_examples(keys, images, setup.aug), *rest)

  raw = (examples, keys) if views else (examples, keys, batch["text"])

  def apply(params, batch_stats, *xs):
    """The model on the inputs: one call, or for a views method one call per view group (its batch
    statistics passed on from group to group) with the outputs concatenated along the examples."""
    run = lambda stats, *inputs: model.apply({"params": params, "batch_stats": stats}, *inputs, train=True,
                                             mutable=["batch_stats"], rngs={"dropout": dropout})
    if len(groups) <= 1:
      return run(batch_stats, *xs)
    outs = []
    for x in xs:
      out, mutated = run(batch_stats, x)
      batch_stats = mutated.get("batch_stats", batch_stats)
      outs.append(out)
    return {k: jnp.concatenate([o[k] for o in outs]) for k in outs[0]}, {"batch_stats": batch_stats}

  def by_view(out: dict) -> dict:
    """The model's outputs as the method's loss sees them: (V, B, ...) projections (and predictions,
    prototype scores, ...: `methods.VIEW_OUTPUTS`) of a views method, its view groups in order; an
    image-text model's as they are."""
    if not views:
      return out
    by_sample = lambda x, count: jnp.swapaxes(x.reshape((b, count) + x.shape[1:]), 0, 1)  # (b·c, ...) -> (c, b, ...)

    def split(x):  # (b·count_1 + b·count_2 + ..., ...) -> (v, b, ...)
      if len(groups) == 1:
        return by_sample(x, v)
      ends = np.cumsum([b * count for count, _ in groups])[:-1]
      return jnp.concatenate([by_sample(part, count) for part, (count, _) in zip(jnp.split(x, ends), groups)])
    return {k: split(out[k]) for k in methods.VIEW_OUTPUTS if k in out}

  def logged_only(metric):
    """metric() on the steps whose metrics the loop writes (every `config.log_every`-th and the last),
    zeros on the others: a metric-only pass over the batch is not paid at every step."""
    logged = ((state.step + 1) % config.log_every == 0) | (state.step + 1 == config.total_steps)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(metric))
    return jax.lax.cond(logged, metric, zeros)

  def loss_fn(params):
    inputs = model_inputs(*raw)
    out, mutated = apply(params, state.batch_stats, *inputs)

    def forward(params, batch_stats):
      """The model with other variables (a target network's) on this step's inputs, no gradient."""
      out, mutated = apply(params, batch_stats, *inputs)
      return by_view(out), mutated.get("batch_stats", {})

    return loss_of(out, mutated.get("batch_stats", {}), params, forward)

  def loss_of(out, batch_stats, params, forward=None):
    """The loss of the model's outputs `out` for the whole batch, with the logged aux: the new batch
    statistics and method state, and the in-batch accuracy. `params`: the parameters the outputs came
    from, which a method whose loss reads them gets (`Method.loss_reads_params`)."""
    outputs = by_view(out)
    reads = {"params": params} if method.loss_reads_params else {}
    loss, method_state, extras = method.loss(config, outputs, batch, state.method_state, mesh=setup.mesh,
                                             forward=forward, **reads)
    aux = {"batch_stats": batch_stats, "method_state": method_state}
    if "logit_scale" in out:
      aux["logit_scale"] = out["logit_scale"]
    aux["accuracy"] = logged_only(
        lambda: methods.in_batch_accuracy(config, method.positive_pairs(outputs, extras), mesh=setup.mesh))
    return loss, aux

  if config.grad_cache_chunks == 1:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    (loss, aux), grads = _cached_loss_and_grads(config, setup, state, raw, model_inputs, apply, loss_of)
  grads = method.constrain_grads(config, grads, state.step)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  grad_finite = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = method.constrain_params(config, optax.apply_updates(state.params, updates), state.params, state.step)
  # Gradient accumulation: whether this micro-step applied the optimizer update.
  updated = setup.tx.has_updated(opt_state) if isinstance(setup.tx, optax.MultiSteps) else True
  method_state = method.after_update(config, jax.lax.stop_gradient(aux["method_state"]), params, updated)
  new = state.replace(params=params, opt_state=opt_state, batch_stats=aux["batch_stats"],
                      method_state=method_state)
  state_finite = finite_lib.finite_parts(new)  # the update itself: no non-finite value enters the state
  finite = finite & jnp.all(jnp.stack(list(state_finite.values())))
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)  # kept whole when not finite
  new = new.replace(step=state.step + 1)
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "grad_finite": grad_finite,
             "state_finite": state_finite, "learning_rate": optim.learning_rate_at(config, state.step)}
  if "logit_scale" in aux:
    metrics["logit_scale"] = aux["logit_scale"]
  metrics.update(aux["accuracy"])  # in-batch top-1 retrieval, for methods with diagonal positives
  return new, metrics


# The stream of the dropout keys, apart from the augmentation keys (split from fold_in(key(seed), step)).
DROPOUT_STREAM = 0x44524F50  # "DROP"


def dropout_key(seed, step) -> jax.Array:
  """The model's dropout key of train step `step`: fold_in(fold_in(key(seed), DROPOUT_STREAM), step).

  A function of (seed, step) alone, so a resumed run draws the masks of the uninterrupted one."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)


def _cached_loss_and_grads(config, setup: Setup, state: TrainState, raw: tuple, model_inputs, apply, loss_of):
  """`jax.value_and_grad` of the step's loss by gradient caching (`jaxcl.grad_cache`), the model run on
  `config.grad_cache_chunks` chunks of each device's examples (`raw`: images, augmentation keys, text),
  each chunk augmented inside (`model_inputs`; the same views as the whole batch's, and only one
  chunk's augmented images alive): the per-example outputs (projections; image and text embeddings)
  of every chunk, the loss of the whole batch once (the learned logit scale and bias read from the
  parameters), each chunk's augmentation and forward again under vjp. BatchNorm normalises each chunk
  by its own statistics; the new running statistics are the average of the chunks' updates (the
  running mean as from the whole batch, the running variance from the within-chunk variances)."""
  per_example = methods.VIEW_OUTPUTS + ("image", "text")

  def embed(params, chunk):
    out, mutated = apply(params, state.batch_stats, *model_inputs(*chunk))
    return {k: out[k] for k in per_example if k in out}, mutated.get("batch_stats", {})

  def loss(params, outputs):
    out = dict(outputs)
    if setup.method.image_text:
      out["logit_scale"], out["logit_bias"] = setup.model.apply({"params": params}, method="scale_and_bias")
    return loss_of(out, {}, params)

  shards = 1 if setup.mesh is None else devices.batch_shards(setup.mesh)
  run = grad_cache.value_and_grad(embed, loss, chunks=int(config.grad_cache_chunks), shards=shards,
                                  has_aux=True, embed_has_aux=True, unroll=bool(config.grad_cache_unroll))
  (value, aux), grads = run(state.params, raw)
  loss_aux = dict(aux["loss"], batch_stats=jax.tree.map(lambda x: jnp.mean(x, axis=0), aux["embed"]))
  return (value, loss_aux), grads
