"""Run outputs: metrics.jsonl, TensorBoard scalars and PNG plots in the workdir.

The workdir is a local folder or a URI `etils.epath` opens (`gs://...`, `jaxcl._paths`); every file is
written through epath. An object store cannot append to an object: there `metrics.jsonl` and the
TensorBoard event file are uploaded whole at every logged step (as tensorboardX's own `gs://` writer
does), and a killed run loses at most the records logged since the last upload.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from jaxcl import _paths


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
    """`purge_step`: a resumed run; TensorBoard hides the old events at this step and later."""
    self.enabled = enabled
    self.path = _paths.as_path(workdir) / "metrics.jsonl"
    self._lines = None  # a URI's metrics.jsonl, read at the first write (after `rewind`), then kept here
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # event files TensorBoard reads, without TensorFlow

      logdir = str(_paths.as_path(workdir) / "tensorboard")
      if not _paths.is_local(logdir):
        _register_epath_event_files(logdir.split("://", 1)[0])
      self._tb = SummaryWriter(logdir, purge_step=purge_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    if _paths.is_local(self.path):
      with open(self.path, "a") as f:
        f.write(line)
    else:  # no appending to an object: upload the whole file
      if self._lines is None:
        self._lines = [l if l.endswith("\n") else l + "\n" for l in _read_lines(self.path)]
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _EpathEventFile:
  """A tensorboardX record writer for a URI: keeps the event file's bytes and uploads them whole through
  epath at every flush (object stores cannot append)."""

  def __init__(self, path: str):
    self.path = _paths.as_path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """The tensorboardX writer factory (`record_writer.register_writer_factory`) for a URI scheme."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    _paths.as_path(path).mkdir(parents=True, exist_ok=True)


def _register_epath_event_files(scheme: str) -> None:
  """Makes tensorboardX write event files under `scheme://` through epath (the same backend and
  credentials as the run's other outputs; it replaces tensorboardX's own `gs://` writer, which needs
  google-cloud-storage)."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

  record_writer.register_writer_factory(scheme, _EpathEventFiles())


def _read_lines(path) -> list[str]:
  """The lines of a text file (with their line ends); [] when it does not exist."""
  path = _paths.as_path(path)
  if not path.exists():
    return []
  return io.StringIO(path.read_text(), newline="").readlines()


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl`; a line cut short by a killed process is skipped."""
  records = []
  for line in _read_lines(_paths.as_path(workdir) / "metrics.jsonl"):
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


def rewind(workdir: str, step: int) -> int:
  """Drops the records after `step` (and any cut-short line) from `metrics.jsonl`; returns how many.

  A run resumed from the checkpoint at `step` runs the later steps again (a killed process lost them),
  so they would otherwise be logged twice. The file is replaced atomically.
  """
  return _keep_records(workdir, lambda r: r["step"] <= step)


def forget_evaluation(workdir: str, step: int) -> int:
  """Drops the evaluation records (those with "eval/..." keys) of `step` from `metrics.jsonl`; returns
  how many.

  A finished run that runs again evaluates its last step again: its new record replaces the old one
  instead of adding a second row for the same step. The file is replaced atomically.
  """
  return _keep_records(workdir, lambda r: r["step"] != step or not any(k.startswith("eval/") for k in r))


def _keep_records(workdir: str, keep_record) -> int:
  """Rewrites `metrics.jsonl` (atomically) with the records for which `keep_record(record)` is true,
  without cut-short lines; returns how many lines were dropped."""
  path = _paths.as_path(workdir) / "metrics.jsonl"
  lines = [line for line in _read_lines(path) if line.strip()]
  keep = []
  for line in lines:
    try:
      if keep_record(json.loads(line)):
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  if len(keep) != len(lines):
    _paths.write_atomically(path, "".join(keep))
  return len(lines) - len(keep)


def write_plots(workdir: str, projection: np.ndarray | None = None, labels: np.ndarray | None = None) -> list[str]:
  """loss.png, eval.png and (given a 2-D projection of test embeddings) embedding.png.

  Drawn on `matplotlib.figure.Figure`s with the Agg canvas, without pyplot: the caller's matplotlib
  backend (a notebook's inline one) is left as it was.
  """
  records = read_metrics(workdir)
  written = []
  train = [r for r in records if "loss" in r]
  if train:
    fig, ax = _figure(6, 4)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    written.append(_save(fig, workdir, "loss.png"))
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  if evals:
    fig, ax = _figure(6, 4)
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and ("accuracy" in k or "_R@" in k)})
    for k in keys:
      pts = [(r["step"], r[k]) for r in evals if k in r]
      ax.plot(*zip(*pts), marker="o", label=k[5:])
    ax.set(xlabel="step", ylabel="accuracy", title="Evaluation")
    ax.legend()
    written.append(_save(fig, workdir, "eval.png"))
  if projection is not None:
    fig, ax = _figure(5, 5)
    sc = ax.scatter(projection[:, 0], projection[:, 1], s=8, **({} if labels is None else {"c": labels, "cmap": "tab10"}))
    if labels is not None:
      fig.colorbar(sc, ax=ax, label="label")
    ax.set(title="Test embeddings (PCA, 2-D)")
    written.append(_save(fig, workdir, "embedding.png"))
  return written


def _figure(width: float, height: float):
  """A figure (inches) with one axes, on its own Agg canvas: no pyplot, no global backend."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig, fig.subplots()


def _save(fig, workdir: str, name: str) -> str:
  path = _paths.as_path(workdir) / name
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  path.write_bytes(png.getvalue())
  return str(path)


def pca_2d(x: np.ndarray) -> np.ndarray:
  """Projection of the rows of x onto their first two principal components."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T
