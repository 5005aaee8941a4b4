"""A one-screen demonstration of the functional loss API: `python -m jaxcl.demo`."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxcl import losses, ops


def main(batch: int = 512, dim: int = 128) -> None:
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (batch, dim))
  b = a + 0.5 * jax.random.normal(k2, (batch, dim))  # noisy positives
  table = {
      "infonce": lambda x, y: losses.infonce(x, y, temperature=0.1),
      "nt_xent": lambda x, y: losses.nt_xent(x, y, temperature=0.5),
      "dcl": lambda x, y: losses.dcl(x, y, temperature=0.1),
      "clip": lambda x, y: losses.clip(x, y, logit_scale=1 / 0.07),
      "siglip": lambda x, y: losses.siglip(x, y, logit_scale=10.0, logit_bias=-10.0),
  }
  print(f"jaxcl losses on B={batch}, D={dim} (engines available: {', '.join(ops.available_impls())})")
  print(f"{'loss':<10}{'value':>10}{'|grad|':>12}{'ms (jit, fwd+bwd)':>20}")
  for name, fn in table.items():
    step = jax.jit(jax.value_and_grad(fn))
    value, grad = step(a, b)
    jax.block_until_ready(grad)
    start = time.perf_counter()
    for _ in range(10):
      value, grad = step(a, b)
    jax.block_until_ready(grad)
    ms = (time.perf_counter() - start) / 10 * 1e3
    print(f"{name:<10}{float(value):>10.4f}{float(jnp.linalg.norm(grad)):>12.4f}{ms:>20.2f}")


if __name__ == "__main__":
  main()
