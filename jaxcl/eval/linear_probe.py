"""Linear evaluation: multinomial logistic regression on frozen, standardised features."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import _checks
from jaxcl.eval import _common

_STD_FLOOR = 1e-6


class LinearProbe(NamedTuple):
  """A fitted probe: logits = ((x − mean) / scale) · weights + bias."""

  weights: jax.Array  # (D, C)
  bias: jax.Array  # (C,)
  mean: jax.Array  # (D,)
  scale: jax.Array  # (D,)

  def logits(self, x: jax.Array) -> jax.Array:
    z = (jnp.asarray(x, jnp.float32) - self.mean) / self.scale
    return z @ self.weights + self.bias

  def predict(self, x: jax.Array) -> jax.Array:
    return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)


def _objective(params, z, y, l2):
  w, b = params
  logits = z @ w + b
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.mean(ce) + 0.5 * l2 * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "optimizer"))
def _fit(x, y, l2, learning_rate, tol, *, num_classes, steps, optimizer):
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0)
  scale = jnp.where(std > _STD_FLOOR, std, 1.0)  # constant features (e.g. blank pixels) stay 0
  z = (x - mean) / scale
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  fun = functools.partial(_objective, z=z, y=y, l2=l2)

  if optimizer == "lbfgs":
    opt = optax.lbfgs(learning_rate=learning_rate)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
      return optax.apply_updates(params, updates), state

    def keep_going(carry):
      _, state = carry
      count = optax.tree_utils.tree_get(state, "count")
      grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
      return (count == 0) | ((count < steps) & (grad_norm >= tol))

    params, _ = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
  else:
    opt = optax.adam(learning_rate)

    def adam_step(_, carry):
      params, state = carry
      grad = jax.grad(fun)(params)
      updates, state = opt.update(grad, state, params)
      return optax.apply_updates(params, updates), state

    params, _ = jax.lax.fori_loop(0, steps, adam_step, (params, opt.init(params)))
  return LinearProbe(params[0], params[1], mean, scale)


def linear_probe_fit(
    train_x: jax.Array,
    train_y: jax.Array,
    *,
    num_classes: int,
    l2: float = 1e-4,
    steps: int = 500,
    learning_rate: float | None = None,
    optimizer: str = "lbfgs",
    tol: float = 1e-5,
) -> LinearProbe:
  r"""Fits a multinomial logistic regression on standardised features, full batch, deterministically.

  The linear evaluation protocol of "A Simple Framework for Contrastive Learning of Visual
  Representations" (Chen et al., 2020) and "Momentum Contrast for Unsupervised Visual Representation
  Learning" (He et al., 2020), solved to convergence instead of by SGD. With z = (x − μ) / σ (train
  statistics; σ = 1 for constant features), minimises

      L(W, b) = (1/N) Σ_i −log softmax(z_i W + b)_{y_i}  +  (l2 / 2) ‖W‖²_F

  from W = 0, b = 0 with L-BFGS (`optax.lbfgs`, zoom line search; stops when ‖∇L‖ < tol or after
  `steps` iterations) or `steps` full-batch Adam steps. The bias is not penalised. This equals
  scikit-learn's `LogisticRegression(C=1 / (l2 · N))` on standardised features.

  Args:
    train_x: (N, D) features (any float dtype; fitted in float32). train_y: (N,) ints in [0, C).
    num_classes: C. l2: ridge weight >= 0. steps: maximum iterations.
    learning_rate: L-BFGS: None lets the line search choose the step (recommended), a value scales
      it; Adam: the step size (None means 1e-2).
    optimizer: "lbfgs" or "adam". tol: L-BFGS gradient-norm stopping threshold.
  Returns:
    A `LinearProbe` (weights (D, C), bias (C,), mean (D,), scale (D,)) with `.logits(x)`, `.predict(x)`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0]])
  >>> probe = linear_probe_fit(x, jnp.array([0, 0, 1, 1]), num_classes=2)
  >>> probe.predict(jnp.array([[-1.0], [4.0]]))
  Array([0, 1], dtype=int32)
  """
  train_x = _common.check_embeddings("train_x", train_x)
  num_classes = _common.check_positive_int("num_classes", num_classes)
  train_y = _common.check_class_labels("train_y", train_y, train_x.shape[0], num_classes)
  steps = _common.check_positive_int("steps", steps)
  _checks.check_choice("optimizer", optimizer, ("lbfgs", "adam"))
  l2_value = _checks.concrete_value(l2)
  if l2_value is not None and (not np.all(np.isfinite(l2_value)) or np.any(l2_value < 0)):
    raise ValueError(f"`l2` must be non-negative and finite, got {l2_value}.")
  if learning_rate is not None:
    _checks.check_positive("learning_rate", learning_rate)
  elif optimizer == "adam":
    learning_rate = 1e-2
  _checks.check_positive("tol", tol)
  lr = None if learning_rate is None else jnp.asarray(learning_rate, jnp.float32)
  return _fit(
      train_x.astype(jnp.float32), train_y, jnp.asarray(l2, jnp.float32), lr, jnp.asarray(tol, jnp.float32),
      num_classes=num_classes, steps=steps, optimizer=optimizer,
  )


def linear_probe_accuracy(
    train_x: jax.Array,
    train_y: jax.Array,
    test_x: jax.Array,
    test_y: jax.Array,
    *,
    num_classes: int,
    l2: float = 1e-4,
    steps: int = 500,
    learning_rate: float | None = None,
    optimizer: str = "lbfgs",
    tol: float = 1e-5,
    return_train_accuracy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Test accuracy of a linear probe fitted on (train_x, train_y), see `linear_probe_fit`.

  Linear evaluation of "A Simple Framework for Contrastive Learning of Visual Representations" (Chen
  et al., 2020): standardise with train statistics, fit

      min_{W,b} (1/N) Σ_i CE(softmax(z_i W + b), y_i) + (l2 / 2) ‖W‖²_F,

  then accuracy = mean_i [argmax_c (z_i W + b)_c = y_i] on the test set.

  Returns:
    The float32 test accuracy, or (test accuracy, train accuracy) with `return_train_accuracy=True`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0]])
  >>> y = jnp.array([0, 0, 1, 1])
  >>> float(linear_probe_accuracy(x, y, jnp.array([[0.5], [2.5]]), jnp.array([0, 0]), num_classes=2))
  0.5
  """
  test_x = _common.check_embeddings("test_x", test_x)
  train_x = _common.check_embeddings("train_x", train_x)
  _common.check_same_dim("train_x", train_x, "test_x", test_x)
  num_classes = _common.check_positive_int("num_classes", num_classes)
  test_y = _common.check_class_labels("test_y", test_y, test_x.shape[0], num_classes)
  probe = linear_probe_fit(
      train_x, train_y, num_classes=num_classes, l2=l2, steps=steps, learning_rate=learning_rate,
      optimizer=optimizer, tol=tol,
  )
  test_acc = jnp.mean((probe.predict(test_x) == test_y).astype(jnp.float32))
  if not return_train_accuracy:
    return test_acc
  train_y = jnp.asarray(train_y, jnp.int32)
  return test_acc, jnp.mean((probe.predict(train_x) == train_y).astype(jnp.float32))
