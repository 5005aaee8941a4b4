"""Contrastive and self-supervised losses: pure JAX functions returning a scalar mean.

Every softmax/sigmoid-family loss is written against the similarity reductions of `jaxcl.ops` and
takes `impl=` to choose the engine.

| family | functions |
|---|---|
| softmax, positives on the diagonal | infonce, nt_xent, dcl, dclw, clip |
| softmax, label / view / soft positives | supcon, focal_supcon, multiview_infonce, mv_dhel, cwcl, symile |
| softmax, hard negatives weighted or mined (`hard_negatives`) | hn_nce, ce_clip, dual_view_moco |
| softmax, false negatives kept out of the denominator (`false_negatives`) | decoupled_softmax, positive_aware_infonce |
| clusters define positives and negatives (`clustering`) | subclass_kmeans, sbcl, mcl_cluster_ids, mcl_nt_xent, mlcd |
| arbitrary positive pairs in gated subspaces (`gated_pairs`) | gated_pair_infonce |
| sigmoid | siglip |
| metric learning | triplet, batch_hard_triplet |
| geometry | alignment, uniformity |
| softmax, nearest-neighbour positives from a support set | nnclr |
| online clustering against prototypes | swav, sinkhorn_knopp |
| non-contrastive | negative_cosine, barlow_twins, vicreg |
| wrappers | matryoshka |
| metric (no gradient) | retrieval_accuracy (in-batch top-1, both directions) |

Each module of `jaxcl/losses` holds one family; docs/objectives.md lists every loss by its paper.

Sharded batches. clip, siglip, infonce (with a MoCo queue too), nt_xent, dcl, dclw, supcon, macl,
hn_nce, mcl_nt_xent, nnclr, ce_clip, dual_view_moco, csr, csr_contrastive, decoupled_softmax, filip,
focal_clip, isogclr and focal_supcon take `axis_name=` and `mesh=` to compute the loss of a batch split
over devices, against every negative of the global batch, with `impl="allgather" | "ring" | "auto"`
(`jaxcl.ops.sharded`; a loss whose formula needs every pair, e.g. a top k or a token-wise max, gathers
the keys on both engines and says so):

- inside your own `jax.shard_map(..., in_specs=P("data"))`: pass the local shards and
  `axis_name="data"`; the result is the global loss, the same on every device;
- on globally sharded `jax.Array`s under `jax.jit`: pass `impl="ring"` (or "allgather") and either
  `mesh=` or nothing inside `with jax.set_mesh(mesh):`; the batch axis is split over mesh axis
  `axis_name` (default "data") and the loss wraps itself in `shard_map`. The default `impl="auto"`
  does this by itself when the batch is split over more than one device (the axes of its Explicit
  sharding, else the mesh's "data" axis), picking allgather or ring by size.

`impl="dense"` on sharded arrays is partitioned by XLA (GSPMD), the baseline that holds a (B/n, B)
block of S per device. Ids in masks are global; see docs/distributed.md.
"""

from jaxcl.losses._common import l2_normalize
from jaxcl.losses.accuracy import RetrievalAccuracy, retrieval_accuracy
from jaxcl.losses.clip import clip, siglip
from jaxcl.losses.clustering import mcl_cluster_ids, mcl_nt_xent, mlcd, sbcl, subclass_kmeans
from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.distill import albef_itc, m3co, similarity_distillation, softclip
from jaxcl.losses.false_negatives import decoupled_softmax, positive_aware_infonce
from jaxcl.losses.gated_pairs import gated_pair_infonce
from jaxcl.losses.geometric import cacr, contrastive_gap, gram, gram_volume
from jaxcl.losses.alignment_uniformity import alignment, uniformity
from jaxcl.losses.hard_negatives import CeClipOutput, ce_clip, dual_view_moco, hn_nce
from jaxcl.losses.hyperbolic import (
    entailment_cone,
    exterior_angle,
    half_aperture,
    lorentz_distance,
    lorentz_expmap0,
    meru,
)
from jaxcl.losses.late_interaction import filip, filip_similarity
from jaxcl.losses.infonce import dcl, dclw, infonce, nt_xent
from jaxcl.losses.matryoshka import matryoshka
from jaxcl.losses.matryoshka_2d import STARBUCKS_PAIRS, layer_kl, matryoshka_2d, starbucks
from jaxcl.losses.nearest_neighbour import nnclr
from jaxcl.losses.prototypes import sinkhorn_knopp, swav
from jaxcl.losses.triplet import batch_hard_triplet, triplet
from jaxcl.losses.snr import snr_distance, snr_triplet
from jaxcl.losses.spherical_z import spherical_z_contrastive, spherical_z_loss
from jaxcl.losses.multipositive import one_to_k_clip, poly_view
from jaxcl.losses.multiview import multiview_infonce, mv_dhel
from jaxcl.losses.predictive import negative_cosine
from jaxcl.losses.redundancy import barlow_twins, vicreg
from jaxcl.losses.sparse_coding import (
    CSROutput,
    csr,
    csr_contrastive,
    sae_decode,
    sae_encode,
    sae_pre_activation,
    topk_activation,
    topk_mask,
)
from jaxcl.losses.supcon import focal_supcon, supcon
from jaxcl.losses.temperature import (
    IsogclrOutput,
    IsogclrState,
    amcl,
    focal_clip,
    isogclr,
    isogclr_state,
    macl,
)

__all__ = [
    "CSROutput",
    "CeClipOutput",
    "IsogclrOutput",
    "IsogclrState",
    "RetrievalAccuracy",
    "STARBUCKS_PAIRS",
    "albef_itc",
    "alignment",
    "amcl",
    "barlow_twins",
    "batch_hard_triplet",
    "cacr",
    "ce_clip",
    "clip",
    "contrastive_gap",
    "csr",
    "csr_contrastive",
    "cwcl",
    "dcl",
    "dclw",
    "decoupled_softmax",
    "dual_view_moco",
    "entailment_cone",
    "exterior_angle",
    "filip",
    "filip_similarity",
    "focal_clip",
    "focal_supcon",
    "gated_pair_infonce",
    "gram",
    "gram_volume",
    "half_aperture",
    "hn_nce",
    "infonce",
    "isogclr",
    "isogclr_state",
    "l2_normalize",
    "layer_kl",
    "lorentz_distance",
    "lorentz_expmap0",
    "m3co",
    "macl",
    "matryoshka",
    "matryoshka_2d",
    "mcl_cluster_ids",
    "mcl_nt_xent",
    "meru",
    "mlcd",
    "multiview_infonce",
    "mv_dhel",
    "negative_cosine",
    "nnclr",
    "nt_xent",
    "one_to_k_clip",
    "poly_view",
    "positive_aware_infonce",
    "retrieval_accuracy",
    "sae_decode",
    "sae_encode",
    "sae_pre_activation",
    "sbcl",
    "siglip",
    "similarity_distillation",
    "sinkhorn_knopp",
    "snr_distance",
    "snr_triplet",
    "softclip",
    "spherical_z_contrastive",
    "spherical_z_loss",
    "starbucks",
    "subclass_kmeans",
    "supcon",
    "swav",
    "symile",
    "topk_activation",
    "topk_mask",
    "triplet",
    "uniformity",
    "vicreg",
]
