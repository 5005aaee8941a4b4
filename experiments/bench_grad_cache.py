"""Gradient caching on this CPU: peak memory and time per step against the chunk count (issue 14).

One SimCLR step (two views of B images through one encoder, NT-Xent over the 2B embeddings, the
gradient of every parameter) with `jaxcl.grad_cache.value_and_grad` at k = 1, 2, 4, 8 chunks, for
ResNet-18 (width 16, layer norm, CIFAR stem) and ViT-Ti (patch 4) on 16×16 images, B = 1,024 to 8,192.
Memory: the compiled step's temporaries (XLA's memory analysis of the CPU program: what the activations
take). Time: the median of `--repeats` steps after one warm-up, on this machine (2 cores; run it on a
quiet machine: nothing else should compute meanwhile). k = 1 is the plain `jax.value_and_grad`;
ResNet-18 also with the chunk loops unrolled (`unroll=True`: XLA:CPU runs convolution gradients
inside a loop body about 10x slower than outside; unrolled, the chunks still run one at a time).

    python experiments/bench_grad_cache.py                              # everything (many hours here)
    python experiments/bench_grad_cache.py --models vit_ti --batches 1024 2048

A second run with the same `--out` keeps the rows already measured. `--time-max-batch N` compiles the
larger batches for their temporaries only; steps with more than `--time-max-gib` of temporaries are not
run (this machine has 24 GiB); `--timed-loops unrolled` times only the unrolled loops for k > 1. What
results/ holds was run as:

    python experiments/bench_grad_cache.py --models vit_ti --time-max-batch 2048 --repeats 1
    python experiments/bench_grad_cache.py --models vit_ti --batches 4096 8192 --repeats 1
    python experiments/bench_grad_cache.py --models resnet18 --batches 1024 --chunks 1 2 4 --repeats 1
    python experiments/bench_grad_cache.py --models resnet18 --timed-loops unrolled --repeats 1

Writes `results/bench_grad_cache.json` and `results/bench_grad_cache.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcl import grad_cache, losses, models  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
IMAGE = 16
MODELS = {
    "resnet18": lambda: models.build_model("resnet18", width=16, norm="layer", small_image=True),
    "vit_ti": lambda: models.build_model("vit_ti", patch_size=4),
}


def step_fn(model, chunks: int, unroll: bool):
    """value_and_grad of NT-Xent over two views (the images and their mirror images) of the batch."""

    def embed(params, chunk):
        return {"z1": model.apply({"params": params}, chunk["view1"], train=True),
                "z2": model.apply({"params": params}, chunk["view2"], train=True)}

    def loss(params, e):
        del params
        return losses.nt_xent(e["z1"], e["z2"], temperature=0.2, impl="blockwise")

    if chunks == 1:
        return jax.jit(jax.value_and_grad(lambda p, b: loss(p, embed(p, b))))
    return jax.jit(grad_cache.value_and_grad(embed, loss, chunks=chunks, unroll=unroll))


def measure(name: str, batch: int, chunks: int, repeats: int, unroll: bool = False, timed: bool = True,
            max_temp_bytes: float = float("inf")) -> dict:
    """Temporaries of the compiled step, and (`timed`, and the temporaries at most `max_temp_bytes`) the
    median time of `repeats` steps after one."""
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(batch, IMAGE, IMAGE, 3)), jnp.float32)
    data = {"view1": images, "view2": images[:, :, ::-1]}
    params = model.init(jax.random.key(0), images[:2], train=False)["params"]
    fn = step_fn(model, chunks, unroll)
    start = time.perf_counter()
    compiled = fn.lower(params, data).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    times = []
    if timed and temp <= max_temp_bytes:
        jax.block_until_ready(compiled(params, data))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, data))
            times.append(time.perf_counter() - start)
    return {"model": name, "batch": batch, "chunks": chunks, "unroll": unroll, "temp_bytes": int(temp),
            "step_seconds": statistics.median(times) if times else None, "compile_seconds": compile_s}


def report(rows: list[dict]) -> str:
    lines = [
        "# Gradient caching: memory and time per step against chunks (this CPU)",
        "",
        f"`python experiments/bench_grad_cache.py` on {platform.machine()}, {os.cpu_count()} cores, jax "
        f"{jax.__version__}. One SimCLR step (NT-Xent, two views of B {IMAGE}×{IMAGE} images), value and "
        "gradient; temporaries from XLA's memory analysis of the compiled CPU program, time the median "
        "of the timed steps. Ratios against k = 1 (`jax.value_and_grad` without caching).",
        "",
        "| model | B | chunks k | loops | temporaries | vs k=1 | step time | vs k=1 |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    base = {(r["model"], r["batch"]): r for r in rows if r["chunks"] == 1}
    models = list(dict.fromkeys(r["model"] for r in rows))  # in the order first measured
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), r["batch"], r["chunks"], r["unroll"])):
        b = base.get((r["model"], r["batch"]))
        mem = f"{r['temp_bytes'] / b['temp_bytes']:.2f}" if b else ""
        timed = r["step_seconds"] is not None
        tim = f"{r['step_seconds'] / b['step_seconds']:.2f}" if b and timed and b["step_seconds"] else ""
        loops = "" if r["chunks"] == 1 else "unrolled" if r["unroll"] else "scan"
        step = f"{r['step_seconds']:.2f} s" if timed else "not timed"
        lines.append(f"| {r['model']} | {r['batch']:,} | {r['chunks']} | {loops} | {r['temp_bytes'] / 2**20:,.0f} MiB | "
                     f"{mem} | {step} | {tim} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unroll", nargs="*", default=["resnet18"], choices=list(MODELS),
                        help="models also measured with unrolled chunk loops (k > 1)")
    parser.add_argument("--time-max-batch", type=int, default=1 << 30,
                        help="larger batches: temporaries only (compiled, not run)")
    parser.add_argument("--time-max-gib", type=float, default=12.0,
                        help="steps with more temporaries than this (GiB): not run (this machine has 24 GiB)")
    parser.add_argument("--timed-loops", nargs="*", default=["scan", "unrolled"], choices=["scan", "unrolled"],
                        help="for k > 1, the loop kinds that are timed (the others: temporaries only)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_grad_cache"))
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    # Resumable: the rows of an earlier run with the same --out are kept, only the missing ones measured.
    rows = json.load(open(args.out + ".json")) if os.path.exists(args.out + ".json") else []
    key = lambda r: (r["model"], r["batch"], r["chunks"], r["unroll"])  # noqa: E731
    for name in args.models:
        for batch in args.batches:
            for chunks in args.chunks:
                for unroll in (False, True) if chunks > 1 and name in args.unroll else (False,):
                    loops = "unrolled" if unroll else "scan"
                    timed = batch <= args.time_max_batch and (chunks == 1 or loops in args.timed_loops)
                    old = [r for r in rows if key(r) == (name, batch, chunks, unroll)]
                    too_big = old and old[0]["temp_bytes"] > args.time_max_gib * 2**30
                    if old and (old[0]["step_seconds"] is not None or not timed or too_big):
                        continue  # measured before, as far as this machine can
                    rows = [r for r in rows if key(r) != (name, batch, chunks, unroll)]
                    rows.append(measure(name, batch, chunks, args.repeats, unroll, timed, args.time_max_gib * 2**30))
                    print(json.dumps(rows[-1]), flush=True)
                    with open(args.out + ".json", "w") as f:
                        json.dump(rows, f, indent=1)
    table = report(rows)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
