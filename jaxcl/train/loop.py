"""The one training loop of every method: `train_and_evaluate(config, workdir)`.

It trains `config.total_steps` steps (resuming from the newest good checkpoint in `workdir/checkpoints`
together with the data iterator), evaluates on the held-out split, and writes `results.json`,
`metrics.jsonl`, TensorBoard events and PNG plots. The pieces it is made of live in their own modules:
`validation` (every check before compute), `devices` (mesh, shardings, host → device batches), `state`
(the train state and what is built once), `step` (the jitted train step), `finite` (non-finite values),
`checkpoints`, `preemption` and `evaluation`.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import ml_collections

from jaxcl import _paths
from jaxcl.data import pipeline
from jaxcl.train import checkpoints, devices, evaluation, finite
from jaxcl.train import metrics as metrics_lib
from jaxcl.train import preemption
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from jaxcl.train import validation
from jaxcl.train import workdir as workdir_lib


# -------------------------------------------------------------------------------- host side of steps
def read_metrics(m: dict) -> dict:
  """A step's metrics on the host: one transfer of the small arrays (the loop's only read of a step's
  outputs; it waits for that step to finish)."""
  return jax.device_get(m)


class StepReport:
  """Checks and logs each step's metrics one step late, so the host never waits for the step it just
  dispatched.

  `dispatched(s, m)` keeps step s's metrics (device arrays) and reads those of step s - 1, which the
  devices finish while step s is queued behind it. `flush()` reads the kept ones at once; the loop calls
  it before every checkpoint and evaluation, and at the end. Reading a step: if `m["finite"]` is false
  the step's update was not applied (`train_step`), and `config.on_nonfinite="stop"` raises
  NonFiniteError naming that step (after the next step was dispatched, whose result is discarded),
  "skip" prints a warning naming it; then the metrics of every `log_every`-th and the last step are
  written, with examples/s over the steps since the previous logged one.
  """

  def __init__(self, config, workdir: str, writer, bar, start: int, good: int | None):
    self.config, self.workdir, self.writer, self.bar = config, workdir, writer, bar
    self.good = good  # the newest checkpoint verified finite (restored or saved), for the message
    self._pending = None
    self._since = (start, time.perf_counter())  # (step, time) of the previous logged step

  def dispatched(self, step: int, m: dict) -> None:
    previous, self._pending = self._pending, (step, m)
    if previous is not None:
      self._read(*previous)

  def flush(self) -> None:
    previous, self._pending = self._pending, None
    if previous is not None:
      self._read(*previous)

  def _read(self, step: int, m: dict) -> None:
    config = self.config
    m = read_metrics(m)
    if not bool(m["finite"]):
      msg = finite.nonfinite_message(step, m) + "; the update was not applied"
      if config.on_nonfinite == "stop":
        kept = f"step {self.good}" if self.good is not None else "none yet"
        raise finite.NonFiniteError(msg + f"; stopping (config.on_nonfinite='stop'). The last good checkpoint "
                             f"({kept}) is kept in {self.workdir}/checkpoints.")
      print("warning: " + msg + "; skipping it (config.on_nonfinite='skip').")
    if step % config.log_every == 0 or step == int(config.total_steps):
      (last, since), now = self._since, time.perf_counter()
      record = {k: float(v) for k, v in m.items() if k not in ("finite", "grad_finite", "state_finite")}
      record["examples_per_sec"] = (step - last) * config.batch_size / max(now - since, 1e-9)
      self.writer.write(step, record)
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_sec']:.0f}")
      self._since = (step, now)


# ------------------------------------------------------------------------------------------- the loop
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_at: int | None = None
) -> dict:
  """Trains to `config.total_steps` (resuming from `workdir`), evaluates (unless `config.eval.at_end` is
  False), writes the run's outputs.

  `stop_at` ends this invocation after that step with a checkpoint and no evaluation, as a preemption
  would (SIGTERM does the same at the next step boundary); running again resumes. Returns the results
  dict, or {"step": s, "stopped": True} when the run stopped early.

  `workdir` is a local folder or a URI `etils.epath` opens (`gs://bucket/run`; `jaxcl._paths`). Before
  anything is computed the workdir is checked to be writable and the config validated (its data opened);
  the run then holds the workdir's lock and checks the config against the one recorded there
  (`jaxcl.train.workdir`).
  """
  workdir = _paths.resolve(workdir)  # a local folder, or a URI such as gs://bucket/run (jaxcl._paths)
  workdir_lib.check_writable(workdir)
  infos = validation.validate_config(config)
  with workdir_lib.claim(config, workdir):
    return _train_and_evaluate(config, workdir, infos, progress=progress, stop_at=stop_at)


def _train_and_evaluate(config, workdir: str, infos: dict, *, progress: bool, stop_at: int | None) -> dict:
  lead = jax.process_index() == 0
  mesh = devices.make_mesh(config)
  setup = state_lib.build_setup(config, infos[config.data.train_split], mesh)
  loader = pipeline.make_train_loader(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size, seed=config.seed)
  data_iter = iter(loader)

  abstract, shardings = state_lib.state_shardings(config, setup, mesh)
  manager = checkpoints.checkpoint_manager(config, workdir)
  state, start = checkpoints.restore_checkpoint(manager, abstract, shardings, data_iter)
  good = start if state is not None else None  # the newest checkpoint verified finite (restored or saved)
  earlier = setup.method.earlier_models(config, abstract, shardings)  # MCL's earlier stages; () mostly
  # One program for the run's initial state and the random-init baseline (compiled once).
  init_fn = jax.jit(functools.partial(state_lib.init_state, config, setup), out_shardings=shardings)
  if state is None:
    state = init_fn(jax.random.key(config.seed))
    embed = lambda variables, images: evaluation.embed_images(config, setup, variables, images)["features"]
    state = setup.method.init_state_from_data(config, setup, state, earlier, embed)
  else:
    print(f"Resumed from checkpoint at step {start} in {workdir}")

  step_fn = step_lib.jit_train_step(config, setup, shardings)
  writer = metrics_lib.MetricsWriter(workdir, enabled=lead, purge_step=start + 1 if start else None)
  if lead:  # steps after the checkpoint were lost (kill -9) and run again: log them once
    metrics_lib.rewind(workdir, start)
    if start == int(config.total_steps):  # a finished run evaluates again: one row per evaluation
      metrics_lib.forget_evaluation(workdir, start)
  total = int(config.total_steps)
  bar = _progress(progress and lead, start, total)
  step = start
  end = total if stop_at is None else min(total, int(stop_at))
  report = StepReport(config, workdir, writer, bar, start, good)
  preempted = preemption.PreemptionFlag()

  def fetch(step: int) -> tuple[dict, checkpoints.DataState]:
    """The global batch of (0-based) step `step`, and the data-iterator state once it is consumed."""
    host = next(data_iter)
    host = dict(setup.text.prepare(config, host, step))
    if "image" in host:  # text-only data has none
      host["image"] = devices.encode_images(host["image"], config.data.transfer_dtype)
    return devices.to_global(host, mesh), checkpoints.DataState(data_iter.get_state())

  consumed = checkpoints.DataState(data_iter.get_state())  # the iterator after the last batch a dispatched step used
  try:
    # Step s+1 is dispatched before anything of step s is read on the host; the batch of step s+1 is
    # loaded and put on the devices while step s runs; step s's metrics are checked (finite) and logged
    # after step s+1 is dispatched (`StepReport`), and before any checkpoint or evaluation.
    upcoming = fetch(step) if step < end else None
    while step < end and not preempted.is_set(manager, step):
      batch, after = upcoming
      state, m = step_fn(state, batch)
      step += 1
      consumed = after
      upcoming = fetch(step) if step < end else None  # prefetch: the next batch while this step runs
      report.dispatched(step, m)  # checks the previous step: waits for it, not for this one
      saving = step % config.checkpoint_every == 0 or step == total
      evaluating = step % config.eval_every == 0 and step != total
      if saving or evaluating:
        report.flush()  # nothing is saved or evaluated before every step it covers was checked
      if saving:
        checkpoints.save_checkpoint(manager, step, state, consumed)
        report.good = step  # every step's guard covered the whole state (`train_step`)
      if evaluating:
        r = evaluation.evaluate(config, setup, state_lib.variables(state), earlier=earlier)
        writer.write(step, {f"eval/{k}": v for k, v in r.items() if not k.startswith("_")})
      bar.update(1)
    report.flush()
    if step < total:  # stopped early (stop_at or SIGTERM): keep everything, skip the evaluation
      if manager.latest_step() != step:
        checkpoints.save_checkpoint(manager, step, state, consumed)
      print(f"Stopped at step {step}; a checkpoint is in {workdir}/checkpoints, run again to resume.")
  finally:
    preempted.restore()
    bar.close()
    manager.wait_until_finished()
  if step < total:
    writer.close()
    manager.close()
    return {"step": step, "stopped": True}

  results, embedding = {}, {}
  if config.eval.at_end:
    results = evaluation.evaluate(config, setup, state_lib.variables(state), earlier=earlier)
    embedding = dict(projection=metrics_lib.pca_2d(results.pop("_projection")), labels=results.pop("_labels"))
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    if config.eval.baselines:
      init = init_fn(jax.random.key(config.seed))
      results["baselines"] = evaluation.baselines(config, setup, state_lib.variables(init))
  results["step"] = step
  if lead:
    (_paths.as_path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
    metrics_lib.write_plots(workdir, **embedding)
    print(evaluation.results_table(results) if config.eval.at_end else
          f"Trained to step {step}; no evaluation (eval.at_end=False).")
  writer.close()
  manager.close()
  return results


class _NoBar:
  def update(self, n): ...
  def set_postfix(self, **kw): ...
  def close(self): ...


def _progress(enabled: bool, start: int, total: int):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm

  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
