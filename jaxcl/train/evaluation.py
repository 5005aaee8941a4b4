"""The trainer's evaluation: the splits streamed through the model, kNN, linear probe, zero-shot,
alignment and uniformity (`evaluate`), and the baselines.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import eval as eval_lib
from jaxcl.data import augment, sources
from jaxcl.train import devices
from jaxcl.train.state import Setup


# ------------------------------------------------------------------------------------------ evaluation
def embed_images(config, setup: Setup, variables, images: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
  """Backbone features (and joint-space embeddings for image-text models) of `images`, in chunks."""
  f = _embed_fn(setup.model, setup.method.image_text)
  outs = []
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk]
    n = len(x)
    if n < chunk:  # pad to one compiled shape
      x = np.concatenate([x, np.zeros((chunk - n,) + x.shape[1:], x.dtype)])
    outs.append(jax.tree.map(lambda a: np.asarray(a[:n]), f(variables, jnp.asarray(x))))
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=8)
def _embed_fn(model, image_text: bool):
  """A jitted (variables, images) → embeddings function; variables are arguments, never baked in."""

  def f(variables, x):
    if image_text:
      return model.apply(variables, x, train=False, method="encode_image_features")
    out = model.apply(variables, x, train=False)
    return {"features": out["features"], "projection": out["projection"]}

  return jax.jit(f)


def stream_split(config, setup: Setup, split: str, fn) -> dict[str, jax.Array]:
  """`fn(images, rows, n)` over the split `split` streamed in global batches of `config.batch_size`
  (`sources.split_batches`: each process reads its share, put on the devices sharded along the batch
  axes), outputs concatenated: {key: (N, ...) jax.Array} of fn's row-wise outputs, plus "label" (N,).

  Only one batch of images is on the host at a time; what is kept are fn's outputs (the embeddings),
  on the devices. `rows` are the batch's rows in the split (N − 1 past its end), N its length.
  """
  mesh = setup.mesh if setup.mesh is not None else devices.make_mesh(config)
  n, batches = sources.split_batches(config.data, split, int(config.batch_size),
                                     process_index=jax.process_index(), process_count=jax.process_count())
  outs = []
  for host in batches:
    batch = devices.to_global({k: host[k] for k in ("image", "label", "row")}, mesh)
    outs.append(dict(fn(batch["image"], batch["row"], n), label=batch["label"]))
  return {k: jnp.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def eval_views(config, setup: Setup, n: int):
  """A jitted (images, rows) → (view 1, view 2) of the evaluation's alignment and uniformity: row i's
  views are those of `augment.make_views(jax.random.key(config.seed + 1), all n images, 2, setup.aug)`
  (per-example keys split over the whole split), computed a batch at a time."""
  params = augment.parse_aug_config(setup.aug)
  key = jax.random.key(config.seed + 1)

  def f(images, rows):
    per_example = lambda k: jax.random.split(k, n)[rows]
    return tuple(jax.vmap(augment.augment_image, in_axes=(0, 0, None))(per_example(k), images, params)
                 for k in jax.random.split(key, 2))

  return jax.jit(f)


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a global array on this host (gathered over the processes when they share it)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(config, setup: Setup, variables, earlier: tuple = ()) -> dict[str, Any]:
  """kNN / linear-probe accuracy of the backbone features, zero-shot accuracy (image-text) or alignment
  and uniformity (self-supervised), on `config.data.train_split` (reference) and `eval_split`.
  `earlier`: the variables of the models the method builds on (`Method.earlier_models`: MCL's earlier
  stages), whose features are concatenated in front of this
  model's (`knn_accuracy_this_stage` is this model's alone).

  Both splits are streamed (`stream_split`): every process reads its share a batch at a time, the
  batches are embedded sharded over the devices, and only the embeddings are kept (on the devices), so
  host memory does not grow with the split; kNN (query chunks against the sharded reference set) and
  the linear probe run on the devices. Also returns "_projection" (the test features) and "_labels"
  (the test labels) as NumPy arrays, for the plots.

  A method with an evaluation of its own (`Method.evaluate`: the sentence methods' pair retrieval)
  returns that instead.
  """
  own_evaluation = setup.method.evaluate(config, setup, variables)
  if own_evaluation is not None:
    return own_evaluation
  num_classes = setup.info.num_classes
  image_text = setup.method.image_text
  embed = _embed_fn(setup.model, image_text)

  def features(images) -> dict:
    out = embed(variables, images)
    keep = {"features": out["features"]}
    if image_text:
      keep["embedding"] = out["embedding"]
    if earlier:
      keep["own"] = out["features"]
      keep["features"] = jnp.concatenate([embed(v, images)["features"] for v in earlier] + [out["features"]], 1)
    return keep

  views_of = {}  # n → eval_views(config, setup, n): one compiled function for the whole split

  def test_fn(images, rows, n):
    keep = features(images)
    if not image_text:  # alignment / uniformity of the projections of two augmented views
      if n not in views_of:
        views_of[n] = eval_views(config, setup, n)
      views = views_of[n](images, rows)
      keep["view1"], keep["view2"] = (embed(variables, v)["projection"] for v in views)
    return keep

  tr = stream_split(config, setup, config.data.train_split, lambda images, rows, n: features(images))
  te = stream_split(config, setup, config.data.eval_split, test_fn)
  knn = dict(knn_k=config.eval.knn_k, knn_temperature=config.eval.knn_temperature)
  own = {}
  if earlier:
    own = eval_lib.evaluate_embeddings(tr["own"], tr["label"], te["own"], te["label"], num_classes=num_classes,
                                       linear_probe=False, **knn)
  result = eval_lib.evaluate_embeddings(
      tr["features"], tr["label"], te["features"], te["label"], num_classes=num_classes,
      linear_probe=config.eval.linear_probe, **knn)
  if own:
    result["knn_accuracy_this_stage"] = own["knn_accuracy"]
  if image_text:
    encode = functools.partial(setup.text.encode_for_eval, setup.model, variables)
    class_emb = eval_lib.class_embeddings(encode, setup.info.class_names, setup.text.templates)
    result["zero_shot_accuracy"] = float(eval_lib.zero_shot_accuracy(te["embedding"], class_emb, te["label"]))
  else:
    result.update(eval_lib.alignment_uniformity(te["view1"], te["view2"]))
  result = {k: float(v) for k, v in result.items()}
  result["_projection"] = host_array(te["features"])
  result["_labels"] = host_array(te["label"])
  return result


def baselines(config, setup: Setup, initial_variables) -> dict[str, dict[str, float]]:
  """The baseline rows of the results: the initial parameters evaluated as the trained ones, named by
  the method (`Method.initial_model_name`: "random_init", "pretrained"), and for image data the raw
  pixels (`raw_pixel_baseline`)."""
  initial = evaluate(config, setup, initial_variables)
  rows = {setup.method.initial_model_name(config): {k: v for k, v in initial.items() if not k.startswith("_")}}
  if setup.info.image_shape:
    rows["raw_pixels"] = raw_pixel_baseline(config, setup)
  return rows


def raw_pixel_baseline(config, setup: Setup) -> dict[str, float]:
  """kNN / linear-probe accuracy of the flattened pixels (the splits streamed as in `evaluate`)."""
  flat = lambda images, rows, n: {"features": images.reshape(images.shape[0], -1)}
  tr, te = (stream_split(config, setup, split, flat) for split in (config.data.train_split, config.data.eval_split))
  r = eval_lib.evaluate_embeddings(
      tr["features"], tr["label"], te["features"], te["label"],
      num_classes=setup.info.num_classes, knn_k=config.eval.knn_k, knn_temperature=config.eval.knn_temperature,
      linear_probe=config.eval.linear_probe)
  return {k: float(v) for k, v in r.items()}


def results_table(results: dict) -> str:
  """A Markdown table of the kNN, linear-probe and zero-shot accuracies (or the pair-retrieval recalls
  of the sentence methods) of the trained model and the baselines."""
  keys = [k for k in ("knn_accuracy", "linear_probe_accuracy", "zero_shot_accuracy", "summary_to_description_R@1",
                      "summary_to_description_R@5", "description_to_summary_R@1", "description_to_summary_R@5")
          if k in results]
  rows = [("trained", results)] + list(results.get("baselines", {}).items())
  lines = ["| encoder | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, r in rows:
    cells = [f"{r[k]:.4f}" if r.get(k) is not None else "n/a" for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
