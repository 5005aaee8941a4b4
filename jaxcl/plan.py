"""Plan a pod run: compile a recipe's train step for a TPU slice or GPU machine, without running it.

    python -m jaxcl.plan --config=configs/clip_vitb16.py --topology=v5e:8x8 [--max-batch] [--config.KEY=VALUE ...]

The step compiled is the training loop's own (`jaxcl.train.loop`: `build_setup`, `state_shardings`,
`jit_train_step` with the state donated, the (data, fsdp) mesh of `config.mesh`), lowered with abstract
arrays laid out over the devices of the named topology (`jaxcl.targets`) and compiled by the real XLA
TPU (or GPU) compiler on this machine's CPU. Nothing runs and no data is read: what the data would tell
(image shape, classes, example count) comes from the config (`jaxcl.data.sources.abstract_info`).

Printed: a readable summary, then, as the last line, one JSON object: the topology, chips, global batch,
HBM per chip, per-chip argument / temporary / output / total bytes and whether they fit in HBM, the
compiler's FLOP count of one step (None where the compiler gives none: GPU), the collectives of the compiled program (kind -> count and bytes) and,
on TPU, the compiler's cost-model step time (`cost_model_step_seconds`, from `optimal_seconds`: a model,
not a measurement; None on GPU, and where the TPU compiler reports a value <= 0, as libtpu does for
programs it does not model). HBM is per jax device: per chip, per core on TPU v2-v4 (two devices a chip). `--max-batch` bisects the largest global batch (a multiple of the batch mesh size) that
fits. Errors (an unknown topology, a batch that does not divide over the mesh, a missing compiler) are
one line and exit status 2.
"""

from __future__ import annotations

import copy
import os
import re
import sys

PLAN_ERROR_STATUS = 2
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
                "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
# One HLO instruction: `%name = <shape> <op>(`; the shape is an array type or a tuple of them.
_INSTRUCTION = re.compile(r"=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                          r"(?P<op>[a-z\-]+)\(")


class PlanError(ValueError):
  """A plan that cannot be made as asked (the message says what to change)."""


def array_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape: Σ over `dtype[d1,d2,…]` of prod(d)·sizeof(dtype).

  >>> array_bytes("(f32[8,128]{1,0}, bf16[4]{0})")
  4104
  """
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives of compiled HLO text (`compiled.as_text()`).

  Each instruction whose op is a kind of `COLLECTIVES` (or its asynchronous `<kind>-start`; the
  matching `-done` is not counted again) counts once, with the bytes of its result shape (for an
  asynchronous start, the last array of its result tuple that is not a scalar: the gathered / reduced /
  received output; a collective-permute-start's tuple ends in scalar u32 context values). Per device:
  the program is the one every device runs; an instruction inside a loop counts once, not once per
  iteration.

  >>> collective_stats("%a = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), to_apply=%add")["all-reduce"]
  {'count': 1, 'bytes': 128}
  >>> hlo = "%p = (bf16[16,4]{1,0}, bf16[16,4]{1,0}, u32[], u32[]) collective-permute-start(%x)"
  >>> collective_stats(hlo)["collective-permute"]
  {'count': 1, 'bytes': 128}
  """
  stats = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  for match in _INSTRUCTION.finditer(hlo_text):
    op, shape = match["op"], match["shape"]
    start = op.endswith("-start")
    kind = op[: -len("-start")] if start else op
    if kind not in stats:
      continue
    if start and shape.startswith("("):
      arrays = [a for a in _ARRAY.findall(shape) if a[1]]  # scalars (dims "") are context values
      shape = "{}[{}]".format(*arrays[-1]) if arrays else shape
    stats[kind]["count"] += 1
    stats[kind]["bytes"] += array_bytes(shape)
  return stats


def _cost(stage) -> dict:
  """The cost analysis of a lowered or compiled program as a dict ({} where the backend gives none)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def abstract_batch(config, setup, mesh, batch_size: int) -> dict:
  """The global batch `train_step` receives (after `setup.text.prepare`), as abstract arrays split along
  the batch mesh axes: image (B, H·W·C) of `config.data.transfer_dtype` (the loop's `encode_images`),
  label and index (B,) int32, and for image–text methods the text side's input (tokens or locked
  embeddings) and the fields it adds (`dummy_fields`); for text-only methods no image, and the sentences'
  token ids (B, V, L)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxcl.train import devices

  sharding = NamedSharding(mesh, P(devices.BATCH_AXES))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  ids = {"label": spec((batch_size,), jnp.int32), "index": spec((batch_size,), jnp.int32)}
  if setup.method.text_only:  # each example's sentences as token ids, (B, V, L); no image
    tokens = jax.eval_shape(lambda: setup.text.dummy(batch_size))
    return dict(ids, text=spec((batch_size, config.num_views) + tokens.shape[1:], tokens.dtype))
  image = devices.encode_images(np.zeros((1,) + tuple(setup.info.image_shape), np.float32),
                                config.data.transfer_dtype)  # one image: the shape and dtype sent
  batch = dict(ids, image=spec((batch_size,) + image.shape[1:], image.dtype))
  if setup.method.image_text:
    text = jax.eval_shape(lambda: setup.text.dummy(batch_size))
    batch["text"] = spec(text.shape, text.dtype)
    fields = jax.eval_shape(lambda: setup.text.dummy_fields(batch_size))  # CE-CLIP's hard_negative_valid
    batch.update({k: spec(v.shape, v.dtype) for k, v in fields.items()})
  return batch


def _checked_config(config, target):
  """`config` validated as the loop validates it, against the target's device count (no data)."""
  from jaxcl.train import validation

  try:
    validation.validate_config(config, data=False, num_devices=len(target.devices))
  except ValueError as e:
    raise PlanError(f"{e} (topology {target.name!r} has {len(target.devices)} devices)") from e


def compile_step(config, target):
  """(compiled and lowered train step, abstract TrainState, mesh) of `config` for the devices of `target`
  (a `jaxcl.targets.Target`)."""
  lowered, abstract, mesh = lower_step(config, target)
  return lowered.compile(), lowered, abstract, mesh


def lower_step(config, target):
  """(lowered train step, abstract TrainState, mesh) of `config` for the devices of `target`."""
  import jax

  from jaxcl.data import sources
  from jaxcl.train import devices
  from jaxcl.train import state as state_lib
  from jaxcl.train import step as step_lib

  config = for_platform(config, target.platform)
  _checked_config(config, target)
  try:  # what the config says about the data and the mesh, checked before anything is traced
    info = sources.abstract_info(config.data, config.data.train_split)
    mesh = devices.make_mesh(config, target.devices)
  except ValueError as e:
    raise PlanError(str(e)) from e
  setup = state_lib.build_setup(config, info, mesh)
  abstract, shardings = state_lib.state_shardings(config, setup, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = abstract_batch(config, setup, mesh, int(config.batch_size))
  lowered = step_lib.jit_train_step(config, setup, shardings).lower(state, batch)
  return lowered, abstract, mesh


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?required for HLO temporaries "
                            r"\((?P<need>[0-9.]+)(?P<unit>[KMGT]?)\) exceeds available HBM "
                            r"\((?P<have>[0-9.]+)(?P<have_unit>[KMGT]?)\)", re.S)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory(message: str) -> tuple[int, int] | None:
  """(temporaries needed, HBM available) in bytes, from the TPU compiler's refusal to compile a program
  whose temporaries exceed a chip's memory (units as printed, binary: "G" is GiB, so the numbers are
  rounded to 0.01 of the unit); None for any other message.

  >>> out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
  ...               "temporaries (26.65G) exceeds available HBM (15.75G).")
  (28615219610, 16911433728)
  >>> out_of_memory("INVALID_ARGUMENT: something else") is None
  True
  """
  m = _OUT_OF_MEMORY.search(message)
  if m is None:
    return None
  return (round(float(m["need"]) * _UNITS[m["unit"]]), round(float(m["have"]) * _UNITS[m["have_unit"]]))


def for_platform(config, platform: str):
  """`config` for compiling on `platform` ("tpu" / "gpu", `jaxcl.targets.Target.platform`): with
  `config.loss.impl = "pallas"`, a copy whose `config.loss.pallas` names that platform's kernels,
  compiled (flavour = platform, interpret = False; the block sizes as the config sets them). The other
  engines pick the kernels by the platform compiled for (`jaxcl.ops.engines.BY_PLATFORM`; the pallas
  default flavour "auto"): `config` as is.

  >>> from jaxcl.train import config as config_lib
  >>> c = config_lib.base_config()
  >>> c.loss.impl, c.loss.pallas.block_rows = "pallas", 256
  >>> p = for_platform(c, "gpu").loss.pallas
  >>> p.flavour, p.interpret, p.block_rows, c.loss.pallas.flavour
  ('gpu', False, 256, None)
  """
  if config.loss.impl != "pallas":
    return config
  config = copy.deepcopy(config)
  config.loss.pallas.flavour = platform
  config.loss.pallas.interpret = False
  return config


def plan(config, topology: str) -> dict:
  """The plan (the JSON object `main` prints last) of `config`'s train step on `topology`."""
  import jax
  import numpy as np

  from jaxcl import targets

  try:
    target = targets.get(topology)
  except (ValueError, RuntimeError) as e:
    raise PlanError(str(e)) from e
  lowered, abstract, mesh = lower_step(config, target)
  param_bytes = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract.params)))
  head = {
      "topology": target.name,
      "device_kind": target.device_kind,
      "chips": target.chips,
      "devices": len(target.devices),
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "global_batch": int(config.batch_size),
      "grad_accum_steps": int(config.grad_accum_steps),
      "param_bytes": param_bytes,
      "hbm_per_chip_bytes": target.hbm_bytes,
  }
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    refused = out_of_memory(str(e))
    if refused is None:
      raise
    return _refused_plan(head, refused, str(e))
  memory = targets.memory(compiled)
  cost = _cost(compiled)
  flops = cost.get("flops")
  if flops is None:  # the GPU compiler reports no cost analysis (None); the lowered program may
    flops = _cost(lowered).get("flops")
  seconds = cost.get("optimal_seconds")
  return {
      **head,
      "per_chip": {"argument_bytes": memory.argument_bytes, "temp_bytes": memory.temp_bytes,
                   "output_bytes": memory.output_bytes, "alias_bytes": memory.alias_bytes,
                   "total_bytes": memory.total_bytes},
      "fits": memory.total_bytes <= target.hbm_bytes,
      "flops_per_step": float(flops) if flops is not None else None,
      "collectives": collective_stats(compiled.as_text()),
      "kernel_calls": targets.kernel_calls(compiled),
      "cost_model_step_seconds": float(seconds) if seconds is not None and seconds > 0 else None,
      "cost_model_note": "the compiler's cost model, not a measurement; None where it gives no positive "
                         "optimal_seconds (GPU; TPU programs it does not model)",
      "optimal_seconds_reported": float(seconds) if seconds is not None else None,
      "compiler_refused": None,
  }


def _refused_plan(head: dict, refused: tuple[int, int], message: str) -> dict:
  """The plan of a program the TPU compiler refused because its temporaries exceed a chip's HBM: does
  not fit; the temporaries are the compiler's rounded figure (at least that much: the compiler stops at
  the first shortfall), the other byte counts, FLOPs and collectives unknown (None)."""
  need, available = refused
  return {
      **head,
      "per_chip": {"argument_bytes": None, "temp_bytes": need, "output_bytes": None, "alias_bytes": None,
                   "total_bytes": None},
      "fits": False,
      "flops_per_step": None,
      "collectives": None,
      "kernel_calls": None,
      "cost_model_step_seconds": None,
      "cost_model_note": "the compiler refused the program (temporaries exceed HBM): no cost model",
      "optimal_seconds_reported": None,
      "compiler_refused": {"temp_bytes": need, "available_bytes": available, "message": _one_line(message)},
  }


def batch_unit(config, topology: str) -> int:
  """The batch mesh size: the global batch must be a multiple of it (data × fsdp = all devices)."""
  from jaxcl import targets

  return len(targets.get(topology).devices)


def max_batch(config, topology: str, *, limit: int = 1 << 20, tolerance: float = 0.0,
              planner=None) -> tuple[dict, dict | None]:
  """(plan of the largest fitting global batch, plan of the smallest batch found not to fit).

  Batches are k·m with m = `batch_unit`; memory is taken to grow with the batch. Doubling k from the
  config's batch (rounded to a multiple of m) brackets the boundary, bisection narrows it: about
  2·log2(k) compiles. With `tolerance` 0 the second plan is the next multiple (the exact answer); with
  `tolerance` t > 0 the bisection stops once the bracket is at most t · (the fitting batch) wide (fewer
  compiles; the largest batch lies in the bracket). `planner(config, topology)` plans one batch (None:
  `plan`; e.g. one that caches plans so that a long search can resume). Raises PlanError when even m
  does not fit, or k·m reaches `limit` and still fits.
  """
  m = batch_unit(config, topology)
  planner = planner or plan

  def at(k: int) -> dict:
    with config.unlocked():
      config.batch_size = k * m
    return planner(config, topology)

  k = max(int(config.batch_size) // m, 1)
  first = at(k)
  if first["fits"]:
    good, bad = (k, first), None
    while bad is None:
      if 2 * k * m > limit:
        raise PlanError(f"a global batch of {k * m} fits and the search stops at {limit}: plan a "
                        "larger batch directly with --config.batch_size.")
      k *= 2
      p = at(k)
      good, bad = ((k, p), None) if p["fits"] else (good, (k, p))
  else:
    if k == 1:
      raise PlanError(f"even the smallest global batch, {m} (one example per device), does not fit "
                      f"{topology!r}: {first['per_chip']['total_bytes'] or first['per_chip']['temp_bytes']} "
                      "bytes per chip > "
                      f"{first['hbm_per_chip_bytes']}. Use config.mesh.fsdp, a smaller model or more chips.")
    good, bad = None, (k, first)
    lo = 1
    while good is None:  # halve until a batch fits
      k = max(k // 2, lo)
      p = at(k)
      if p["fits"]:
        good = (k, p)
      elif k == lo:
        raise PlanError(f"even the smallest global batch, {m}, does not fit {topology!r}.")
      else:
        bad = (k, p)
  while bad[0] - good[0] > max(1, int(tolerance * good[0])):
    k = (good[0] + bad[0]) // 2
    p = at(k)
    good, bad = ((k, p), bad) if p["fits"] else (good, (k, p))
  with config.unlocked():
    config.batch_size = good[0] * m
  return good[1], bad[1]


def summary(p: dict) -> str:
  """A readable summary of a plan."""
  gib = lambda b: f"{b / (1 << 30):.2f} GiB"  # noqa: E731
  c = p["per_chip"]
  if p["compiler_refused"] is not None:
    r = p["compiler_refused"]
    return "\n".join([
        f"compiled for {p['topology']} ({p['chips']} chips, {p['devices']} devices, {p['device_kind']}), "
        f"mesh {p['mesh']}, global batch {p['global_batch']}",
        f"parameters: {gib(p['param_bytes'])} in all",
        f"DOES NOT FIT: the compiler refused the step, its temporaries need {gib(r['temp_bytes'])} per chip "
        f"of {gib(r['available_bytes'])} available (plan a smaller batch, or more chips)",
    ])
  lines = [
      f"compiled for {p['topology']} ({p['chips']} chips, {p['devices']} devices, {p['device_kind']}), "
      f"mesh {p['mesh']}, global batch {p['global_batch']}"
      + (f" per micro-step ({p['grad_accum_steps']} micro-steps per optimizer update)"
         if p["grad_accum_steps"] > 1 else ""),
      f"parameters: {gib(p['param_bytes'])} in all",
      f"per chip: arguments {gib(c['argument_bytes'])}, temporaries {gib(c['temp_bytes'])}, outputs "
      f"{gib(c['output_bytes'])} (of which {gib(c['alias_bytes'])} reuse donated arguments): total "
      f"{gib(c['total_bytes'])} of {gib(p['hbm_per_chip_bytes'])} HBM -> "
      + ("fits" if p["fits"] else "DOES NOT FIT"),
  ]
  if p["flops_per_step"] is not None:
    lines.append(f"compiler FLOP count per step (per device program): {p['flops_per_step']:.3e}")
  used = {k: v for k, v in p["collectives"].items() if v["count"]}
  lines.append("collectives per step: " + (", ".join(
      f"{k} x{v['count']} ({v['bytes'] / (1 << 20):.1f} MiB)" for k, v in used.items()) or "none"))
  if p["cost_model_step_seconds"] is not None:
    lines.append(f"compiler cost-model step time: {p['cost_model_step_seconds'] * 1e3:.2f} ms "
                 "(a model, not a measurement)")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the command
def _define_flags():
  """--config (shared with `jaxcl.main` when that module defined it already), --topology, --max-batch."""
  from absl import flags
  from ml_collections import config_flags

  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "Path to a recipe in configs/.", lock_config=True)
  if "topology" not in flags.FLAGS:
    flags.DEFINE_string("topology", None, "A TPU slice like 'v5e:8x8' or GPUs like 'h200:1x1x8'.")
    flags.DEFINE_bool("max-batch", False, "Find the largest global batch that fits (bisection).")
  return flags.FLAGS


def _use_cpu() -> None:
  """The planner compiles on the CPU: JAX must not start (or fail to start) a local TPU or GPU."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TFDS_DISABLE_GCS", "1")
  import jax

  jax.config.update("jax_platforms", "cpu")


def main(argv) -> int:
  del argv
  import json

  from absl import logging

  logging.set_verbosity(logging.WARNING)
  FLAGS = _define_flags()  # pylint: disable=invalid-name
  try:
    if FLAGS.config is None or not FLAGS.topology:
      raise PlanError("give --config=configs/<recipe>.py and --topology=<slice>, e.g. --topology=v5e:8x8.")
    config = FLAGS.config
    if FLAGS["max-batch"].value:
      p, over = max_batch(config, FLAGS.topology)
    else:
      p, over = plan(config, FLAGS.topology), None
  except PlanError as e:
    print(f"jaxcl.plan: error: {_one_line(e)}", file=sys.stderr)
    return PLAN_ERROR_STATUS
  print(summary(p))
  if over is not None:
    need = over["per_chip"]["total_bytes"] or over["per_chip"]["temp_bytes"]
    p["max_batch"] = {"fits": p["global_batch"], "next_does_not_fit": over["global_batch"],
                      "next_total_bytes": over["per_chip"]["total_bytes"]}
    print(f"largest global batch that fits: {p['global_batch']} (next, {over['global_batch']}, needs "
          f"{'' if over['per_chip']['total_bytes'] else 'temporaries of '}{need / (1 << 30):.2f} GiB "
          "per chip)")
  print(json.dumps(p))
  return 0


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


if __name__ == "__main__":
  from jaxcl import _extras

  _extras.require_train_extra("python -m jaxcl.plan")
  _use_cpu()
  from absl import app

  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
