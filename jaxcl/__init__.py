"""jaxcl: JAX-native contrastive learning."""

from jaxcl import grad_cache
from jaxcl import losses
from jaxcl import ops

__version__ = "0.1.0"

__all__ = ["grad_cache", "losses", "ops", "__version__"]
