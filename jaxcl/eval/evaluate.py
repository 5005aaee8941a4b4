"""The standard representation-quality summary the trainer logs: kNN and linear-probe accuracy."""

from __future__ import annotations

import jax

from jaxcl.eval.knn import knn_accuracy
from jaxcl.eval.linear_probe import linear_probe_accuracy


def evaluate_embeddings(
    train_emb: jax.Array,
    train_labels: jax.Array,
    test_emb: jax.Array,
    test_labels: jax.Array,
    *,
    num_classes: int,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    probe_l2: float = 1e-4,
    probe_steps: int = 500,
    chunk: int = 1024,
    linear_probe: bool = True,
) -> dict[str, float]:
  r"""kNN and linear-probe test accuracy of frozen embeddings, as Python floats.

  The two protocols of SimCLR/MoCo evaluation: the weighted kNN of "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination" (Wu et al., 2018) on cosine similarities (`knn_accuracy`),

      knn_accuracy = mean_i [ argmax_c Σ_{j ∈ N_k(x_i), y_j = c} exp(<x̂_i, ẑ_j> / t) = y_i ]

  and a multinomial logistic regression on standardised features fitted with L-BFGS
  (`linear_probe_accuracy`, l2 = `probe_l2`, at most `probe_steps` iterations).

  Args:
    train_emb: (N, D), train_labels: (N,) ints in [0, num_classes): the labelled reference set.
    test_emb: (Q, D), test_labels: (Q,): the evaluation set.
    num_classes: C. knn_k, knn_temperature: kNN k and t. probe_l2, probe_steps: linear probe options.
    chunk: query rows per kNN step (bounds the (chunk, N) similarity block).
    linear_probe: fit the linear probe (False: kNN only).
  Returns:
    {"knn_accuracy": float, "linear_probe_accuracy": float} (no probe entry when `linear_probe=False`).

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.1], [0.9, -0.1], [-0.1, 1.0], [0.1, 0.9]])
  >>> labels = jnp.array([0, 0, 1, 1])
  >>> evaluate_embeddings(emb, labels, emb, labels, num_classes=2)
  {'knn_accuracy': 1.0, 'linear_probe_accuracy': 1.0}
  """
  knn = knn_accuracy(
      train_emb, train_labels, test_emb, test_labels, num_classes=num_classes, k=knn_k,
      temperature=knn_temperature, chunk=chunk,
  )
  if not linear_probe:
    return {"knn_accuracy": float(knn)}
  probe = linear_probe_accuracy(
      train_emb, train_labels, test_emb, test_labels, num_classes=num_classes, l2=probe_l2,
      steps=probe_steps,
  )
  return {"knn_accuracy": float(knn), "linear_probe_accuracy": float(probe)}
