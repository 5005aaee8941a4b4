"""The loss's share of a trainer step's memory, compiled for a TPU slice (issue 16, target 3).

Compiles `configs/clip_digits.py`'s real train step (`jaxcl.plan.compile_step`: model, optimizer, mesh,
the loss engine the trainer picks) for a topology on this CPU, twice: with the recipe's CLIP loss and
with a loss that needs no temporaries of its own (mean(image · text) · logit_scale). The difference of
the per-chip temporaries is the loss's share of the step's peak; it is set against the same loss
compiled alone (`losses.clip` at its default impl under `jax.set_mesh`, value and gradients) on the
step's (B, embed_dim) float32 embeddings. Compiled, not measured on a chip.

    python experiments/plan_loss_in_step.py                       # v5e:2x2, global batch 65,536
    python experiments/plan_loss_in_step.py --batch 16384 --topology v5e:2x2

Writes `results/plan_loss_in_step.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxcl import losses, plan, targets  # noqa: E402
from jaxcl.train import methods  # noqa: E402
from jaxcl.train.methods import image_text  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
MIB = 2**20


def recipe(batch: int):
  spec = importlib.util.spec_from_file_location("clip_digits", os.path.join(ROOT, "configs", "clip_digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = batch
  return config


class LinearLossCLIP(image_text.CLIP):
  """CLIP with a stand-in loss that has no temporaries of its own: mean(image · text) · logit_scale."""

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    return jnp.mean(outputs["image"] * outputs["text"]) * outputs["logit_scale"], state, {}


def step_temporaries(config, target, method=None) -> tuple[float, dict]:
  """Per-chip temporaries (MiB) and kernel calls of the compiled train step, with `method` (a
  `methods.Method`) registered in place of the config's method if given."""
  original = methods.get(config.method)
  if method is not None:
    methods.register(method)
  try:
    compiled, *_ = plan.compile_step(config, target)
  finally:
    methods.register(original)
  return targets.memory(compiled).temp_bytes / MIB, targets.kernel_calls(compiled)


def loss_alone(batch: int, dim: int, target) -> tuple[float, dict]:
  """Per-chip temporaries (MiB) and kernel calls of clip's value and gradients alone, batch-sharded."""
  mesh = targets.mesh(target)
  x = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(mesh.axis_names)))
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  fn = jax.value_and_grad(lambda a, b, s: losses.clip(a, b, logit_scale=s), argnums=(0, 1, 2))
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn).lower(x, x, scale).compile()
  return targets.memory(compiled).temp_bytes / MIB, targets.kernel_calls(compiled)


def trainer_loss_alone(config, batch: int, target) -> tuple[float, dict]:
  """The same for the loss as the trainer calls it (the method's `loss`: the engine and mesh it passes,
  the trainer's mesh over the target's devices)."""
  from jaxcl.train import devices

  mesh = devices.make_mesh(config, target.devices)
  dim = int(config.model.embed_dim)
  x = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(devices.BATCH_AXES)))
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  method = methods.get(config.method)
  loss = lambda a, b, s: method.loss(config, {"image": a, "text": b, "logit_scale": s}, {}, {}, mesh=mesh)[0]
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, scale).compile()
  return targets.memory(compiled).temp_bytes / MIB, targets.kernel_calls(compiled)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=65536)
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "experiments", "results"))
  args = parser.parse_args()
  target = targets.get(args.topology)
  config = plan.for_platform(recipe(args.batch), target.platform)
  real, real_kernels = step_temporaries(config, target)
  free, _ = step_temporaries(config, target, LinearLossCLIP())
  alone, alone_kernels = loss_alone(args.batch, int(config.model.embed_dim), target)
  trainer_alone, trainer_kernels = trainer_loss_alone(config, args.batch, target)
  row = {"topology": args.topology, "global_batch": args.batch, "step_mib": real, "step_kernels": real_kernels,
         "step_linear_loss_mib": free, "loss_share_mib": real - free, "loss_alone_mib": alone,
         "loss_alone_kernels": alone_kernels, "trainer_loss_alone_mib": trainer_alone,
         "trainer_loss_alone_kernels": trainer_kernels}
  text = "\n".join([
      "# The CLIP loss's share of the trainer step's memory (compiled, not measured)",
      "",
      f"`configs/clip_digits.py` (ResNet-18 width 32, text transformer, embed_dim "
      f"{int(config.model.embed_dim)}, float32), global batch {args.batch:,} on {args.topology}; "
      f"jax {jax.__version__}.",
      "",
      "| per-chip temporaries | MiB | kernel calls |",
      "|---|---:|---|",
      f"| train step, CLIP loss | {real:,.1f} | {real_kernels} |",
      f"| train step, a loss with no temporaries | {free:,.1f} | |",
      f"| the loss's share of the step (difference) | {real - free:,.1f} | |",
      f"| the CLIP loss alone, value and gradients | {alone:,.1f} | {alone_kernels} |",
      f"| the same, as the trainer calls it (its engine and mesh) | {trainer_alone:,.1f} | {trainer_kernels} |",
      "",
      ("The loss's share is not positive: the step's peak is the encoders' activations, and the CLIP "
       "loss adds nothing to it (the compiler schedules the two programs differently)." if real <= free else
       f"The loss's share is {(real - free) / alone:.1f}x the loss alone."),
      "",
      f"Reproduce: `python experiments/plan_loss_in_step.py --batch {args.batch} --topology {args.topology}`",
      "",
  ])
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "plan_loss_in_step.md"), "w") as f:
    f.write(text)
  print(text)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
