"""What a run owns in its workdir besides checkpoints and metrics: the lock and the config record.

- `check_writable(workdir)`: the workdir (or the folder it will be made in) and the outputs already in
  it can be written, checked before anything is created.
- The lock `DIR/jaxcl.lock` (`acquire_lock` / `release_lock`): one run per workdir. The file holds the
  holder's host, pid and start time and is created with O_CREAT | O_EXCL, so of two runs exactly one
  gets it; the other fails at once with a message naming the holder. A lock left by a process that no
  longer runs on this host (a `kill -9`, a crash) is recovered, with a warning. With several processes
  (`jax.process_count() > 1`) process 0 holds it for all of them.
- The config record `DIR/config.json` (`check_config_record`): the resolved config of the run. A run
  that resumes from a checkpoint must have the recorded config, except for the keys in `SAFE_TO_CHANGE`;
  any other difference is an error listing every key that differs.

`claim(config, workdir)` does all of this for `jaxcl.train.loop.train_and_evaluate` and releases the lock
when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np

LOCK_FILE = "jaxcl.lock"
CONFIG_FILE = "config.json"

# Keys a resumed run may change: they decide what is logged, saved and evaluated, never what is trained,
# so the parameters after every step are those of an unchanged run. Everything else (total_steps too:
# the learning-rate schedule depends on it) must keep its recorded value.
SAFE_TO_CHANGE = (
    "log_every",  # how often metrics are written
    "checkpoint_every",  # how often checkpoints are saved
    "keep_checkpoints",  # how many are kept
    "async_checkpointing",  # how they are written
    "eval_every",  # how often the model is evaluated during training (evaluation does not train)
    "on_nonfinite",  # what a non-finite step does; finite steps are the same either way
    "eval.knn_k",  # the evaluation's settings
    "eval.knn_temperature",
    "eval.linear_probe",
    "eval.baselines",
    "data.data_dir",  # where the same prepared data is read from (a moved cache, another machine)
)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


# ------------------------------------------------------------------------------------------ writable
def check_writable(workdir: str) -> None:
  """Raises a ValueError if the run could not write its outputs: `workdir` (or, when it does not exist
  yet, the nearest folder above it that does) and, when they exist, its `checkpoints` and `tensorboard`
  folders and its `metrics.jsonl`, `results.json`, `config.json` files must be writable. Creates
  nothing."""
  if not os.path.exists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f"--workdir {workdir} cannot be created: {parent} is not a writable folder.")
    return
  folders = [workdir] + [os.path.join(workdir, d) for d in ("checkpoints", "tensorboard")]
  for path in folders:
    if not os.path.exists(path):
      continue
    if not os.path.isdir(path):
      raise ValueError(f"--workdir: {path} must be a folder, but it is a file.")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ValueError(f"--workdir: the folder {path} is not writable: the run could not save its outputs.")
  for name in ("metrics.jsonl", "results.json", CONFIG_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise ValueError(f"--workdir: the file {path} is not writable: the run could not save its outputs.")


# ---------------------------------------------------------------------------------------------- lock
def acquire_lock(workdir: str) -> str:
  """Creates `workdir/jaxcl.lock` holding this process's host, pid and start time; returns its path.

  Raises `WorkdirLockedError` naming the holder if another process holds it. A lock whose holder ran
  on this host and no longer runs is stale: it is replaced, and a warning says so.
  """
  path = os.path.join(workdir, LOCK_FILE)
  for _ in range(3):  # a stale lock is moved aside, then the creation is tried again
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = read_lock(path)
      if holder is None and not os.path.exists(path):  # released meanwhile
        continue
      if holder is None and _abandoned(path):
        holder = {}
      elif holder is None or not _stale(holder, path):
        raise WorkdirLockedError(_held_message(workdir, path, holder)) from None
      if _remove_if_unchanged(path, holder):
        who = _describe(holder) if holder else "its holder (whose record is empty or unreadable)"
        print(f"warning: recovered the stale lock {path}: {who} no longer runs (it ended without "
              "releasing the workdir: killed or crashed).")
      continue
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(_this_holder(), f)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:  # e.g. SIGTERM right now: leave no lock without a holder behind
      os.remove(path)
      raise
    _HELD.add(path)
    return path
  raise WorkdirLockedError(_held_message(workdir, path, read_lock(path)))


def release_lock(path: str) -> None:
  """Removes the lock at `path` if this process holds it (it never removes another run's lock)."""
  holder = read_lock(path)
  if holder is not None and _is_this_process(holder):
    os.remove(path)
  _HELD.discard(path)


def read_lock(path: str) -> dict | None:
  """The holder recorded in a lock file ({"host", "pid", "since"}), or None if missing or unreadable
  (for instance still being written by its creator)."""
  try:
    with open(path) as f:
      holder = json.load(f)
    ok = isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
    return holder if ok else None
  except (OSError, ValueError, TypeError, AttributeError):
    return None


def _this_holder() -> dict:
  since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}


def _is_this_process(holder: dict) -> bool:
  return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


_HELD: set[str] = set()  # the lock files this process holds


def _stale(holder: dict, path: str) -> bool:
  """Whether the holder ran on this host and its process no longer exists (another host's process
  cannot be checked from here: its lock is never stale). A holder with this process's pid that this
  process did not lock is a former process with the same pid (a restarted container)."""
  if holder.get("host") != socket.gethostname():
    return False
  if holder["pid"] == os.getpid():
    return path not in _HELD
  try:
    os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
  except (ProcessLookupError, OverflowError):  # no such process (OverflowError: beyond any pid)
    return True
  except PermissionError:  # it exists, run by another user
    return False
  return False


UNREADABLE_LOCK_STALE_S = 60.0


def _abandoned(path: str) -> bool:
  """Whether an unreadable lock file has been so for `UNREADABLE_LOCK_STALE_S` seconds: its creator
  writes the record right after creating it, so it died in between (a `kill -9`)."""
  try:
    return time.time() - os.path.getmtime(path) > UNREADABLE_LOCK_STALE_S
  except OSError:
    return False


def _remove_if_unchanged(path: str, holder: dict) -> bool:
  """Moves the lock aside and deletes it if it still holds `holder`; puts it back if another process
  replaced it in between (then the next creation attempt reports that process)."""
  aside = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # another process recovered it first
    return False
  if (read_lock(aside) or {}) == holder:
    os.remove(aside)
    return True
  try:
    os.link(aside, path)  # fails if a third process has created a lock meanwhile
  except OSError:
    pass
  os.remove(aside)
  return False


def _describe(holder: dict) -> str:
  return f"process {holder.get('pid')} on host {holder.get('host')} (running since {holder.get('since', '?')})"


def _held_message(workdir: str, path: str, holder: dict | None) -> str:
  who = _describe(holder) if holder is not None else "a process whose lock file cannot be read"
  return (f"The workdir {workdir} is in use by another run: {who} holds {path}. Two runs on one workdir "
          "corrupt its checkpoints and metrics: wait for that run to end, stop it, or use another "
          f"--workdir. If that process is gone (a process on another host cannot be checked from here), "
          f"delete {path}.")


# ------------------------------------------------------------------------------------- config record
def config_record(config) -> dict:
  """The config as the plain JSON data written to `config.json` (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


_ABSENT = "(absent)"


def config_differences(recorded: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """[(dotted key, recorded value, current value)] for every key whose values differ, sorted by key;
  a key present on one side only has the value "(absent)" on the other."""
  old, new = _flatten(recorded), _flatten(current)
  return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a step folder (a run to resume)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_config_record(config, workdir: str) -> None:
  """Records `config` in `workdir/config.json`, or, when the workdir holds a checkpoint to resume,
  checks it against the record first.

  A difference in a key outside `SAFE_TO_CHANGE` is a ValueError listing every differing key with its
  recorded and its current value; differences in `SAFE_TO_CHANGE` keys are printed and recorded. A
  workdir without a checkpoint has nothing to resume: its record is replaced. A workdir with
  checkpoints but no record (written by an older jaxcl) gets one, with a note.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_record(config)
  recorded = None
  if os.path.exists(path):
    with open(path) as f:
      try:
        recorded = json.load(f)
      except ValueError as e:
        raise ValueError(f"The config record {path} is not valid JSON ({e}); restore it, or delete it to "
                         "record this run's config.") from None
  if recorded is not None and has_checkpoint(workdir):
    diffs = config_differences(recorded, current)
    unsafe = [d for d in diffs if d[0] not in SAFE_TO_CHANGE]
    if unsafe:
      lines = "\n".join(f"  config.{k}: recorded {a!r}, now {b!r}" for k, a, b in unsafe)
      raise ValueError(
          f"The config differs from the one recorded for the run in {workdir} ({path}), which this run "
          f"would resume:\n{lines}\nResuming would mix two runs. Run with the recorded values, or use "
          "another --workdir for the new config. Keys that may change on a resume: "
          f"{', '.join('config.' + k for k in SAFE_TO_CHANGE)}.")
    for k, a, b in diffs:
      print(f"note: config.{k} changed from {a!r} to {b!r} on resuming (safe to change; recorded).")
    if not diffs:
      return
  elif recorded is None and has_checkpoint(workdir):
    print(f"note: the checkpoints in {workdir} have no config record (an older jaxcl); recording this "
          f"run's config in {path}.")
  _write_atomically(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- claim
@contextlib.contextmanager
def claim(config, workdir: str):
  """Makes `workdir`, takes its lock and checks/records the config (process 0), for the duration of
  the `with` block; the lock is released when the block ends, by a return, an exception or a
  preemption. With several processes the others wait for process 0's verdict and fail with it."""
  os.makedirs(workdir, exist_ok=True)
  lock = None
  try:
    error = None
    if jax.process_index() == 0:
      try:
        lock = acquire_lock(workdir)
        check_config_record(config, workdir)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if not _every_process(error is None):
      if error is not None:
        raise error
      raise RuntimeError(f"process 0 could not start the run in {workdir} (its output says why).")
    yield
  finally:
    if lock is not None:
      release_lock(lock)


def _every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
