"""The Multistage Contrastive Learning recipe: one training run per stage, each learning what the
earlier stages did not.

"Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
2024). Stage 1 is an ordinary SimCLR run (`config.loss.name = "nt_xent"`). Stage t > 1 is a SimCLR run
with `config.loss.name = "mcl_nt_xent"` and `config.mcl.previous_stages = "w_1,...,w_{t-1}"`, the
work directories of the earlier stages (same `config.model`). When stage t starts from scratch:

1. every earlier stage's final model embeds the train split (backbone features, with the example ids),
   streamed `FEATURE_BATCH` examples at a time (`split_features`), so only the features stay in memory;
   an earlier stage must have finished (`stage_final_step`: its results.json is of its newest checkpoint);
2. each stage's features are clustered by k-means into `config.mcl.num_clusters` clusters
   (spherical: cosine similarity, `losses.subclass_kmeans` with one class; `config.mcl.kmeans_iters`
   Lloyd steps, Forgy init from `config.seed`);
3. the clusterings are combined, `losses.mcl_cluster_ids` (two examples share a cluster iff they do in
   every earlier stage), and kept per example id in `TrainState.method_state["cluster_ids"]`, so a resumed
   run uses the same clusters;
4. the loss is `losses.mcl_nt_xent`: an anchor's negatives are the batch examples of its own cluster,
   which the earlier stages' features cannot tell apart, so the new model must find other features.

The evaluation of stage t uses the concatenation of the backbone features of stages 1..t (the paper's
final representation) for `knn_accuracy` / `linear_probe_accuracy`, and reports the stage's own
features as `knn_accuracy_this_stage`. Choices the paper leaves open: spherical k-means on the backbone
features (not the projections), Forgy initialisation, ids of examples outside the train split set to 0
(they never occur in a training batch).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from jaxcl import _paths
from jaxcl import losses
from jaxcl.train import checkpoints

LOSS_NAME = "mcl_nt_xent"
# Examples embedded at a time: the chunk of `evaluation.embed_images` (the loop's `embed`), so a streamed
# batch is one of the chunks the whole split would be cut into, the last one zero-padded alike.
FEATURE_BATCH = 256


def config_section() -> ml_collections.ConfigDict:
  """`config.mcl`: the earlier stages of a later stage (`config.loss.name = "mcl_nt_xent"`), and their
  clustering."""
  c = ml_collections.ConfigDict()
  c.previous_stages = ""  # comma-separated work directories of the earlier stages
  c.num_clusters = 10  # k-means clusters per earlier stage (our choice; the paper tunes it)
  c.kmeans_iters = 20  # Lloyd iterations
  return c


def previous_stages(config) -> list[str]:
  """The work directories of the earlier stages, from `config.mcl.previous_stages` (comma-separated;
  local folders or URIs such as gs://bucket/stage1, `jaxcl._paths.resolve`)."""
  return [_paths.resolve(w.strip())
          for w in str(config.mcl.previous_stages).split(",") if w.strip()]


def check_config(config) -> None:
  """MCL settings: a later stage names its earlier ones; only `mcl_nt_xent` uses them."""
  stages = previous_stages(config)
  if config.loss.name != LOSS_NAME:
    if stages:
      raise ValueError(
          f"`config.mcl.previous_stages` is for `config.loss.name={LOSS_NAME!r}`, got loss "
          f"{config.loss.name!r}.")
    return
  if not stages:
    raise ValueError(
        f"`config.loss.name={LOSS_NAME!r}` (a later MCL stage) needs `config.mcl.previous_stages`: the "
        "work directories of the earlier stages, comma-separated; got none. Train stage 1 with 'nt_xent'.")
  for workdir in stages:
    if not (_paths.as_path(workdir) / "checkpoints").is_dir():
      raise ValueError(
          f"`config.mcl.previous_stages` names {workdir!r}, which has no checkpoints/ folder (train "
          "that stage first).")
    stage_final_step(workdir)
  if int(config.mcl.num_clusters) < 1:
    raise ValueError(f"`config.mcl.num_clusters` must be >= 1, got {config.mcl.num_clusters}.")
  if int(config.mcl.kmeans_iters) < 0:
    raise ValueError(f"`config.mcl.kmeans_iters` must be >= 0, got {config.mcl.kmeans_iters}.")


def stage_final_step(workdir: str, key: str = "config.mcl.previous_stages") -> int:
  """The final step of the earlier stage in `workdir`, which must have finished (`key`: the config key
  that named it, for the errors; CSR's backbone run uses it too).

  Finished: the run wrote results.json (at its end, with "step" = its `config.total_steps`) and that
  step is its newest checkpoint. A ValueError names the workdir, the step found (the newest checkpoint)
  and the step expected otherwise: a stage stopped early (preempted, `stop_at`) is not used.
  """
  directory = _paths.as_path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
  found = f"step {steps[-1]}" if steps else "none"
  results = _paths.as_path(workdir) / "results.json"
  if not results.exists():
    raise ValueError(
        f"`{key}` names {workdir!r}, which has not finished: its newest checkpoint "
        f"is {found}, and it has no results.json (a run writes it when it reaches its `total_steps`, the "
        "step expected). Run that stage to the end first (the same command resumes it).")
  try:
    expected = int(json.loads(results.read_text())["step"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"`{key}` names {workdir!r}, whose results.json cannot be read ({e!r}): "
        "rerun that stage to the end to rewrite it.") from None
  if not steps or steps[-1] != expected:
    raise ValueError(
        f"`{key}` names {workdir!r}, which has not finished: its newest checkpoint "
        f"is {found}, expected step {expected} (the final step of its results.json). Run that stage to "
        "the end first.")
  return expected


def load_stage_variables(workdir: str, target: dict, key: str = "config.mcl.previous_stages",
                         why: str = "every MCL stage must use the same `config.model`") -> dict:
  """{"params", "batch_stats"} of the final checkpoint of the finished stage in `workdir`
  (`stage_final_step`; only those are read).

  `target` gives their structure as `jax.ShapeDtypeStruct`s with shardings (this run's model: the stages
  share `config.model`; a subtree of it reads only that part). `key` and `why`: the config key that
  named the run and what it must share, for the errors.
  """
  directory = _paths.as_path(workdir) / "checkpoints"
  step = stage_final_step(workdir, key)
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
  try:
    other = checkpoints.shape_mismatches(manager, step, target)
    if other:  # checked before reading (orbax's failed reads would not name the arrays)
      raise ValueError(f"arrays of other shapes than this run's: {checkpoints.summary(other)}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"the checkpoint of step {step} in {directory} does not hold this run's model ({why}): "
        f"{type(e).__name__}: {e}") from e
  finally:
    manager.close()
  return dict(restored["state"])


def final_variables(workdirs, abstract, shardings) -> tuple:
  """The variables ({"params", "batch_stats"}) of the final checkpoint of each of `workdirs` (finished
  runs), restored with this run's model structure and layout (`abstract`, `shardings`: the train state's
  abstract form and shardings; `load_stage_variables`)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        {"params": abstract.params, "batch_stats": abstract.batch_stats},
                        {"params": shardings.params, "batch_stats": shardings.batch_stats})
  return tuple(load_stage_variables(w, target) for w in workdirs)


def stage_clusters(features: np.ndarray, num_clusters: int, iterations: int, key: jax.Array) -> np.ndarray:
  """(N,) k-means cluster ids in [0, num_clusters) of one stage's (N, D) features (spherical k-means)."""
  n = features.shape[0]
  k = max(1, min(int(num_clusters), n))
  ids = losses.subclass_kmeans(
      jnp.asarray(features, jnp.float32), jnp.zeros((n,), jnp.int32), subclass_size=max(1, n // k),
      iterations=int(iterations), max_subclasses=k, key=key)
  return np.asarray(ids)


def split_features(stage_variables: list[dict], embed: Callable[[dict, np.ndarray], np.ndarray],
                   batches: Iterable[dict]) -> tuple[list[np.ndarray], np.ndarray]:
  """(each stage's (N, D) features, (N,) example ids) of a split read a batch at a time.

  `batches`: dicts of image (b, H, W, C), index (b,) and valid (b,) (`sources.split_batches`), every stage
  embedding each batch (`embed(variables, images)` → (b, D)); the rows past the split's end are dropped.
  """
  features: list[list[np.ndarray]] = [[] for _ in stage_variables]
  ids = []
  for batch in batches:
    valid = np.asarray(batch["valid"])
    for per_stage, variables in zip(features, stage_variables):
      per_stage.append(np.asarray(embed(variables, batch["image"]))[valid])
    ids.append(np.asarray(batch["index"])[valid])
  return [np.concatenate(f) for f in features], np.concatenate(ids)


def cluster_ids(config, stage_variables: list[dict], embed: Callable[[dict, np.ndarray], np.ndarray],
                batches: Iterable[dict], num_ids: int) -> np.ndarray:
  """(num_ids,) int32 joint cluster id of every example id (0 for ids outside the train split).

  `embed(variables, images)` gives backbone features; `batches` streams the train split (`split_features`);
  each stage is clustered with its own key (from `config.seed`).
  """
  features, ids = split_features(stage_variables, embed, batches)
  per_stage = []
  for s, stage_features in enumerate(features):
    key = jax.random.fold_in(jax.random.key(config.seed), s)
    per_stage.append(stage_clusters(stage_features, config.mcl.num_clusters, config.mcl.kmeans_iters, key))
  joint = np.asarray(losses.mcl_cluster_ids(jnp.asarray(np.stack(per_stage))))
  out = np.zeros((num_ids,), np.int32)
  out[ids] = joint
  return out


def init_state(num_ids: int) -> dict[str, Any]:
  """The loss state before the clusters are computed: {"cluster_ids": (num_ids,) zeros}."""
  return {"cluster_ids": jnp.zeros((num_ids,), jnp.int32)}


def loss(config, online: dict, ids: jax.Array, state: dict, **engine) -> jax.Array:
  """`losses.mcl_nt_xent` on the two simclr views, with the clusters of the batch's example ids;
  `engine`: `impl=` (and, for the sharded engines, `axis_name=` / `mesh=`)."""
  z = online["projection"]
  return losses.mcl_nt_xent(z[0], z[1], state["cluster_ids"][ids], temperature=config.loss.temperature, **engine)
