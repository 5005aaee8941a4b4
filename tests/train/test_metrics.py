"""jaxcl/train/metrics.py: the PNG plots are valid images, and drawing them leaves the caller's
matplotlib backend (and pyplot's figures) as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import ROOT


# A user who chose a backend (svg: non-interactive, so it runs headless), then imports the trainer and
# writes the plots, first without pyplot imported, then with pyplot imported and a figure of their own.
_SCRIPT = r"""
import json, sys
import matplotlib
matplotlib.use("svg")
import numpy as np
from jaxcl.train import loop, metrics  # everything of jaxcl that draws

workdir = sys.argv[1]
writer = metrics.MetricsWriter(workdir, enabled=True)
for step in (1, 2, 3, 4):
  writer.write(step, {"loss": 5.0 - step})
writer.write(4, {"eval/knn_accuracy": 0.5, "eval/linear_probe_accuracy": 0.75})
writer.close()
x = np.random.default_rng(0).normal(size=(40, 6))
first = metrics.write_plots(workdir, metrics.pca_2d(x), np.arange(40) % 4)
pyplot_imported = "matplotlib.pyplot" in sys.modules
import matplotlib.pyplot as plt
mine = plt.figure()
second = metrics.write_plots(workdir)
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot_imported": pyplot_imported,
                  "figures": plt.get_fignums(), "first": first, "second": second}))
"""


def test_write_plots_keeps_the_backend_and_writes_valid_pngs(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["backend"] == "svg"
  assert not result["pyplot_imported"], "jaxcl imported matplotlib.pyplot"
  assert result["figures"] == [1], "jaxcl's figures leaked into pyplot (or closed the user's)"
  names = [os.path.basename(p) for p in result["first"]]
  assert names == ["loss.png", "eval.png", "embedding.png"]
  assert [os.path.basename(p) for p in result["second"]] == ["loss.png", "eval.png"]
  sizes = {"loss.png": (600, 400), "eval.png": (600, 400), "embedding.png": (500, 500)}  # inches × dpi 100
  for name, size in sizes.items():
    path = tmp_path / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
      image.load()
      assert image.size == size
      pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 128 < pixels.max(), f"{name} is blank"  # something was drawn on white
