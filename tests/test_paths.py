"""Run outputs and data on a URI (jaxcl/_paths.py): a gs:// workdir trains, resumes and writes every
output through etils.epath, an unwritable one fails before any compute, the object-store lock, folder
data read from gs://.

No network: `fake_gcs(root)` is a Cloud Storage stand-in in a local folder. `gs://BUCKET/P` is
ROOT/BUCKET/P for etils.epath (its test hook `epath.testing.mock_epath`, through which orbax,
tensorflow-datasets and jaxcl open files) and for orbax's TensorStore arrays (orbax's GCS kvstore spec
becomes a file one). Like an object store (and gcsfs) it has no folders of their own: making one does
nothing, a folder exists when an object lies below it, and a write creates the folders above it; and
it cannot append to a file. `writable=False`: every write fails as on a bucket without write
permission.
"""

import contextlib
import json
import os
import socket
import struct
import sys
from unittest import mock

import numpy as np
import pytest
from etils.epath import testing as epath_testing
from PIL import Image

from jaxcl import _paths
from jaxcl.data import sources
from jaxcl.train import checkpoints, devices, loop, metrics
from jaxcl.train import workdir as workdir_lib
from tests.helpers import dead_pid, load_recipe, tiny

GS = "gs://"
WRITES = ("copy", "makedirs", "mkdir", "remove", "rename", "replace", "rmtree")


@contextlib.contextmanager
def fake_gcs(root, *, writable: bool = True):
  root = os.fspath(root)

  def local(p):
    p = os.fspath(p)
    return os.path.join(root, p[len(GS):]) if p.startswith(GS) else p

  def remote(p):
    p = os.fspath(p)
    return GS + os.path.relpath(p, root) if p.startswith(root + os.sep) else p

  def folder_of_objects(original, path):  # a folder exists when an object lies below it
    return original(path) and (not os.path.isdir(path) or any(f for _, _, f in os.walk(path)))

  def refuse(path):
    raise PermissionError(f"403 POST {path}: the caller does not have storage.objects.create access")

  def call(name):
    def fn(original, path, *args, **kwargs):
      if not os.fspath(path).startswith(GS):
        return original(path, *args, **kwargs)
      if name in WRITES and not writable:
        refuse(path)
      if name in ("mkdir", "makedirs"):
        return None  # no folder objects: a write creates the folders above it
      if name in ("exists", "isdir"):
        return folder_of_objects(original, local(path))
      args = [local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
      if name == "open" and any(m in args[0] for m in "wa"):
        if not writable:
          refuse(path)
        if "a" in args[0]:
          raise NotImplementedError(f"{path}: an object store cannot append (mode {args[0]!r})")
        os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # objects need no folders
      out = original(local(path), *args, **kwargs)
      if name == "glob":
        return [remote(p) for p in out]
      if name == "walk":
        return ((remote(r), d, f) for r, d, f in out)
      return out
    return fn

  names = WRITES + ("exists", "glob", "isdir", "listdir", "open", "stat", "walk")
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel

  with epath_testing.mock_epath(**{n: call(n) for n in names}), \
      mock.patch.object(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": local(p)}), \
      mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False):
    yield


def event_records(path) -> list[bytes]:
  """The records of a TensorBoard event file (TFRecord framing: length, its crc, data, its crc)."""
  data, out, at = open(path, "rb").read(), [], 0
  while at < len(data):
    (n,) = struct.unpack("Q", data[at:at + 8])
    out.append(data[at + 12:at + 12 + n])
    at += 16 + n
  return out


# ----------------------------------------------------------------------------------------- _paths
def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert _paths.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert _paths.resolve("~/b") == str(tmp_path / "home" / "b")
  assert _paths.resolve("gs://bucket/x/") == "gs://bucket/x" and not _paths.is_local("s3://b/x")
  assert str(_paths.as_path("gs://bucket/x") / "checkpoints") == "gs://bucket/x/checkpoints"


def test_write_atomically_replaces_the_whole_file_locally_and_on_gcs(tmp_path):
  local = tmp_path / "a.json"
  _paths.write_atomically(local, "old")
  _paths.write_atomically(local, "new\n")
  assert local.read_text() == "new\n" and os.listdir(tmp_path) == ["a.json"]  # no temporary left
  with fake_gcs(tmp_path / "gcs"):
    _paths.write_atomically("gs://bucket/d/a.json", "über\n")
  assert (tmp_path / "gcs" / "bucket" / "d" / "a.json").read_text(encoding="utf-8") == "über\n"


# ------------------------------------------------------------------------------- training on gs://
def test_a_gs_workdir_trains_resumes_and_writes_every_output_like_a_local_one(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the old bug: a local folder ./gs:/bucket/run
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  config.eval.at_end = True  # every output
  local = loop.train_and_evaluate(config, str(tmp_path / "local"), progress=False)
  gcs = tmp_path / "gcs"
  with fake_gcs(gcs):
    stopped = loop.train_and_evaluate(config, "gs://bucket/run", progress=False, stop_at=2)
    assert stopped == {"step": 2, "stopped": True}
    resumed = loop.train_and_evaluate(config, "gs://bucket/run/", progress=False)
  assert not os.path.exists(tmp_path / "gs:")
  run = gcs / "bucket" / "run"
  # the same numbers as the local run: the checkpoint of step 2 and the data iterator came back from gs://
  assert resumed["knn_accuracy"] == local["knn_accuracy"] and resumed["step"] == 4
  assert json.loads((run / "results.json").read_text()) == json.loads((tmp_path / "local" / "results.json").read_text())
  losses = lambda d: [(r["step"], r["loss"]) for r in metrics.read_metrics(str(d)) if "loss" in r]
  assert losses(run) == losses(tmp_path / "local") and [s for s, _ in losses(run)] == [2, 4]
  assert sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit()) == [2, 4]
  assert "commit_success.txt" in os.listdir(run / "checkpoints" / "4")  # orbax wrote it as on GCS
  assert json.loads((run / "config.json").read_text()) == workdir_lib.config_record(config)
  assert not (run / workdir_lib.LOCK_FILE).exists() and not [f for f in os.listdir(run) if "write-check" in f]
  for png in ("loss.png", "embedding.png"):
    assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  events = sorted(os.listdir(run / "tensorboard"))  # one event file per run (invocation)
  assert len(events) == 2
  tags = [sum(b"grad_norm" in r for r in event_records(run / "tensorboard" / f)) for f in events]
  assert tags == [1, 1]  # step 2 in the first run, step 4 after resuming
  with fake_gcs(gcs):  # a checkpoint moved aside on gs:// (as a restore that fails would)
    manager = checkpoints.checkpoint_manager(config, "gs://bucket/run")
    moved = checkpoints.quarantine_checkpoint(manager, 4)
    assert manager.all_steps() == [2]
    manager.close()
  assert moved.startswith("gs://bucket/run/checkpoints_quarantine/4-")
  assert "commit_success.txt" in os.listdir(gcs / moved[len(GS):]) and not (run / "checkpoints" / "4").exists()


def test_an_unwritable_gs_workdir_fails_before_data_and_compute_naming_the_path(data_dir, tmp_path, monkeypatch):
  def boom(*args, **kwargs):
    raise AssertionError("data or compute started before the problem was reported")

  monkeypatch.setattr(sources, "build_source", boom)
  monkeypatch.setattr(devices, "make_mesh", boom)
  config = tiny(load_recipe("simclr_digits"), data_dir)
  with fake_gcs(tmp_path, writable=False):
    with pytest.raises(ValueError, match=r"--workdir gs://bucket/run cannot be written: writing "
                       r"gs://bucket/run/\.jaxcl-write-check-.*PermissionError: 403"):
      loop.train_and_evaluate(config, "gs://bucket/run", progress=False)
  assert os.listdir(tmp_path) == []


def test_a_gs_path_without_an_epath_backend_names_the_path_and_gcsfs(monkeypatch):
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel

  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed (import gcsfs fails)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # nor TensorFlow's gfile
  with pytest.raises(ValueError, match=r"--workdir gs://bucket/run cannot be written: .* failed with "
                     r"ImportError: .*gcsfs.*pip install 'jaxcl\[gcs\]'"):
    workdir_lib.check_writable("gs://bucket/run")


# --------------------------------------------------------------------------------- object-store lock
def test_the_lock_on_gcs_records_the_holder_refuses_a_second_run_and_recovers_a_dead_one(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(workdir_lib, "OBJECT_LOCK_SETTLE_S", 0.0)
  lock_file = tmp_path / "bucket" / "run" / workdir_lib.LOCK_FILE
  with fake_gcs(tmp_path):
    path = workdir_lib.acquire_lock("gs://bucket/run")
    assert path == "gs://bucket/run/jaxcl.lock"
    holder = json.loads(lock_file.read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid()) and len(holder["token"]) == 32
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {os.getpid()} on host .* holds {path}"):
      workdir_lib.acquire_lock("gs://bucket/run")
    workdir_lib.release_lock(path)
    assert not lock_file.exists()
    # a process of this host that no longer runs (kill -9): taken over, with a warning
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "since": "x"}))
    path = workdir_lib.acquire_lock("gs://bucket/run")
    assert "recovered the stale lock gs://bucket/run/jaxcl.lock" in capsys.readouterr().out
    workdir_lib.release_lock(path)
    # another host's process cannot be checked from here, an unreadable record is not ours: both hold
    for record in ({"host": "tpu-worker-7", "pid": 12, "since": "x"}, "not json"):
      lock_file.write_text(record if isinstance(record, str) else json.dumps(record))
      with pytest.raises(workdir_lib.WorkdirLockedError, match="in use by another run"):
        workdir_lib.acquire_lock("gs://bucket/run")
      assert lock_file.read_text() == (record if isinstance(record, str) else json.dumps(record))
      workdir_lib.release_lock(path)  # not held by this process: left alone
      assert lock_file.exists()


def test_of_two_runs_writing_the_gcs_lock_at_once_the_overwritten_one_fails(tmp_path, monkeypatch):
  lock_file = tmp_path / "bucket" / "run" / workdir_lib.LOCK_FILE
  other = {"host": "tpu-worker-3", "pid": 4242, "since": "2026-12-04T00:00:00+00:00", "token": "f" * 32}
  waited = []

  def competitor_writes(seconds):  # during the settle time, another run writes its record
    waited.append(seconds)
    lock_file.write_text(json.dumps(other))

  monkeypatch.setattr(workdir_lib.time, "sleep", competitor_writes)
  with fake_gcs(tmp_path):
    with pytest.raises(workdir_lib.WorkdirLockedError, match="process 4242 on host tpu-worker-3"):
      workdir_lib.acquire_lock("gs://bucket/run")
  assert waited == [workdir_lib.OBJECT_LOCK_SETTLE_S] and json.loads(lock_file.read_text()) == other


# -------------------------------------------------------------------------------------- data on gs://
def test_an_image_folder_and_captions_on_gcs_read_as_the_local_copy(tmp_path):
  rng = np.random.default_rng(0)
  for name in ("train/ant/a.png", "train/ant/sub/b.png", "train/bee/c.png", "test/ant/d.png"):
    path = tmp_path / "gcs" / "bucket" / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(path)
  (tmp_path / "gcs" / "bucket" / "captions.tsv").write_text(
      "a.png\tan ant\nant/sub/b.png\tanother ant\nc.png\ta bee\nd.png\ttest ant\n")
  local = sources.default_data_config("folder")
  local.update(folder=str(tmp_path / "gcs" / "bucket" / "images"),
               captions_file=str(tmp_path / "gcs" / "bucket" / "captions.tsv"))
  remote = sources.default_data_config("folder")
  remote.update(folder="gs://bucket/images", captions_file="gs://bucket/captions.tsv")
  with fake_gcs(tmp_path / "gcs"):
    source, info = sources.build_source(remote, "train")
    arrays = sources.load_arrays(remote, "train")
    with pytest.raises(ValueError, match="gs://bucket/missing.tsv"):
      sources.build_source(dict(remote, captions_file="gs://bucket/missing.tsv"), "train")
  expected_source, expected_info = sources.build_source(local, "train")
  expected = sources.load_arrays(local, "train")
  assert info == expected_info and info.class_names == ("ant", "bee") and repr(source) == repr(expected_source)
  assert arrays["caption"] == expected["caption"] == ["an ant", "another ant", "a bee"]
  for key in ("image", "label", "index"):
    np.testing.assert_array_equal(arrays[key], expected[key])
