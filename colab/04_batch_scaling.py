# ---
# jupyter:
#   colab:
#     provenance: []
#     toc_visible: true
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Scaling the batch: dense vs blockwise (vs pallas)
#
# The CLIP loss's forward + backward pass against the batch size B, per similarity engine:
# - **time**: `jax.jit(jax.value_and_grad(...))`, compiled and warmed up, median of repeated calls,
#   each ended by `block_until_ready`;
# - **memory**: compiled temporaries (`memory_analysis().temp_size_in_bytes`, everything beyond the
#   embeddings and their gradients).
#
# `dense` materialises the B×B similarity matrix: memory grows like B². `blockwise` (pure JAX, column
# tiles, a custom VJP that recomputes tiles) and `pallas` (fused kernels) keep it O(B·D); time grows
# like B² for all of them. On a CPU runtime `pallas` runs in interpret mode, so it is only measured at
# small B there. `experiments/bench_loss.py` is the full benchmark behind the README table.

# %%
# jaxcl must be installed with its training extra (locally: `pip install -e '.[train]'` in your clone). On
# Colab, install it first, in a cell above, from your own copy of the repository:
#   your clone (on Google Drive, or cloned into /content):  !pip install -q '/path/to/jaxcl[train]'
#   or a wheel: `python -m build` in your clone, upload dist/jaxcl-*.whl, then
#   !pip install -q "$(ls /content/jaxcl-*.whl)[train]"
try:
  import jaxcl
except ImportError as error:
  raise ImportError(
      "jaxcl is not installed. Install it from your copy of the repository in a cell above, then rerun:\n"
      "  your clone:  !pip install -q '/path/to/jaxcl[train]'   (pip install -e for an editable install,\n"
      "               then Runtime > Restart session)\n"
      "  a wheel:     run `python -m build` in your clone, upload dist/jaxcl-*.whl to Colab, then\n"
      '               !pip install -q "$(ls /content/jaxcl-*.whl)[train]"'
  ) from error
print("jaxcl", jaxcl.__version__)

# %%
import os

BATCHES = [int(b) for b in os.environ.get("JAXCL_NB_BATCHES", "256,512,1024,2048,4096,8192,16384").split(",")]
DIM = int(os.environ.get("JAXCL_NB_DIM", 128))
REPEATS = int(os.environ.get("JAXCL_NB_REPEATS", 5))
MEMORY_BUDGET_GB = float(os.environ.get("JAXCL_NB_MEMORY_BUDGET_GB", 4))  # skip what would not fit
PALLAS_INTERPRET_MAX_B = int(os.environ.get("JAXCL_NB_PALLAS_INTERPRET_MAX_B", 2048))

# %%
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxcl import losses, ops

backend = jax.default_backend()
engines = [e for e in ("dense", "blockwise", "pallas") if e in ops.available_impls()]
print("backend:", backend, jax.devices()[0].device_kind, "| engines:", engines)


# %%
def step_fn(impl):
  loss = lambda a, b: losses.clip(a, b, logit_scale=1 / 0.07, impl=impl)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

def measure(impl, batch):
  shape = jax.ShapeDtypeStruct((batch, DIM), jnp.float32)
  compiled = step_fn(impl).lower(shape, shape).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  if temp > MEMORY_BUDGET_GB * 2**30:
    return None, temp
  ka, kb = jax.random.split(jax.random.key(batch))
  a, b = jax.random.normal(ka, (batch, DIM)), jax.random.normal(kb, (batch, DIM))
  jax.block_until_ready(compiled(a, b))  # warm-up
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(compiled(a, b))
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp

results = {}
for impl in engines:
  for batch in BATCHES:
    if impl == "pallas" and backend == "cpu" and batch > PALLAS_INTERPRET_MAX_B:
      continue
    seconds, temp = measure(impl, batch)
    results[impl, batch] = (seconds, temp)
    ms = "over budget" if seconds is None else f"{seconds * 1e3:10.2f} ms"
    print(f"{impl:>10}  B={batch:>6}  {ms:>14}  temporaries {temp / 2**20:10.1f} MiB")


# %% [markdown]
# ## Plots and log–log slopes
#
# Slopes of log(time) and log(memory) against log(B) over the measured points: ≈ 2 for time on every
# engine once B is large enough to keep the device busy; ≈ 2 for dense memory and ≈ 1 for blockwise
# and pallas.

# %%
def slope(xs, ys):
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) >= 2 else float("nan")

fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
for impl in engines:
  timed = [(b, s) for (i, b), (s, _) in results.items() if i == impl and s is not None]
  mem = [(b, m) for (i, b), (_, m) in results.items() if i == impl]
  if timed:
    axes[0].plot(*zip(*timed), marker="o", label=f"{impl} (slope {slope(*zip(*timed)):.2f})")
  if mem:
    bs, ms = zip(*mem)
    axes[1].plot(bs, np.array(ms) / 2**20, marker="o", label=f"{impl} (slope {slope(bs, ms):.2f})")
axes[0].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="seconds (fwd + bwd)",
            title=f"CLIP loss time, D = {DIM}, {backend}")
axes[1].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="compiled temporaries (MiB)",
            title="Memory beyond inputs and gradients")
for ax in axes:
  ax.minorticks_off()
  ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
  ax.legend()
plt.tight_layout()
plt.show()
print("impl='auto' picks:", {b: ops.resolve_impl("auto", b, b) for b in BATCHES})
