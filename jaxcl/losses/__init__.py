"""Contrastive and self-supervised losses: pure JAX functions returning a scalar mean.

Every softmax/sigmoid-family loss is written against the similarity reductions of `jaxcl.ops` and
takes `impl=` to choose the engine.
"""

from jaxcl.losses._common import l2_normalize
from jaxcl.losses.clip import clip, siglip
from jaxcl.losses.infonce import dcl, dclw, infonce, nt_xent

__all__ = [
    "clip",
    "dcl",
    "dclw",
    "infonce",
    "l2_normalize",
    "nt_xent",
    "siglip",
]
