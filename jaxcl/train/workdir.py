"""What a run owns in its workdir besides checkpoints and metrics: the lock and the config record.

The workdir is a local folder or a URI `etils.epath` opens (`gs://bucket/dir`; `jaxcl._paths`).

- `check_writable(workdir)`: the workdir (or the folder it will be made in) and the outputs already in
  it can be written, checked before anything is created. A URI is checked by writing and removing a
  small probe object (`.jaxcl-write-check-HOST-PID`), since object stores have no permission bits to
  read.
- The lock `DIR/jaxcl.lock` (`acquire_lock` / `release_lock`): one run per workdir. The file holds the
  holder's host, pid and start time, and the holder keeps an exclusive `flock` on it, so of two runs
  exactly one gets it and the kernel drops it when the holder dies; the other fails at once with a
  message naming the holder. A lock file left by a process that no longer runs on this host (a
  `kill -9`, a crash) is taken over, with a warning; one naming a process on another host is not
  (its liveness cannot be checked from here). With several processes (`jax.process_count() > 1`)
  process 0 holds it for all of them.
  On a URI (an object store: no flock) the lock is the object alone: it is taken when absent (or stale,
  as above) by writing a record with a random token, waiting `OBJECT_LOCK_SETTLE_S` and reading it back;
  the run holds it only if the token read back is its own, so of two runs that wrote it at about the same
  time the one overwritten fails, naming the other. Two runs can still both hold it if one writes after
  the other has read back (a gap longer than the settle time between its absence check and its write),
  and a lock object left by a killed process on another host stays until it is deleted by hand.
- The config record `DIR/config.json` (`check_config_record`): the resolved config of the run. A run
  that resumes from a checkpoint must have the recorded config, except for the keys in `SAFE_TO_CHANGE`;
  any other difference is an error listing every key that differs.

`claim(config, workdir)` does all of this for `jaxcl.train.loop.train_and_evaluate` and releases the lock
when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
import uuid
from typing import Any

import jax
import numpy as np

from jaxcl import _paths
from jaxcl.train import config as config_lib

LOCK_FILE = "jaxcl.lock"
CONFIG_FILE = "config.json"
# On an object store: how long a run waits between writing the lock object and reading it back (longer
# than the latency of one write, so a competitor that saw no lock has written its own by then).
OBJECT_LOCK_SETTLE_S = 1.0

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
    "eval.at_end",
    "data.data_dir",  # where the same prepared data is read from (a moved cache, another machine)
)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


# ------------------------------------------------------------------------------------------ writable
def check_writable(workdir: str) -> None:
  """Raises a ValueError if the run could not write its outputs: `workdir` (or, when it does not exist
  yet, the nearest folder above it that does) and, when they exist, its `checkpoints` and `tensorboard`
  folders and its `metrics.jsonl`, `results.json`, `config.json` files must be writable. Creates
  nothing. A URI (`gs://...`) is checked by writing a probe object into it and removing it; an error
  names the path and what failed (for instance a missing gcsfs, or no permission on the bucket)."""
  if not _paths.is_local(workdir):
    _check_writable_uri(workdir)
    return
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


def _check_writable_uri(workdir: str) -> None:
  folder = _paths.as_path(workdir)
  probe = folder / f".jaxcl-write-check-{socket.gethostname()}-{os.getpid()}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("jaxcl checks that the run can write its outputs here; safe to delete.\n")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (ImportError, PermissionError, gcsfs's HttpError...)
    hint = f" {_paths.GCS_HINT}" if workdir.startswith("gs://") else ""
    raise ValueError(f"--workdir {workdir} cannot be written: writing {probe} failed with "
                     f"{type(e).__name__}: {e}. The run could not save its outputs.{hint}") from e


# ---------------------------------------------------------------------------------------------- lock
def acquire_lock(workdir: str) -> str:
  """Takes `workdir/jaxcl.lock` for this process and writes its host, pid and start time into it;
  returns its path.

  The file is held with an exclusive `flock` for as long as the run lasts, so of two processes that try
  at once exactly one gets it, and the kernel drops it when its holder dies. Raises `WorkdirLockedError`
  naming the holder if another process holds it. A lock file whose `flock` is free but whose record
  names a process that still runs (on another host: that cannot be checked from here) holds too; one
  whose recorded process ran on this host and no longer runs is stale: it is taken over, with a warning.
  On a URI (`gs://...`, no flock) the object alone is the lock (`_acquire_object_lock`).
  """
  if not _paths.is_local(workdir):
    return _acquire_object_lock(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  for _ in range(3):  # the holder may release (and remove) the file between our open and our flock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
      locked = _flock(fd)
      if locked and not _same_file(fd, path):  # we locked a file its holder has just removed
        os.close(fd)
        continue
      holder = read_lock(path)
      if not locked or (holder is not None and not _stale(holder, path)):
        raise WorkdirLockedError(_held_message(workdir, path, holder))
      if holder is not None or os.fstat(fd).st_size:  # an empty file is one being created right now
        who = _describe(holder) if holder else "its holder (whose record is unreadable)"
        print(f"warning: recovered the stale lock {path}: {who} no longer runs (it ended without "
              "releasing the workdir: killed or crashed).")
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_this_holder()).encode(), 0)
      os.fsync(fd)
    except WorkdirLockedError:
      os.close(fd)
      raise
    except BaseException:  # e.g. SIGTERM right now: leave no lock file this process made behind
      locked = locked or _flock(fd)  # interrupted before the flock: clean up only if nobody holds it
      mine = read_lock(path)
      if locked and _same_file(fd, path) and (
          not os.fstat(fd).st_size or (mine is not None and _is_this_process(mine))):
        os.remove(path)
      os.close(fd)
      raise
    _HELD[path] = fd
    return path
  raise WorkdirLockedError(_held_message(workdir, path, read_lock(path)))


def _acquire_object_lock(workdir: str) -> str:
  """The lock on an object store: written when absent or stale, held if it still holds this run's
  record (its random token) `OBJECT_LOCK_SETTLE_S` later (the module docstring says what this does
  not exclude)."""
  path = f"{_paths.resolve(workdir)}/{LOCK_FILE}"
  lock = _paths.as_path(path)
  if lock.exists():
    holder = read_lock(path)
    if holder is None or not _stale(holder, path):  # an unreadable object is a whole write: not ours
      raise WorkdirLockedError(_held_message(workdir, path, holder))
    print(f"warning: recovered the stale lock {path}: {_describe(holder)} no longer runs (it ended "
          "without releasing the workdir: killed or crashed).")
  mine = dict(_this_holder(), token=uuid.uuid4().hex)
  lock.write_text(json.dumps(mine))
  time.sleep(OBJECT_LOCK_SETTLE_S)
  holder = read_lock(path)
  if holder != mine:  # another run wrote it after us: it holds the workdir
    raise WorkdirLockedError(_held_message(workdir, path, holder))
  _HELD[path] = None
  return path


def release_lock(path: str) -> None:
  """Removes the lock at `path` if this process holds it (it never removes another run's lock)."""
  if path not in _HELD:
    return
  fd = _HELD.pop(path)
  if fd is None:  # an object store's lock: no descriptor
    holder = read_lock(path)
    if holder is not None and _is_this_process(holder):
      _paths.as_path(path).unlink(missing_ok=True)
    return
  try:
    holder = read_lock(path)
    if holder is not None and _is_this_process(holder) and _same_file(fd, path):
      os.remove(path)  # while still flocked: a process that opened it meanwhile sees it gone and retries
  finally:
    os.close(fd)  # drops the flock


def _flock(fd: int) -> bool:
  """An exclusive, non-blocking flock on fd: False if another open file holds it. On a file system
  without flock (some network mounts) the record alone decides."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError:
    return True
  return True


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as fd (its holder removes it when releasing)."""
  try:
    a, b = os.fstat(fd), os.stat(path)
  except OSError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_lock(path: str) -> dict | None:
  """The holder recorded in a lock file ({"host", "pid", "since"}), or None if missing or unreadable
  (for instance still being written by its creator)."""
  try:
    holder = json.loads(_paths.as_path(path).read_text())
    ok = isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
    return holder if ok else None
  except (OSError, ValueError, TypeError, AttributeError):
    return None


def _this_holder() -> dict:
  since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}


def _is_this_process(holder: dict) -> bool:
  return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


_HELD: dict[str, int | None] = {}  # the locks this process holds, and their flocked descriptors (None: a URI)


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
  folder = _paths.as_path(workdir) / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_config_record(config, workdir: str) -> None:
  """Records `config` in `workdir/config.json`, or, when the workdir holds a checkpoint to resume,
  checks it against the record first.

  A difference in a key outside `SAFE_TO_CHANGE` is a ValueError listing every differing key with its
  recorded and its current value; differences in `SAFE_TO_CHANGE` keys, and keys the record lacks (added
  by a newer jaxcl) at their default value, are printed and recorded. A
  workdir without a checkpoint has nothing to resume: its record is replaced. A workdir with
  checkpoints but no record (written by an older jaxcl) gets one, with a note.
  """
  path = _paths.as_path(workdir) / CONFIG_FILE
  current = config_record(config)
  recorded = None
  if path.exists():
    try:
      recorded = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"The config record {path} is not valid JSON ({e}); restore it, or delete it to "
                       "record this run's config.") from None
  if recorded is not None and has_checkpoint(workdir):
    diffs = config_differences(recorded, current)
    defaults = _flatten(config_record(config_lib.base_config()))
    unsafe = [(k, a, b) for k, a, b in diffs if k not in SAFE_TO_CHANGE
              and not (a == _ABSENT and k in defaults and b == defaults[k])]  # a key newer than the record
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
  _paths.write_atomically(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- claim
@contextlib.contextmanager
def claim(config, workdir: str):
  """Makes `workdir`, takes its lock and checks/records the config (process 0), for the duration of
  the `with` block; the lock is released when the block ends, by a return, an exception or a
  preemption. With several processes the others wait for process 0's verdict and fail with it."""
  _paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  lock = None
  try:
    error = None
    if jax.process_index() == 0:
      try:
        lock = acquire_lock(workdir)
        check_config_record(config, workdir)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if not every_process(error is None):
      if error is not None:
        raise error
      raise RuntimeError(f"process 0 could not start the run in {workdir} (its output says why).")
    yield
  finally:
    if lock is None and _paths.is_local(workdir) and os.path.join(workdir, LOCK_FILE) in _HELD:
      lock = os.path.join(workdir, LOCK_FILE)  # interrupted between acquire_lock's return and `lock =`
    if lock is not None:
      release_lock(lock)


def every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
