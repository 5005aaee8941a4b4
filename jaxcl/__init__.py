"""jaxcl: JAX-native contrastive learning."""

from jaxcl import losses
from jaxcl import ops

__version__ = "0.1.0"

__all__ = ["losses", "ops", "__version__"]
