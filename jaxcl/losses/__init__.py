"""Contrastive and self-supervised losses: pure JAX functions returning a scalar mean.

Every softmax/sigmoid-family loss is written against the similarity reductions of `jaxcl.ops` and
takes `impl=` to choose the engine.

| family | functions |
|---|---|
| softmax, positives on the diagonal | infonce, nt_xent, dcl, dclw, clip, grouped_itc (CLIP within groups) |
| softmax, label / view / soft positives | supcon, focal_supcon, multiview_infonce, mv_dhel, cwcl, symile |
| softmax, hard negatives weighted or mined (`hard_negatives`) | hn_nce, ce_clip, dual_view_moco |
| softmax, false negatives kept out of the denominator (`false_negatives`) | decoupled_softmax, positive_aware_infonce |
| clusters define positives and negatives (`clustering`) | subclass_kmeans, sbcl, mcl_cluster_ids, mcl_nt_xent, mlcd, pamc |
| arbitrary positive pairs in gated subspaces (`gated_pairs`) | gated_pair_infonce |
| sigmoid | siglip |
| classification of caption nouns / identities (`classification`) | catlip (+ catlip_targets), unpg |
| sentence embeddings (`sentence`) | simcse, diffcse, micse, mcse, quick_thoughts |
| metric learning | triplet, batch_hard_triplet |
| geometry | alignment, uniformity |
| softmax, nearest-neighbour positives from a support set | nnclr |
| online clustering against prototypes | swav, sinkhorn_knopp |
| non-contrastive | negative_cosine, barlow_twins, vicreg |
| dense and sequence: feature maps, patches, positions (`spatial`) | patch_nce, cpc, pixpro |
| wrappers | matryoshka |
| metric (no gradient) | retrieval_accuracy (in-batch top-1, both directions) |

Each module of `jaxcl/losses` holds one family; docs/objectives.md lists every loss by its paper.

Sharded batches. Every loss that takes `impl=` also takes `axis_name=` and `mesh=` to compute the loss
of a batch split over devices, against every negative of the global batch, with
`impl="allgather" | "ring" | "auto"` (`jaxcl.ops.sharded`): clip, grouped_itc, siglip, infonce (with a
MoCo queue too), nt_xent, dcl, dclw, supcon, macl, hn_nce, mcl_nt_xent, nnclr, albef_itc, m3co,
similarity_distillation, softclip, cacr, contrastive_gap, gram, gram_negatives, cwcl, symile, gated_pair_infonce, meru,
sbcl, multiview_infonce, mv_dhel, one_to_k_clip, poly_view, uniformity, ce_clip, dual_view_moco, csr,
csr_contrastive, decoupled_softmax, filip, focal_clip, isogclr, isogclr_clip, focal_supcon, patch_nce, cpc,
unpg, simcse, diffcse, micse, mcse and quick_thoughts.
A loss whose formula needs every pair (a top k, a token-wise max, gram's volumes, meru's Lorentz
distances, unpg's whisker filter) gathers the keys for "ring" too, computes this device's rows densely,
and says so. A stack of views (V, B, D) is split along B. mlcd takes them too, with its class centres,
not the batch, split over the devices:

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
from jaxcl.losses.classification import catlip, catlip_targets, unpg
from jaxcl.losses.clip import clip, grouped_itc, siglip
from jaxcl.losses.clustering import mcl_cluster_ids, mcl_nt_xent, mlcd, pamc, sbcl, subclass_kmeans
from jaxcl.losses.crossmodal import cwcl, symile
from jaxcl.losses.distill import albef_itc, m3co, similarity_distillation, softclip
from jaxcl.losses.false_negatives import decoupled_softmax, positive_aware_infonce
from jaxcl.losses.gated_pairs import gated_pair_infonce
from jaxcl.losses.geometric import GramNegatives, cacr, contrastive_gap, gram, gram_negatives, gram_volume
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
from jaxcl.losses.sentence import diffcse, mcse, micse, quick_thoughts, simcse
from jaxcl.losses.snr import snr_distance, snr_triplet
from jaxcl.losses.spatial import cpc, patch_nce, pixpro
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
    IsogclrClipOutput,
    IsogclrClipState,
    IsogclrOutput,
    IsogclrState,
    amcl,
    focal_clip,
    isogclr,
    isogclr_clip,
    isogclr_clip_state,
    isogclr_state,
    macl,
)

__all__ = [
    "CSROutput",
    "CeClipOutput",
    "GramNegatives",
    "IsogclrClipOutput",
    "IsogclrClipState",
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
    "catlip",
    "catlip_targets",
    "ce_clip",
    "clip",
    "contrastive_gap",
    "cpc",
    "csr",
    "csr_contrastive",
    "cwcl",
    "dcl",
    "dclw",
    "decoupled_softmax",
    "diffcse",
    "dual_view_moco",
    "entailment_cone",
    "exterior_angle",
    "filip",
    "filip_similarity",
    "focal_clip",
    "focal_supcon",
    "gated_pair_infonce",
    "gram",
    "gram_negatives",
    "gram_volume",
    "grouped_itc",
    "half_aperture",
    "hn_nce",
    "infonce",
    "isogclr",
    "isogclr_clip",
    "isogclr_clip_state",
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
    "mcse",
    "meru",
    "micse",
    "mlcd",
    "multiview_infonce",
    "mv_dhel",
    "negative_cosine",
    "nnclr",
    "nt_xent",
    "one_to_k_clip",
    "pamc",
    "patch_nce",
    "pixpro",
    "poly_view",
    "positive_aware_infonce",
    "quick_thoughts",
    "retrieval_accuracy",
    "sae_decode",
    "sae_encode",
    "sae_pre_activation",
    "sbcl",
    "siglip",
    "simcse",
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
    "unpg",
    "vicreg",
]
