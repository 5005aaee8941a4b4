"""Non-finite values: which parts of a train state hold NaN or ±inf, and the message naming them.

`finite_parts` runs inside the step (the update is not applied when a part would become non-finite),
`nonfinite_leaves` on the host (a restored checkpoint), `nonfinite_message` when a step is reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss, gradient or updated state and `on_nonfinite == "stop"`."""


def _floating_leaves(tree) -> list[tuple[str, jax.Array]]:
  """(path, array) of the floating-point leaves of `tree` (the ones that can hold NaN or ±inf)."""
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def finite_parts(state) -> dict[str, jax.Array]:
  """{part: all(isfinite(x)) over every floating leaf x of that part of `state`} (traced in the step).
  The parts are the fields of the state ("params", "opt_state", ...), the method state's entries one by
  one ("method_state/target", "method_state/queue")."""
  parts = {}
  for field in dataclasses.fields(state):
    value = getattr(state, field.name)
    named = ({f"{field.name}/{k}": v for k, v in value.items()}
             if field.name == "method_state" and isinstance(value, dict) else {field.name: value})
    for name, part in named.items():
      leaves = [x for _, x in _floating_leaves(part)]
      if leaves:
        parts[name] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return parts


def nonfinite_leaves(tree) -> list[str]:
  """The paths ("params/encoder/dense0/kernel") of the floating leaves of `tree` holding a NaN or ±inf;
  [] when all are finite.

  One jitted computation on the devices, all(isfinite(x)) of every leaf stacked into one (L,) vector
  (replicated), and one transfer of those L booleans; no host loop over the arrays.
  """
  named = _floating_leaves(tree)
  if not named:
    return []
  names, leaves = zip(*named)
  sharding = getattr(leaves[0], "sharding", None)
  out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
  ok = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]), out_shardings=out)(list(leaves))
  return [name for name, good in zip(names, np.asarray(ok)) if not good]


def nonfinite_message(step: int, m: dict) -> str:
  """Names the step and what was not finite: the loss, the gradients of which parameters, and which
  fields of the updated state (`m["state_finite"]`, e.g. "params, opt_state")."""
  loss = float(m["loss"])
  parts = []
  if not np.isfinite(loss):
    parts.append(f"the loss is {loss}")
  bad = [jax.tree_util.keystr(path, simple=True, separator="/")
         for path, ok in jax.tree_util.tree_leaves_with_path(m["grad_finite"]) if not bool(ok)]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    parts.append(f"the gradient of {len(bad)} parameter array(s) is not finite ({shown}; gradient norm "
                 f"{float(m['grad_norm'])})")
  elif not np.isfinite(float(m["grad_norm"])):
    parts.append(f"the gradient norm is {float(m['grad_norm'])}")
  bad_state = [field for field, ok in m.get("state_finite", {}).items() if not bool(ok)]
  if bad_state:
    parts.append(f"the updated state would hold them in {', '.join(bad_state)}")
  return f"step {step}: non-finite values: " + "; ".join(parts or ["(unknown quantity)"])
