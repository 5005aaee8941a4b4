"""Run outputs: metrics.jsonl, TensorBoard scalars and PNG plots in the workdir."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
    """`purge_step`: a resumed run; TensorBoard hides the old events at this step and later."""
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # event files TensorBoard reads, without TensorFlow

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl`; a line cut short by a killed process is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
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
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if keep_record(json.loads(line)):
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
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
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and "accuracy" in k})
    for k in keys:
      pts = [(r["step"], r[k]) for r in evals if k in r]
      ax.plot(*zip(*pts), marker="o", label=k[5:])
    ax.set(xlabel="step", ylabel="accuracy", title="Evaluation")
    ax.legend()
    written.append(_save(fig, workdir, "eval.png"))
  if projection is not None:
    fig, ax = _figure(5, 5)
    sc = ax.scatter(projection[:, 0], projection[:, 1], c=labels, cmap="tab10", s=8)
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
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def pca_2d(x: np.ndarray) -> np.ndarray:
  """Projection of the rows of x onto their first two principal components."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T
