"""The training system: one loop for every method (`loop.train_and_evaluate`), configs, optimizers."""

from jaxcl import _extras

_extras.require_train_extra("jaxcl.train")
