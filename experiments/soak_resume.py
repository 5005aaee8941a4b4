"""Soak test of exact resume: N training steps with a `kill -9` and a restart every K steps.

Runs the command line (`python -m jaxcl.main`) on a tiny SimCLR config (digits, MLP encoder, batch 16,
2 CPU devices) twice on fresh workdirs:
  1. straight: N steps uninterrupted;
  2. soaked: the same run SIGKILLed every K steps (at a random step inside each K-step window, so kills
     also land while a checkpoint is being written) and restarted on the same workdir
     until it finishes.
Then it restores the final checkpoint of both and compares every array of the train state (parameters,
optimizer state, batch statistics, step) bit for bit, and reports for every kill the step it hit, the
checkpoint the restart resumed from and the steps lost.

    python experiments/soak_resume.py                      # N = 1000, K = 100 (about 10 minutes on 2 cores)
    python experiments/soak_resume.py --steps 100 --every 25

Writes `experiments/results/soak_resume.md` (and prints it). Exit status 1 if the final states differ,
a restart did not resume from the newest complete checkpoint, or a kill lost more steps than allowed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def overrides(steps: int, checkpoint_every: int, data_dir: str) -> dict:
  return {
      "batch_size": 16, "total_steps": steps, "warmup_steps": 10, "log_every": 1,
      "checkpoint_every": checkpoint_every, "eval_every": 100_000, "model.encoder": "mlp",
      "model.projection_dims": (32, 16), "eval.knn_k": 20, "eval.linear_probe": False,
      "eval.baselines": False, "eval.at_end": False, "data.data_dir": data_dir,  # what it checks: the state
  }


def make_config(values: dict):
  sys.path.insert(0, str(ROOT))
  try:
    from configs import simclr_digits  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = simclr_digits.get_config()
  for key, value in values.items():
    section = config
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
  return config


class Run:
  def __init__(self, workdir: pathlib.Path, values: dict, env: dict, log: pathlib.Path):
    self.workdir = workdir
    self.log = log
    self._f = open(log, "w")
    flags = [f"--config.{k}={v}".replace(" ", "") for k, v in values.items()]
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={workdir}", *flags],
        cwd=ROOT, env=env, stdout=self._f, stderr=subprocess.STDOUT)

  def wait(self, timeout: float = 900) -> int:
    try:
      return self.proc.wait(timeout)
    finally:
      self._f.close()

  def output(self) -> str:
    return self.log.read_text()


def logged_steps(workdir: pathlib.Path) -> list[int]:
  from jaxcl.train import metrics  # pylint: disable=import-outside-toplevel

  return [r["step"] for r in metrics.read_metrics(str(workdir)) if "loss" in r]


def complete_checkpoints(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def partial_checkpoints(workdir: pathlib.Path) -> list[str]:
  d = workdir / "checkpoints"
  return sorted(p.name for p in d.iterdir() if TMP_SUFFIX in p.name) if d.exists() else []


def resumed_step(output: str) -> int:
  lines = [l for l in output.splitlines() if l.startswith("Resumed from checkpoint at step ")]
  return int(lines[0].split()[5]) if lines else 0


def final_state(workdir: pathlib.Path, values: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxcl.train import checkpoints, devices
  from jaxcl.train import state as state_lib

  config = make_config(values)
  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, str(workdir))
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size,
                                       seed=config.seed))
  state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  if step != config.total_steps:
    raise RuntimeError(f"the final checkpoint of {workdir} is at step {step}, not {config.total_steps}")
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def soak(steps: int = 1000, every: int = 100, checkpoint_every: int = 10, *, root: str | None = None,
         seed: int | None = None, devices: int = 2, verbose: bool = True) -> dict:
  """Runs the straight and the soaked run; returns a dict of results (see `report`)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  seed = int(time.time()) if seed is None else seed
  rng = random.Random(seed)
  root = pathlib.Path(root or tempfile.mkdtemp(prefix="jaxcl-soak-"))
  root.mkdir(parents=True, exist_ok=True)
  values = overrides(steps, checkpoint_every, str(root / "tfds"))
  # One persistent compilation cache for all the runs (the caller's, e.g. the test session's, if it has one).
  cache = {} if os.environ.get("JAX_COMPILATION_CACHE_DIR") else {
      "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  # `devices` CPU devices, and the caller's other XLA flags (the test session's optimisation level)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}"] + flags), **cache)
  say = print if verbose else (lambda *a, **k: None)

  t0 = time.perf_counter()
  straight = Run(root / "straight", values, env, root / "straight.log")
  if straight.wait() != 0:
    raise RuntimeError("the straight run failed:\n" + straight.output()[-3000:])
  straight_s = time.perf_counter() - t0
  say(f"straight run: {steps} steps in {straight_s:.0f} s")

  workdir = root / "soaked"
  kills, n = [], 0
  t0 = time.perf_counter()
  while True:
    run = Run(workdir, values, env, root / f"soaked-{n}.log")
    window_end = (n + 1) * every  # run n is killed inside the n-th window of `every` steps
    if window_end >= steps:  # the last window: let it finish
      if run.wait() != 0:
        raise RuntimeError("the final soaked run failed:\n" + run.output()[-3000:])
      kills.append({"run": n, "resumed_from": resumed_step(run.output()), "killed_at": None})
      break
    target = rng.randint(window_end - every // 2, window_end)  # a random step late in the window
    while run.proc.poll() is None and (logged_steps(workdir) or [0])[-1] < target:
      time.sleep(0.002)
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    last = logged_steps(workdir)[-1]
    complete = complete_checkpoints(workdir)
    kills.append({"run": n, "resumed_from": resumed_step(run.output()), "killed_at": last,
                  "newest_complete": complete[-1] if complete else 0,
                  "write_in_flight": bool(partial_checkpoints(workdir))})
    say(f"run {n}: resumed from {kills[-1]['resumed_from']}, killed at step {last} "
        f"(newest complete checkpoint {kills[-1]['newest_complete']}, write in flight: "
        f"{kills[-1]['write_in_flight']})")
    n += 1
  soaked_s = time.perf_counter() - t0

  a, b = final_state(root / "straight", values), final_state(workdir, values)
  mismatched = [k for k in a if not np.array_equal(a[k], b[k])]
  max_diff = max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a
                  if a[k].dtype.kind == "f"), default=0.0)
  problems = []
  for prev, cur in zip(kills, kills[1:]):
    if cur["resumed_from"] != prev["newest_complete"]:
      problems.append(f"run {cur['run']} resumed from {cur['resumed_from']}, not from the newest complete "
                      f"checkpoint {prev['newest_complete']}")
  for k in kills:
    if k["killed_at"] is not None:
      k["lost"] = k["killed_at"] - k["newest_complete"]
      allowed = checkpoint_every  # saves are synchronous (config.async_checkpointing = False)
      if k["lost"] > allowed:
        problems.append(f"run {k['run']} lost {k['lost']} steps (allowed {allowed})")
  if mismatched:
    problems.append(f"{len(mismatched)} of {len(a)} state arrays differ, e.g. {mismatched[:3]}")
  if logged_steps(workdir) != list(range(1, steps + 1)):
    problems.append("metrics.jsonl does not hold every step exactly once")
  return {"steps": steps, "every": every, "checkpoint_every": checkpoint_every, "seed": seed,
          "devices": devices, "kills": kills, "arrays": len(a), "mismatched": mismatched,
          "max_abs_diff": max_diff, "straight_s": straight_s, "soaked_s": soaked_s, "problems": problems,
          "root": str(root)}


def report(r: dict) -> str:
  killed = [k for k in r["kills"] if k["killed_at"] is not None]
  lines = [
      "# Soak test: kill -9 and resume",
      "",
      f"`python experiments/soak_resume.py --steps {r['steps']} --every {r['every']} --checkpoint-every "
      f"{r['checkpoint_every']} --seed {r['seed']}`: tiny SimCLR (digits, MLP encoder, batch 16) on "
      f"{r['devices']} CPU devices through `python -m jaxcl.main`, SIGKILLed at a random step late in "
      f"every {r['every']}-step window and restarted on the same workdir.",
      "",
      "| run | resumed from | killed at step | newest complete checkpoint | write in flight | steps lost |",
      "|---|---|---|---|---|---|",
  ]
  for k in r["kills"]:
    if k["killed_at"] is None:
      lines.append(f"| {k['run']} | {k['resumed_from']} | (ran to the end) | | | |")
    else:
      lines.append(f"| {k['run']} | {k['resumed_from']} | {k['killed_at']} | {k['newest_complete']} | "
                   f"{'yes' if k['write_in_flight'] else 'no'} | {k['lost']} |")
  same = not r["mismatched"]
  verdict = "bit-identical" if same else f"{len(r['mismatched'])} differ (max abs diff {r['max_abs_diff']:.3g})"
  lines += [
      "",
      f"- kills: {len(killed)}; restarts resumed from the newest complete checkpoint: "
      f"{'all' if not any('resumed from' in p for p in r['problems']) else 'NO'}",
      f"- steps lost per kill: max {max((k['lost'] for k in killed), default=0)} "
      f"(checkpoint_every = {r['checkpoint_every']}; synchronous saves, so at most checkpoint_every)",
      f"- final train state vs the uninterrupted run: {r['arrays']} arrays, "
      f"{verdict}",
      f"- wall time: straight {r['straight_s']:.0f} s, soaked {r['soaked_s']:.0f} s ({len(r['kills'])} processes)",
      f"- result: {'PASS' if not r['problems'] else 'FAIL: ' + '; '.join(r['problems'])}",
      "",
  ]
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--checkpoint-every", type=int, default=10)
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary folder)")
  parser.add_argument("--keep", action="store_true", help="keep the workdir")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "soak_resume.md"))
  args = parser.parse_args()
  r = soak(args.steps, args.every, args.checkpoint_every, root=args.workdir, seed=args.seed,
           devices=args.devices)
  text = report(r)
  print(text)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(text)
  if not args.keep and args.workdir is None:
    shutil.rmtree(r["root"], ignore_errors=True)
  return 1 if r["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
