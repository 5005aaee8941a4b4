"""Test configuration: 8 host CPU devices (for sharding tests), set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += "" if "device_count" in os.environ["XLA_FLAGS"] else (
    " --xla_force_host_platform_device_count=8"
)
# The suite's programs are small and compiled once each, so compile time dominates it: LLVM's
# optimisations (XLA's CPU backend level) cost more than they save. Level 0 only changes how the CPU
# code is generated, not the HLO or its fusions; about 40% less time in the loss and
# engine tests, none lost in the training tests. A level given in XLA_FLAGS is kept.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never reach for the network from a test (tfds would retry DNS for minutes).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent JAX compilation cache for the whole test session: the xdist workers and every process
# the tests launch (trainer runs, notebook kernels) inherit it through the environment, so a program
# that was compiled once (the same train step rebuilt by another test, relaunched by a resume test) is
# loaded instead of compiled again. A fresh folder outside the repository, made by the first process
# of the session (the xdist controller) and removed when that process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcl-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


# ------------------------------------------------------------------- fixtures shared across test files
@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The data folder of the tiny training runs (config.data.data_dir; the digits are bundled)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def straight(data_dir, tmp_path_factory):
  """An uninterrupted run of the command line on `helpers.tiny_config`: its final parameters, which the
  interrupted and resumed runs must match bit for bit. Compiled fresh, not loaded from the compilation
  cache the interrupted and resumed runs share: a cached executable that computed differently would show
  up as a mismatch. One run for the whole session: under pytest-xdist the first worker that needs it
  runs it in the folder all workers share, under a file lock; the others wait for it and read it."""
  import fcntl  # pylint: disable=import-outside-toplevel

  from tests import helpers  # pylint: disable=import-outside-toplevel

  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # the session's folder above every worker's own
  workdir, done = shared / "straight" / "run", shared / "straight.done"
  with open(shared / "straight.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      workdir.parent.mkdir(exist_ok=True)
      run = helpers.Run(workdir, data_dir, "straight", compilation_cache=False)
      assert run.wait() == 0, run.output()[-3000:]
      assert helpers.logged_steps(workdir) == list(range(1, helpers.TOTAL_STEPS + 1))
      done.touch()
  return helpers.final_params(workdir, data_dir)


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if training gets past its checks (the mesh is the first thing built after them)."""
  from jaxcl.train import devices  # pylint: disable=import-outside-toplevel

  def boom(*args, **kwargs):
    raise AssertionError("compute started before the problem was reported")

  monkeypatch.setattr(devices, "make_mesh", boom)
