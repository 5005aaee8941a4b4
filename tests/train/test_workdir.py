"""The workdir a run owns (jaxcl/train/workdir.py): its lock, its config record, writability, checked
before any compute."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from jaxcl.train import devices, loop
from jaxcl.train import workdir as workdir_lib
from jaxcl.train.config import base_config
from tests.helpers import dead_pid, load_recipe, ROOT, tiny


def write_lock(workdir, host, pid, since="2026-01-02T03:04:05+00:00"):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"host": host, "pid": pid, "since": since}, f)
  return path


# ---------------------------------------------------------------------------------------------- lock
def test_lock_records_the_holder_and_is_released(tmp_path, capsys):
  path = workdir_lib.acquire_lock(str(tmp_path))
  holder = json.load(open(path))
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["since"]
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {os.getpid()} on host"):
    workdir_lib.acquire_lock(str(tmp_path))  # held, even by this process: one run per workdir
  workdir_lib.release_lock(path)
  assert not os.path.exists(path)
  # this pid in a lock this process did not take: a former process with the same pid (a restarted
  # container's main process), which no longer runs
  write_lock(tmp_path, socket.gethostname(), os.getpid())
  path = workdir_lib.acquire_lock(str(tmp_path))
  assert f"recovered the stale lock {path}: process {os.getpid()}" in capsys.readouterr().out
  workdir_lib.release_lock(path)


def test_a_second_process_fails_at_once_naming_the_holder_and_a_killed_holder_is_recovered(tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from jaxcl.train import workdir
          workdir.acquire_lock({str(tmp_path)!r})
          print("locked", flush=True)
          time.sleep(120)
          """)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirLockedError) as e:
      workdir_lib.acquire_lock(str(tmp_path))
    message = str(e.value)
    print(message)
    since = json.load(open(tmp_path / workdir_lib.LOCK_FILE))["since"]
    assert f"in use by another run: process {holder.pid} on host {socket.gethostname()} (running since " \
           f"{since}) holds {tmp_path / workdir_lib.LOCK_FILE}" in message
  finally:
    holder.kill()  # kill -9: the holder cannot release its lock
    holder.wait()
  assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == holder.pid  # left behind
  path = workdir_lib.acquire_lock(str(tmp_path))
  out = capsys.readouterr().out
  assert f"warning: recovered the stale lock {path}: process {holder.pid} on host" in out
  assert "no longer runs" in out
  assert json.load(open(path))["pid"] == os.getpid()
  workdir_lib.release_lock(path)


def test_stale_lock_of_a_dead_pid_is_recovered_and_another_hosts_lock_is_not(tmp_path, capsys):
  pid = dead_pid()
  write_lock(tmp_path, socket.gethostname(), pid)
  path = workdir_lib.acquire_lock(str(tmp_path))
  assert f"recovered the stale lock {path}: process {pid} on host {socket.gethostname()} (running since " \
         "2026-01-02T03:04:05+00:00) no longer runs" in capsys.readouterr().out
  workdir_lib.release_lock(path)
  # the same pid on another host: its liveness cannot be checked from here, so the lock holds
  write_lock(tmp_path, "some-other-host", pid)
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {pid} on host some-other-host .*cannot "
                     "be checked from here.*delete"):
    workdir_lib.acquire_lock(str(tmp_path))
  os.remove(tmp_path / workdir_lib.LOCK_FILE)
  (tmp_path / workdir_lib.LOCK_FILE).write_text("")  # created by a run that has not flocked it yet
  path = workdir_lib.acquire_lock(str(tmp_path))  # ...which will fail its flock: this one holds it
  assert "recovered" not in capsys.readouterr().out
  workdir_lib.release_lock(path)
  (tmp_path / workdir_lib.LOCK_FILE).write_text("{not json")  # its writer died mid-write
  path = workdir_lib.acquire_lock(str(tmp_path))
  assert "recovered the stale lock" in capsys.readouterr().out
  workdir_lib.release_lock(path)


def test_of_processes_racing_for_a_stale_lock_exactly_one_holds_it(tmp_path):
  """Four processes start at once on a workdir whose lock names a dead process: one holds the lock, the
  others fail naming a holder; the flock, not the record, decides, so no two can both take it over."""
  write_lock(tmp_path, socket.gethostname(), dead_pid())
  script = textwrap.dedent(f"""
      import sys, time
      from jaxcl.train import workdir
      time.sleep(max(0.0, {time.time() + 3.0!r} - time.time()))  # start together
      try:
        workdir.acquire_lock({str(tmp_path)!r})
      except workdir.WorkdirLockedError:
        print("refused", flush=True)
        sys.exit(0)
      print("holds", flush=True)
      time.sleep(5)
      """)
  procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
           for _ in range(4)]
  outs = [p.communicate(timeout=120)[0].split() for p in procs]
  assert sorted(o[-1] for o in outs) == ["holds"] + ["refused"] * 3, outs


def test_train_and_evaluate_refuses_a_locked_workdir_before_compute(data_dir, no_compute, tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    path = write_lock(tmp_path, socket.gethostname(), sleeper.pid)
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {sleeper.pid} on host"):
      loop.train_and_evaluate(tiny(load_recipe("simclr_digits"), data_dir), str(tmp_path), progress=False)
    assert json.load(open(path))["pid"] == sleeper.pid  # the other run's lock is left alone
    assert not (tmp_path / "checkpoints").exists()
  finally:
    sleeper.kill()
    sleeper.wait()


def test_lock_is_released_when_the_run_fails(data_dir, no_compute, tmp_path):
  with pytest.raises(AssertionError, match="compute started"):  # an exception inside the run
    loop.train_and_evaluate(tiny(load_recipe("simclr_digits"), data_dir), str(tmp_path), progress=False)
  assert (tmp_path / workdir_lib.CONFIG_FILE).exists()  # the run got past its claim...
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()  # ...and released the lock


# ------------------------------------------------------------------------------------- config record
def test_config_differences_lists_every_changed_key():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
  new = {"a": 1.0, "b": {"c": [1, 3], "d": "x"}, "new": True}
  assert workdir_lib.config_differences(old, new) == [
      ("b.c", [1, 2], [1, 3]), ("gone", 0, "(absent)"), ("new", "(absent)", True)]


def test_safe_keys_exist():
  from jaxcl.train import config as config_lib

  record = workdir_lib.config_record(config_lib.base_config())
  for key in workdir_lib.SAFE_TO_CHANGE:
    node = record
    for part in key.split("."):
      node = node[part]
  assert "total_steps" not in workdir_lib.SAFE_TO_CHANGE
  readme = open(os.path.join(ROOT, "README.md")).read()
  listed = readme.split("Only these keys may change on a resume")[1].split("SAFE_TO_CHANGE")[0]
  assert [k for k in workdir_lib.SAFE_TO_CHANGE if f"`{k}`" not in listed] == []  # documented


def test_resume_with_another_config_is_refused_listing_the_keys(data_dir, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  assert loop.train_and_evaluate(config, str(workdir), progress=False, stop_at=2)["stopped"]
  record = json.load(open(workdir / "config.json"))
  assert record == json.loads(json.dumps(config.to_dict()))
  assert record["batch_size"] == 16 and record["model"]["projection_dims"] == [32, 16]

  changed = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  changed.batch_size, changed.learning_rate, changed.total_steps = 32, 0.5, 8
  changed.log_every = 1  # safe, but the others are not
  with monkeypatch.context() as m:
    m.setattr(devices, "make_mesh", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(ValueError) as e:
      loop.train_and_evaluate(changed, str(workdir), progress=False)
  message = str(e.value)
  print(message)
  assert message.startswith(f"The config differs from the one recorded for the run in {workdir} "
                            f"({workdir / 'config.json'}), which this run would resume:\n")
  assert ("\n  config.batch_size: recorded 16, now 32\n  config.learning_rate: recorded "
          f"{config.learning_rate!r}, now 0.5\n  config.total_steps: recorded 4, now 8\n") in message
  assert "log_every: recorded" not in message
  assert "Keys that may change on a resume: config.log_every, config.checkpoint_every" in message
  assert json.load(open(workdir / "config.json")) == record  # untouched

  safe = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  safe.log_every, safe.eval.knn_k = 1, 10
  capsys.readouterr()
  assert loop.train_and_evaluate(safe, str(workdir), progress=False)["step"] == 4
  out = capsys.readouterr().out
  assert "note: config.eval.knn_k changed from 20 to 10 on resuming (safe to change; recorded)." in out
  assert "note: config.log_every changed from 2 to 1" in out
  assert json.load(open(workdir / "config.json"))["eval"]["knn_k"] == 10
  assert not (workdir / workdir_lib.LOCK_FILE).exists()  # released at the normal end


def test_a_workdir_without_checkpoints_takes_the_new_config(tmp_path):
  from jaxcl.train import config as config_lib

  first = config_lib.base_config()
  workdir_lib.check_config_record(first, str(tmp_path))  # e.g. a first start that failed at step 0
  second = config_lib.base_config()
  second.batch_size = 128
  workdir_lib.check_config_record(second, str(tmp_path))  # nothing to resume: no conflict
  assert json.load(open(tmp_path / "config.json"))["batch_size"] == 128
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"config.batch_size: recorded 128, now 256"):
    workdir_lib.check_config_record(first, str(tmp_path))


# -------------------------------------------------------------------------------------- writability
def read_only(path):
  os.chmod(path, 0o555)
  if os.access(path, os.W_OK):
    os.chmod(path, 0o755)
    pytest.skip("running as root: folder permissions are not enforced (the run could write there)")


def test_read_only_checkpoints_folder_is_an_error_before_compute(data_dir, no_compute, tmp_path):
  checkpoints = tmp_path / "run" / "checkpoints"
  checkpoints.mkdir(parents=True)
  read_only(checkpoints)
  try:
    with pytest.raises(ValueError, match=f"--workdir: the folder {checkpoints} is not writable"):
      loop.train_and_evaluate(tiny(load_recipe("simclr_digits"), data_dir), str(tmp_path / "run"), progress=False)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]
    read_only(tmp_path)
    with pytest.raises(ValueError, match=f"--workdir {tmp_path / 'new' / 'run'} cannot be created: {tmp_path} "
                       "is not a writable folder"):
      loop.train_and_evaluate(tiny(load_recipe("simclr_digits"), data_dir), str(tmp_path / "new" / "run"),
                              progress=False)
  finally:
    os.chmod(checkpoints, 0o755)
    os.chmod(tmp_path, 0o755)


def test_a_key_newer_than_the_record_at_its_default_value_is_accepted(tmp_path, capsys):
  """A workdir recorded by an older jaxcl lacks the keys added since: at their default value they do not
  change the run, so the resume is accepted (and the record completed); at another value it is refused."""
  config = base_config()
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # a run to resume
  record = workdir_lib.config_record(config)
  del record["log_every"], record["eval"]["knn_k"]  # safe anyway
  del record["grad_accum_steps"]  # as if added after the run was recorded
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(record))
  workdir_lib.check_config_record(config, str(tmp_path))
  assert "config.grad_accum_steps changed from '(absent)'" in capsys.readouterr().out
  assert json.load(open(tmp_path / workdir_lib.CONFIG_FILE))["grad_accum_steps"] == config.grad_accum_steps
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(record))  # without the key again
  config.grad_accum_steps = config.grad_accum_steps + 1
  with pytest.raises(ValueError, match=r"config.grad_accum_steps: recorded '\(absent\)', now"):
    workdir_lib.check_config_record(config, str(tmp_path))
