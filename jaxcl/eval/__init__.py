"""Evaluation of learned embeddings: kNN, linear probe, zero-shot, retrieval Recall@K and geometry.

Pure functions on (N, D) embedding arrays. Similarities are computed a chunk of query rows at a time,
so no function materialises more than a (chunk, N) block.
"""

from jaxcl import _extras

_extras.require_train_extra("jaxcl.eval")  # before the imports below, which need it

from jaxcl.eval.crossmodal import (
    dbnorm_scores,
    description_accuracy,
    description_scores,
    gallery_log_normalizer,
    hubness,
    remove_modality_gap,
)
from jaxcl.eval.evaluate import evaluate_embeddings
from jaxcl.eval.geometry import alignment_uniformity, effective_rank, modality_gap
from jaxcl.eval.knn import knn_accuracy, knn_class_scores, knn_predict
from jaxcl.eval.linear_probe import LinearProbe, linear_probe_accuracy, linear_probe_fit
from jaxcl.eval.retrieval import retrieval_recall
from jaxcl.eval.zero_shot import class_embeddings, zero_shot_accuracy, zero_shot_logits

__all__ = [
    "LinearProbe",
    "alignment_uniformity",
    "class_embeddings",
    "dbnorm_scores",
    "description_accuracy",
    "description_scores",
    "effective_rank",
    "evaluate_embeddings",
    "gallery_log_normalizer",
    "hubness",
    "knn_accuracy",
    "knn_class_scores",
    "knn_predict",
    "linear_probe_accuracy",
    "linear_probe_fit",
    "modality_gap",
    "remove_modality_gap",
    "retrieval_recall",
    "zero_shot_accuracy",
    "zero_shot_logits",
]
