"""Throughput of the SimCLR train step: examples/s of ResNet-18 (small-image stem) at 32x32, batch 256.

Measured as the performance protocol of docs/design.md says: one process, compile + warm-up first,
then the median of repeated timed steps, each ended by `block_until_ready`. The step is the full jaxcl train step
(on-device augmentation of two views, forward and backward through encoder and projection head, NT-Xent,
LARS update, batch-norm statistics) on synthetic 32x32x3 images.

    python experiments/bench_train_step.py [--batch 256] [--width 64] [--repeats 5]

Writes experiments/results/train_step.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxcl.data import sources
from jaxcl.train import devices
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from jaxcl.train.config import base_config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.md"))
  args = parser.parse_args()

  config = base_config()
  config.method, config.loss.name = "simclr", "nt_xent"
  config.batch_size, config.model.width = args.batch, args.width
  config.model.encoder = "resnet18"
  config.model.projection_dims = (2048, 128)
  config.augment.strength = "simclr"
  info = sources.SourceInfo(
      num_examples=args.batch, image_shape=(args.size, args.size, 3), num_classes=10,
      class_names=tuple(str(i) for i in range(10)), has_captions=False, captions_from_labels=False,
      caption_templates=sources.GENERIC_CAPTION_TEMPLATES, num_ids=args.batch)
  setup = state_lib.build_setup(config, info)
  mesh = devices.make_mesh(config)
  abstract, shardings = state_lib.state_shardings(config, setup, mesh)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup), out_shardings=shardings)(jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  rng = np.random.default_rng(0)
  host = {"image": rng.random((args.batch, args.size, args.size, 3), np.float32),
          "label": rng.integers(0, 10, args.batch).astype(np.int32),
          "index": np.arange(args.batch, dtype=np.int32)}
  batch = devices.to_global(host, mesh)
  step = jax.jit(functools.partial(step_lib.train_step, config, setup), donate_argnums=(0,))

  start = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  state, m = step(state, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  row = (f"| ResNet-18 (width {args.width}, small stem) | {args.size}x{args.size}x3 | {args.batch} | "
         f"{n_params / 1e6:.2f} M | {median:.3f} | {min(times):.3f}–{max(times):.3f} | "
         f"{args.batch / median:.1f} | {compile_s:.1f} |")
  header = ("| model | input | batch | params | median s/step | range s | examples/s | compile s |\n"
            "|---|---|---|---|---|---|---|---|")
  device = f"{jax.device_count()}x {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  load = " ".join(f"{x:.1f}" for x in os.getloadavg())
  text = (f"# SimCLR train-step throughput\n\nDevice: {device}; jax {jax.__version__}; load average {load}; "
          f"{args.repeats} timed steps after compile + 1 warm-up; loss {float(m['loss']):.4f}.\n\n"
          f"{header}\n{row}\n\nReproduce: `python experiments/bench_train_step.py --batch {args.batch} "
          f"--width {args.width} --repeats {args.repeats}`\n")
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
