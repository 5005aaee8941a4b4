"""jaxcl.eval.linear_probe against sklearn's logistic regression."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.eval import linear_probe
from tests.helpers import blobs


def test_linear_probe_separable_data_is_perfect():
  x, y = blobs(9, 30, 4, 12, spread=0.05)
  test_acc, train_acc = linear_probe.linear_probe_accuracy(
      x[:80], y[:80], x[80:], y[80:], num_classes=4, return_train_accuracy=True
  )
  assert float(test_acc) == 1.0 and float(train_acc) == 1.0


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(0).permutation(len(y))
  x, y = x[perm].astype(np.float32), y[perm].astype(np.int32)
  return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.mark.parametrize("l2", [1e-4, 1e-2])
def test_linear_probe_matches_sklearn_logistic_regression_on_digits(digits, l2):
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  train_x, train_y, test_x, test_y = digits
  scaler = StandardScaler().fit(train_x.astype(np.float64))
  z_train, z_test = scaler.transform(train_x), scaler.transform(test_x)
  clf = LogisticRegression(C=1.0 / (l2 * len(train_y)), max_iter=10_000, tol=1e-10).fit(z_train, train_y)
  probe = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10, l2=l2)
  got = np.asarray(probe.predict(test_x))
  want = clf.predict(z_test)
  assert abs(np.mean(got == test_y) - np.mean(want == test_y)) <= 0.03
  assert np.mean(got == want) >= 0.98
  assert np.mean(got == test_y) > 0.9

  # Same objective (mean cross-entropy + l2/2 ‖W‖², bias free) evaluated in float64 at both solutions.
  def objective(w, b):
    logits = z_train @ w + b
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return np.mean(lse - logits[np.arange(len(train_y)), train_y]) + 0.5 * l2 * np.sum(w * w)

  np.testing.assert_allclose(np.asarray(probe.mean), scaler.mean_, rtol=1e-5, atol=1e-5)
  ours = objective(np.asarray(probe.weights, np.float64), np.asarray(probe.bias, np.float64))
  theirs = objective(clf.coef_.T, clf.intercept_)
  assert ours <= theirs * (1 + 1e-4) + 1e-6


def test_linear_probe_is_deterministic_and_adam_agrees(digits):
  train_x, train_y, test_x, test_y = digits
  a = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10)
  b = linear_probe.linear_probe_fit(train_x, train_y, num_classes=10)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  # Blank pixels have zero variance: their scale is 1, not 0 (no NaN).
  blank = train_x.std(0) == 0
  assert blank.any() and np.all(np.asarray(a.scale)[blank] == 1.0) and np.all(np.isfinite(a.weights))
  lbfgs = float(linear_probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10))
  adam = float(linear_probe.linear_probe_accuracy(
      train_x, train_y, test_x, test_y, num_classes=10, optimizer="adam", steps=300, learning_rate=0.01
  ))
  assert abs(lbfgs - adam) <= 0.05


def test_linear_probe_bf16_features():
  x, y = blobs(10, 30, 4, 12, spread=0.3)
  lo = linear_probe.linear_probe_accuracy(
      jnp.asarray(x[:80], jnp.bfloat16), y[:80], jnp.asarray(x[80:], jnp.bfloat16), y[80:], num_classes=4
  )
  hi = linear_probe.linear_probe_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4)
  assert lo.dtype == jnp.float32 and abs(float(lo) - float(hi)) <= 0.05


# ------------------------------------------------------------------------------------------ bad inputs
E = np.ones((6, 4), np.float32)


L = np.array([0, 1, 2, 0, 1, 2], np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: linear_probe.linear_probe_accuracy(E, L, np.ones((2, 3)), L[:2], num_classes=3), r"`train_x` and `test_x` must have the same feature size"),
        (lambda: linear_probe.linear_probe_accuracy(E, L, E, L, num_classes=2), r"`test_y` must lie in \[0, 2\)"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, l2=-1.0), r"`l2` must be non-negative"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, optimizer="sgd"), r"`optimizer` must be one of"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=3, steps=0), r"`steps` must be a positive integer"),
        (lambda: linear_probe.linear_probe_fit(E, L, num_classes=0), r"`num_classes` must be a positive integer"),
        (lambda: linear_probe.linear_probe_fit(E.astype(np.int32), L, num_classes=3), r"`train_x` must be a floating-point array"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
