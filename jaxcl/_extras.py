"""The optional parts of jaxcl and what they need installed.

`pip install jaxcl` is the loss API and the similarity engines (`jaxcl.losses`, `jaxcl.ops`,
`jaxcl.grad_cache`, `jaxcl.targets`): jax and numpy only. The training system (`jaxcl.train`,
`jaxcl.models`, `jaxcl.data`, `jaxcl.eval`, `python -m jaxcl.main`, `python -m jaxcl.plan`) needs the
`train` extra: `pip install 'jaxcl[train]'`.
"""

from __future__ import annotations

import importlib.util

# The top-level modules of the `train` extra's distributions (pyproject.toml).
TRAIN_MODULES = ("flax", "optax", "orbax", "etils", "tensorflow_datasets", "grain", "ml_collections",
                 "importlib_resources", "absl",
                 "dm_pix", "sklearn", "PIL", "tensorboardX", "tqdm", "matplotlib", "safetensors", "tokenizers")


def require_train_extra(package: str) -> None:
  """Raises ImportError, saying what to install, when a module of the `train` extra is missing."""
  missing = [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(f"{package} is part of jaxcl's training system, which needs `pip install 'jaxcl[train]'` "
                      f"(not installed: {', '.join(missing)}).")
