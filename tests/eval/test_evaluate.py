"""jaxcl.eval.evaluate (`evaluate_embeddings`, kNN and linear probe together) and the package's exports."""

from jaxcl import eval as ev
from jaxcl.eval import knn, linear_probe, retrieval
from tests.helpers import blobs


def test_evaluate_embeddings():
  x, y = blobs(23, 30, 4, 12, spread=0.45)
  out = ev.evaluate_embeddings(x[:80], y[:80], x[80:], y[80:], num_classes=4, knn_k=10)
  assert set(out) == {"knn_accuracy", "linear_probe_accuracy"}
  assert all(isinstance(v, float) for v in out.values())
  knn_acc = knn.knn_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4, k=10)
  probe_acc = linear_probe.linear_probe_accuracy(x[:80], y[:80], x[80:], y[80:], num_classes=4)
  assert out == {"knn_accuracy": float(knn_acc), "linear_probe_accuracy": float(probe_acc)}
  assert 0.4 < out["knn_accuracy"] <= 1.0 and 0.4 < out["linear_probe_accuracy"] <= 1.0


def test_package_exports():
  for name in ev.__all__:
    assert getattr(ev, name) is not None
  assert ev.knn_predict is knn.knn_predict and ev.retrieval_recall is retrieval.retrieval_recall
