"""Contrastive and self-supervised losses: pure JAX functions returning a scalar mean.

Every softmax/sigmoid-family loss is written against the similarity reductions of `jaxcl.ops` and
takes `impl=` to choose the engine.

| family | functions |
|---|---|
| softmax, positives on the diagonal | infonce, nt_xent, dcl, dclw, clip |
| softmax, label / view / soft positives | supcon, multiview_infonce, mv_dhel, cwcl, symile |
| sigmoid | siglip |
| metric learning | triplet, batch_hard_triplet |
| geometry | alignment, uniformity |
| non-contrastive | negative_cosine, barlow_twins, vicreg |
| wrappers | matryoshka |
"""

from jaxcl.losses._common import l2_normalize
from jaxcl.losses.clip import clip, siglip
from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.geometry import alignment, uniformity
from jaxcl.losses.infonce import dcl, dclw, infonce, nt_xent
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.metric import batch_hard_triplet, triplet
from jaxcl.losses.multiview import multiview_infonce, mv_dhel
from jaxcl.losses.predictive import negative_cosine
from jaxcl.losses.redundancy import barlow_twins, vicreg
from jaxcl.losses.supcon import supcon

__all__ = [
    "alignment",
    "barlow_twins",
    "batch_hard_triplet",
    "clip",
    "cwcl",
    "dcl",
    "dclw",
    "infonce",
    "l2_normalize",
    "matryoshka",
    "multiview_infonce",
    "mv_dhel",
    "negative_cosine",
    "nt_xent",
    "siglip",
    "supcon",
    "symile",
    "triplet",
    "uniformity",
    "vicreg",
]
