"""Speed and memory of the CLIP loss (forward + backward) per similarity engine, B = 1k .. 64k.

The performance protocol of docs/design.md, measured on whatever backend JAX runs on:

- time: `jax.jit(jax.value_and_grad(clip, argnums=(0, 1)))`, compiled and warmed up, then the median of
  repeated calls, each ended by `block_until_ready` (the spread min..max is printed, and the process CPU
  seconds, steadier than wall time when the machine is shared);
- R_time = time / time(the 3 bare matmuls of the same shapes: q kᵀ, dS k, dSᵀ q), each matmul a separate
  jitted call measured in the same process (skipped where the (B, B) matrix dS would not fit);
  R_tiled = time / time(the same 3 matmuls done column tile by column tile in one `fori_loop`), a floor
  that exists at every B (the blockwise engine recomputes S_t, so its structural minimum is 4/3).
  The step and the references are called in interleaved rounds and each ratio is the median of the
  per-round ratios, so a burst of load from other jobs hits numerator and denominator alike; the same
  ratios of CPU seconds are given too;
- temp = compiled temporary memory (`memory_analysis().temp_size_in_bytes`: everything beyond inputs and
  outputs, i.e. beyond the embeddings and their gradients); R_mem = temp / bytes(inputs);
- RSS = peak resident memory (VmHWM, see `_peak_rss_bytes`) of a FRESH subprocess that builds the inputs,
  compiles and runs the step once; "RSS run" is that peak minus the peak before compiling (interpreter,
  JAX runtime, inputs), which includes the compiler's own memory at small B;
- slopes of log(time) and log(memory) against log(B), per engine and D (≈ 2 and ≈ 1 expected).

Engines: dense, blockwise, pallas (only when `jaxcl.ops.available_impls()` has it; interpret mode off
TPU/GPU, so small B only) and `optax.losses.ntxent` on B embeddings holding B/2 positive pairs (the same
B×B similarity matrix; it broadcasts a (B, B, D) product, so small B only). A configuration whose compiled
temporaries would not fit in the memory budget is skipped, and the table says so.

    python experiments/bench_loss.py --quick                       # a couple of minutes
    python experiments/bench_loss.py                               # B = 1k..64k, D = 128, 256, 512
    python experiments/bench_loss.py --batches 8192 --dims 256 --engines blockwise,dense --repeats 9

Writes experiments/results/bench_loss.md, bench_loss.json and bench_loss.png (or --out-dir).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxcl
from jaxcl import losses
from jaxcl.ops import blockwise

LOGIT_SCALE = 1 / 0.07  # CLIP's initial logit scale (the time does not depend on it)
ALL_ENGINES = ("dense", "blockwise", "pallas", "optax")
_DN = {
    "qk": (((1,), (1,)), ((), ())),  # (B, D) x (B, D) -> (B, B)
    "dsk": (((1,), (0,)), ((), ())),  # (B, B) x (B, D) -> (B, D)
    "dstq": (((0,), (0,)), ((), ())),  # (B, B)ᵀ x (B, D) -> (B, D)
}


# ------------------------------------------------------------------------------------------ the steps
def _load_pallas() -> bool:
  try:
    import jaxcl.ops.pallas  # noqa: F401  (registers impl="pallas" when it exists)
  except ImportError:
    pass
  return "pallas" in jaxcl.ops.available_impls()


def loss_fn(engine: str):
  """(image, text) -> scalar loss of the engine; all see the same B×B similarity matrix."""
  if engine == "optax":
    import optax

    def ntxent(a, b):
      half = a.shape[0] // 2
      emb = jnp.concatenate([a[:half], b[:half]], axis=0)  # B embeddings, B/2 positive pairs
      labels = jnp.tile(jnp.arange(half), 2)
      return optax.losses.ntxent(emb, labels, temperature=1 / LOGIT_SCALE)

    return ntxent
  return lambda a, b: losses.clip(a, b, logit_scale=LOGIT_SCALE, impl=engine)


def step_fn(engine: str):
  return jax.jit(jax.value_and_grad(loss_fn(engine), argnums=(0, 1)))


def inputs(b: int, d: int, dtype=jnp.float32):
  ka, kb = jax.random.split(jax.random.key(b * 7919 + d))
  return jax.random.normal(ka, (b, d), dtype), jax.random.normal(kb, (b, d), dtype)


def tiled_floor_fn(b: int, tile: int):
  """The 3 matmuls of the loss, one column tile at a time (no exp, no reduction), with the tiles the
  blockwise engine uses (the last one slid back when `tile` does not divide B)."""
  n = -(-b // tile)

  def f(q, k):
    def body(t, carry):
      g, dk = carry
      start = jnp.minimum(t * tile, b - tile)
      k_t = lax.dynamic_slice_in_dim(k, start, tile)
      s = lax.dot_general(q, k_t, _DN["qk"])
      g = g + lax.dot_general(s, k_t, _DN["dsk"])
      dk = lax.dynamic_update_slice_in_dim(dk, lax.dot_general(s, q, _DN["dstq"]), start, 0)
      return g, dk

    return lax.fori_loop(0, n, body, (jnp.zeros_like(q), jnp.zeros_like(k)))

  return jax.jit(f)


def _clock(fn) -> tuple[float, float]:
  """Wall and process-CPU seconds of fn() (which blocks until its results are ready)."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def timed_paired(step, refs: dict, repeats: int) -> dict:
  """Times `step` and each reference in `refs` (name -> callable) in interleaved rounds.

  One warm-up round, then up to `repeats` rounds (fewer for long steps: about a minute of timing,
  3 rounds at least); each round runs the step, then every reference, so that a ratio step / reference
  is taken between calls made seconds apart, under the same load. Returns the median wall and CPU
  seconds of the step (with the wall min..max) and, per reference, the median of the per-round ratios.
  """
  warm, _ = _clock(step)
  for ref in refs.values():
    ref()
  n = max(3, min(repeats, int(60.0 / max(warm, 1e-3))))
  rounds = []
  for _ in range(n):
    rounds.append((_clock(step), {name: _clock(ref) for name, ref in refs.items()}))
  walls = [w for (w, _), _ in rounds]
  out = {"time": statistics.median(walls), "min": min(walls), "max": max(walls),
         "cpu": statistics.median([c for (_, c), _ in rounds]), "n": n}
  for name in refs:
    out[f"R_{name}"] = statistics.median([w / r[name][0] for (w, _), r in rounds])
    out[f"R_{name}_cpu"] = statistics.median([c / r[name][1] for (_, c), r in rounds])
  return out


# --------------------------------------------------------------------------------- fresh-process RSS
def _peak_rss_bytes() -> int:
  """Peak resident memory of this process.

  VmHWM from /proc/self/status where there is one: on Linux `getrusage(RUSAGE_SELF).ru_maxrss` keeps,
  across the fork + exec of a subprocess, the resident size the parent had at the fork, so a child of a
  large benchmark process would report the parent's memory. Elsewhere `resource.getrusage`.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux and BSD report KiB


def child(engine: str, b: int, d: int, tile: int) -> None:
  """Runs one configuration once in this (fresh) process and prints its RSS as JSON."""
  blockwise.DEFAULT_TILE = tile
  if engine == "pallas":
    _load_pallas()
  a, t = inputs(b, d)
  jax.block_until_ready((a, t))
  gc.collect()
  before = _peak_rss_bytes()
  compiled = step_fn(engine).lower(a, t).compile()
  after_compile = _peak_rss_bytes()
  jax.block_until_ready(compiled(a, t))
  print(json.dumps({
      "rss_before": before, "rss_compiled": after_compile, "rss_peak": _peak_rss_bytes(),
      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }))


def fresh_rss(engine: str, b: int, d: int, tile: int, timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, str(b), str(d), "--tile", str(tile)]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
  except subprocess.TimeoutExpired:
    return {"rss_error": f"timeout after {timeout:.0f} s"}
  except subprocess.CalledProcessError as e:
    return {"rss_error": (e.stderr.strip().splitlines() or ["failed"])[-1][:120]}
  return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- the sweep
def available_memory_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 * 2**30


def floor_refs(b: int, d: int, max_floor_batch: int) -> dict:
  """The references R_time and R_tiled divide by: callables that run and block.

  "time": the 3 bare matmuls q kᵀ, dS k, dSᵀ q of the loss, each its own jitted call (only where the
  (B, B) dS fits: B <= max_floor_batch); "tiled": the same 3 matmuls per column tile of the blockwise
  engine's width, in one fori_loop.
  """
  q, k = inputs(b, d)
  refs = {}
  if b <= max_floor_batch:
    ds = jax.random.normal(jax.random.key(1), (b, b), jnp.float32)
    mms = [(jax.jit(lambda x, y, dn=_DN[name]: lax.dot_general(x, y, dn)), lhs, rhs)
           for name, lhs, rhs in (("qk", q, k), ("dsk", ds, k), ("dstq", ds, q))]

    def bare():
      for f, x, y in mms:
        jax.block_until_ready(f(x, y))

    refs["time"] = bare
  tiled = tiled_floor_fn(b, blockwise.tile_size(None, b, d))
  refs["tiled"] = lambda: jax.block_until_ready(tiled(q, k))
  return refs


def run_config(engine, b, d, args, budget) -> dict:
  row = {"engine": engine, "B": b, "D": d, "input_bytes": 2 * b * d * 4}
  limit = {"pallas": args.pallas_max_batch, "optax": args.optax_max_batch}.get(engine)
  if limit is not None and b > limit:
    return row | {"skip": f"B > {limit} (--{engine}-max-batch)"}
  a, t = inputs(b, d)
  t0 = time.perf_counter()
  try:
    compiled = step_fn(engine).lower(a, t).compile()
  except Exception as e:  # pylint: disable=broad-except
    return row | {"skip": f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
  need = (row["temp_bytes"] or 0) + 2 * row["input_bytes"]
  if need > budget:
    return row | {"skip": f"needs {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"}
  refs = floor_refs(b, d, args.floor_max_batch)
  row |= timed_paired(lambda: jax.block_until_ready(compiled(a, t)), refs, args.repeats)
  del compiled, a, t, refs
  gc.collect()
  if not args.no_rss:
    row |= fresh_rss(engine, b, d, args.tile, timeout=args.rss_timeout)
  return row


# ---------------------------------------------------------------------------------------------- output
def _fmt_bytes(n):
  if n is None:
    return "—"
  return f"{n / 2**20:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


def _fmt(x, spec):
  return "—" if x is None else format(x, spec)


def slopes(rows) -> list[dict]:
  out = []
  groups = {}
  for r in rows:
    if "time" in r:
      groups.setdefault((r["engine"], r["D"]), []).append(r)
  for (engine, d), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r["B"])
    if len(rs) < 2:
      continue
    logb = np.log([r["B"] for r in rs])

    def fit(key, rs=rs, logb=logb):
      vals = [r.get(key) for r in rs]
      if any(v is None or v <= 0 for v in vals):
        return None
      return float(np.polyfit(logb, np.log(vals), 1)[0])

    rss_run = [r["rss_peak"] - r["rss_before"] for r in rs if "rss_peak" in r]
    rss_slope = None
    if len(rss_run) == len(rs) and all(v > 0 for v in rss_run):
      rss_slope = float(np.polyfit(logb, np.log(rss_run), 1)[0])
    out.append({"engine": engine, "D": d, "B": f"{rs[0]['B']}..{rs[-1]['B']}", "time": fit("time"),
                "temp": fit("temp_bytes"), "rss_run": rss_slope})
  return out


def markdown(rows, slope_rows, args, env) -> str:
  lines = [
      "# CLIP loss forward + backward per engine",
      "",
      f"Written by `experiments/bench_loss.py` on {env['date']}. Command: `{env['command']}`",
      "",
      f"Machine: {env['machine']}; JAX {env['jax']} on {env['backend']} ({env['devices']}); "
      f"blockwise tile min({args.tile}, max(128, 2·D)); float32 inputs; logit_scale 1/0.07; "
      f"load average at start {env['load']}.",
      "",
      "time: median wall seconds of the compiled value_and_grad (min..max over n runs), cpu: process "
      "CPU seconds per call. R_time: time / the 3 bare matmuls (q kᵀ, dS k, dSᵀ q) of the same shapes; "
      "R_tiled: time / the same 3 matmuls done per column tile; (cpu): the same ratios of CPU seconds, "
      "which a machine shared with other jobs disturbs less than wall time. temp: compiled temporaries "
      "beyond inputs and gradients; R_mem = temp / inputs. RSS: peak of a fresh process; RSS run: that "
      "peak minus the peak before compiling.",
      "",
      "| engine | B | D | time s | min..max | n | cpu s | R_time | R_tiled | R_time (cpu) | R_tiled (cpu) "
      "| temp | R_mem | RSS | RSS run |",
      "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if "skip" in r:
      lines.append(f"| {r['engine']} | {r['B']} | {r['D']} | skipped: {r['skip']} |  |  |  |  |  |  |  | "
                   f"{_fmt_bytes(r.get('temp_bytes'))} |  |  |  |")
      continue
    r_mem = r["temp_bytes"] / r["input_bytes"] if r.get("temp_bytes") is not None else None
    rss = r.get("rss_peak")
    rss_run = rss - r["rss_before"] if rss is not None else None
    lines.append(
        f"| {r['engine']} | {r['B']} | {r['D']} | {r['time']:.4f} | {r['min']:.4f}..{r['max']:.4f} | "
        f"{r['n']} | {r['cpu']:.4f} | {_fmt(r.get('R_time'), '.2f')} | {_fmt(r.get('R_tiled'), '.2f')} | "
        f"{_fmt(r.get('R_time_cpu'), '.2f')} | {_fmt(r.get('R_tiled_cpu'), '.2f')} | "
        f"{_fmt_bytes(r.get('temp_bytes'))} | {_fmt(r_mem, '.2f')} | "
        f"{_fmt_bytes(rss) if rss is not None else r.get('rss_error', '—')} | {_fmt_bytes(rss_run)} |"
    )
  lines += ["", "## Log-log slopes against B", "",
            "| engine | D | B range | time | temp | RSS run |", "|---|---:|---|---:|---:|---:|"]
  for s in slope_rows:
    lines.append(f"| {s['engine']} | {s['D']} | {s['B']} | {_fmt(s['time'], '.2f')} | "
                 f"{_fmt(s['temp'], '.2f')} | {_fmt(s['rss_run'], '.2f')} |")
  lines.append("")
  return "\n".join(lines)


def plot(rows, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  groups = {}
  for r in rows:
    if "time" in r:
      groups.setdefault((r["engine"], r["D"]), []).append(r)
  for (engine, d), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r["B"])
    bs = [r["B"] for r in rs]
    label = f"{engine} D={d}"
    axes[0].plot(bs, [r["time"] for r in rs], "o-", label=label)
    axes[1].plot(bs, [max(r.get("temp_bytes") or 1, 1) / 2**20 for r in rs], "o-", label=label)
    if all("rss_peak" in r for r in rs):
      axes[2].plot(bs, [r["rss_peak"] / 2**20 for r in rs], "o-", label=label)
  titles = ["fwd+bwd time (s)", "compiled temp memory (MiB)", "fresh-process peak RSS (MiB)"]
  for ax, title in zip(axes, titles):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch B")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle("CLIP loss forward + backward per engine (float32)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1024,2048,4096,8192,16384,32768,65536")
  p.add_argument("--dims", default="128,256,512")
  p.add_argument("--engines", default=",".join(ALL_ENGINES))
  p.add_argument("--quick", action="store_true", help="B = 1k, 2k, 4k; D = 256; 3 repeats")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--tile", type=int, default=blockwise.DEFAULT_TILE,
                 help="blockwise.DEFAULT_TILE: the engine uses min(tile, max(128, 2·D)) columns per tile")
  p.add_argument("--budget-gb", type=float, default=None,
                 help="skip a configuration whose temporaries + inputs exceed this many GiB "
                 "(default 60%% of MemAvailable)")
  p.add_argument("--floor-max-batch", type=int, default=16384, help="largest B for the bare (B, B) matmuls")
  p.add_argument("--pallas-max-batch", type=int, default=1024)
  p.add_argument("--optax-max-batch", type=int, default=1024,
                 help="optax.ntxent forms a (B, B, D) product: 3 GiB of temporaries at B = 1024, D = 256")
  p.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS measurement")
  p.add_argument("--rss-timeout", type=float, default=900.0)
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  p.add_argument("--child", nargs=3, metavar=("ENGINE", "B", "D"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.child:
    child(args.child[0], int(args.child[1]), int(args.child[2]), args.tile)
    return
  if args.quick:
    args.batches, args.dims, args.repeats = "1024,2048,4096", "256", 3
  batches = [int(x) for x in args.batches.split(",")]
  dims = [int(x) for x in args.dims.split(",")]
  engines = [e.strip() for e in args.engines.split(",") if e.strip()]
  for e in engines:
    if e not in ALL_ENGINES:
      raise SystemExit(f"--engines: unknown engine {e!r}, expected some of {ALL_ENGINES}")
  notes = []
  if "pallas" in engines and not _load_pallas():
    engines.remove("pallas")
    notes.append("pallas: not in jaxcl.ops.available_impls(), left out.")
  blockwise.DEFAULT_TILE = args.tile
  budget = int(args.budget_gb * 2**30) if args.budget_gb else int(0.6 * available_memory_bytes())

  env = {
      "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
      "command": " ".join(["python", "experiments/bench_loss.py"] + (sys.argv[1:] if argv is None else argv)),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
      "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
  }
  print(f"# {env['command']}\n# JAX {env['jax']} {env['backend']}, load {env['load']}, "
        f"budget {budget / 2**30:.1f} GiB", flush=True)
  rows = []
  for d in dims:
    for b in batches:
      for engine in engines:
        r = run_config(engine, b, d, args, budget)
        rows.append(r)
        if "skip" in r:
          print(f"{engine:9s} B={b:6d} D={d:4d}  skipped: {r['skip']}", flush=True)
          continue
        print(
            f"{engine:9s} B={b:6d} D={d:4d}  time {r['time']:.4f}s ({r['min']:.4f}..{r['max']:.4f}, "
            f"n={r['n']}) cpu {r['cpu']:.3f}s  R_time {_fmt(r.get('R_time'), '.2f')} "
            f"(cpu {_fmt(r.get('R_time_cpu'), '.2f')})  R_tiled {_fmt(r.get('R_tiled'), '.2f')} "
            f"(cpu {_fmt(r.get('R_tiled_cpu'), '.2f')})  temp {_fmt_bytes(r.get('temp_bytes'))}  "
            f"RSS {_fmt_bytes(r.get('rss_peak')) if 'rss_peak' in r else r.get('rss_error', '—')}",
            flush=True,
        )
  slope_rows = slopes(rows)
  for s in slope_rows:
    print(f"slope {s['engine']:9s} D={s['D']:4d} B={s['B']}: time {_fmt(s['time'], '.2f')}  "
          f"temp {_fmt(s['temp'], '.2f')}  rss_run {_fmt(s['rss_run'], '.2f')}")
  os.makedirs(args.out_dir, exist_ok=True)
  text = markdown(rows, slope_rows, args, env)
  if notes:
    text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
  with open(os.path.join(args.out_dir, "bench_loss.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out_dir, "bench_loss.json"), "w") as f:
    json.dump({"env": env, "rows": rows, "slopes": slope_rows}, f, indent=1)
  plot(rows, os.path.join(args.out_dir, "bench_loss.png"))
  print(f"wrote {os.path.join(args.out_dir, 'bench_loss.md')} (+ .json, .png)")


if __name__ == "__main__":
  main()
