"""Preemption (jaxcl.train.preemption): SIGTERM checkpoints the step, exits 75 and the run resumes bit
for bit; a SIGTERM before the training loop; a SIGTERM to one of two JAX processes stops both at the same
step.

The tests run the real command line (`python -m jaxcl.main`) in a subprocess with a tiny SimCLR config
on 2 CPU devices, interrupt it, run it again on the same workdir and compare the final parameters bit for
bit with an uninterrupted run (the `straight` fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from jaxcl.main import PREEMPTED_EXIT_STATUS
from tests.helpers import (
    assert_bit_identical, checkpoint_steps, cli_flags, final_params, logged_steps, resumed_step, ROOT, Run,
    subprocess_env, TOTAL_STEPS, wait_until)


# ------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_checkpoints_exits_cleanly_and_resumes_bit_identically(data_dir, straight, tmp_path):
  workdir = tmp_path / "run"
  run = Run(workdir, data_dir, "first")
  assert wait_until(lambda: len(logged_steps(workdir)) >= 8, run), run.output()[-3000:]
  run.kill(signal.SIGTERM)
  assert run.wait() == PREEMPTED_EXIT_STATUS, run.output()[-3000:]  # 75: a scheduler restarts it
  steps = logged_steps(workdir)
  stopped = steps[-1]
  assert stopped < TOTAL_STEPS, "the run ended before the signal: make it longer"
  assert f"Stopped at step {stopped}" in run.output()
  assert checkpoint_steps(workdir)[-1] == stopped  # the interrupted step itself was saved
  assert not (workdir / "results.json").exists()  # no evaluation of a half-trained model
  assert not (workdir / "jaxcl.lock").exists()  # the lock was released

  again = Run(workdir, data_dir, "second")
  assert again.wait() == 0, again.output()[-3000:]
  assert f"Resumed from checkpoint at step {stopped}" in again.output()
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))  # every step logged exactly once
  assert json.loads((workdir / "results.json").read_text())["step"] == TOTAL_STEPS
  assert_bit_identical(final_params(workdir, data_dir), straight)


def test_sigterm_before_the_training_loop_exits_75_and_releases_the_lock(data_dir, tmp_path):
  workdir = tmp_path / "run"
  run = Run(workdir, data_dir, "early")
  assert wait_until(lambda: (workdir / "jaxcl.lock").exists(), run, poll=0.001), run.output()[-3000:]
  run.kill(signal.SIGTERM)  # while the run compiles, before the loop's own handler is installed
  assert run.wait() == PREEMPTED_EXIT_STATUS, run.output()[-3000:]
  assert not (workdir / "jaxcl.lock").exists()


# ------------------------------------------------------------------------------ multi-host SIGTERM
def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_dir, tmp_path):
  """Two JAX processes (jax.distributed on CPU): the preemption notice reaches only process 1; JAX's
  preemption sync point makes both stop, save the same step and exit cleanly; both resume from it.
  A cross-process step takes ~0.1 s on a loaded CPU and the stop comes ~10 steps after the signal
  (sent once 20 steps are logged), so 80 steps leave a wide margin; periodic checkpoints only every
  100 steps (each is a cross-process save): the step the run stops at is saved by the preemption itself."""
  workdir, steps, checkpoint_every = tmp_path / "run", 80, 100

  def launch(name):
    port, runs = free_port(), []
    for pid in (0, 1):
      run = Run.__new__(Run)
      run.workdir, run.log_path = workdir, tmp_path / f"{name}-{pid}.log"
      run._log = open(run.log_path, "w")  # pylint: disable=protected-access
      env = subprocess_env(devices=1)
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
      run.proc = subprocess.Popen(
          [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={workdir}",
           *cli_flags(data_dir, steps, checkpoint_every)],
          cwd=ROOT, env=env, stdout=run._log, stderr=subprocess.STDOUT)  # pylint: disable=protected-access
      runs.append(run)
    return runs

  first = launch("first")
  assert wait_until(lambda: len(logged_steps(workdir)) >= 20, first[0]), first[0].output()[-3000:]
  first[1].kill(signal.SIGTERM)
  codes = [r.wait() for r in first]
  outputs = [r.output() for r in first]
  assert codes == [PREEMPTED_EXIT_STATUS] * 2, outputs[1][-3000:]
  stopped = [[l for l in o.splitlines() if l.startswith("Stopped at step ")] for o in outputs]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped  # the same step on both processes
  step = int(stopped[0][0].split()[3].rstrip(";"))
  assert step < steps and checkpoint_steps(workdir)[-1] == step

  again = launch("second")
  assert [r.wait() for r in again] == [0, 0], again[0].output()[-3000:]
  assert all(resumed_step(r.output()) == step for r in again)
  assert logged_steps(workdir) == list(range(1, steps + 1))
