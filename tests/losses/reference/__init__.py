"""Independent float64 NumPy references, one module per loss module of jaxcl/losses (same name), and the
shared primitives in `common`. Use as `from tests.losses import reference` then `reference.clip.siglip(...)`,
or import one module: `from tests.losses.reference import infonce as ref`."""

from tests.losses.reference import alignment_uniformity
from tests.losses.reference import classification
from tests.losses.reference import clip
from tests.losses.reference import clustering
from tests.losses.reference import common
from tests.losses.reference import crossmodal
from tests.losses.reference import distill
from tests.losses.reference import false_negatives
from tests.losses.reference import gated_pairs
from tests.losses.reference import geometric
from tests.losses.reference import hard_negatives
from tests.losses.reference import hyperbolic
from tests.losses.reference import infonce
from tests.losses.reference import late_interaction
from tests.losses.reference import matryoshka
from tests.losses.reference import matryoshka_2d
from tests.losses.reference import multipositive
from tests.losses.reference import multiview
from tests.losses.reference import nearest_neighbour
from tests.losses.reference import predictive
from tests.losses.reference import prototypes
from tests.losses.reference import redundancy
from tests.losses.reference import sentence
from tests.losses.reference import snr
from tests.losses.reference import spatial
from tests.losses.reference import sparse_coding
from tests.losses.reference import supcon
from tests.losses.reference import temperature
from tests.losses.reference import triplet

__all__ = ["alignment_uniformity", "classification", "clip", "clustering", "common", "crossmodal", "distill", "false_negatives", "gated_pairs", "geometric", "hard_negatives", "hyperbolic", "infonce", "late_interaction", "matryoshka", "matryoshka_2d", "multipositive", "multiview", "nearest_neighbour", "predictive", "prototypes", "redundancy", "sentence", "snr", "sparse_coding", "spatial", "supcon", "temperature", "triplet"]
