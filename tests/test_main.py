"""The entry point `python -m jaxcl.main`: when it initialises jax.distributed, and its command line."""

import importlib.util
import subprocess
import sys

from jaxcl import main
from tests.helpers import ROOT


def test_a_cloud_tpu_vm_is_a_machine_with_a_google_pci_device_and_libtpu(tmp_path):
  def device(name, vendor):
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")

  device("0000:00:04.0", "0x1af4")  # virtio: any VM
  assert not main.on_cloud_tpu_vm(str(tmp_path))
  device("0000:00:05.0", main.GOOGLE_PCI_VENDOR)
  has_libtpu = importlib.util.find_spec("libtpu") is not None  # installed with the test extra
  assert main.on_cloud_tpu_vm(str(tmp_path)) == has_libtpu
  assert not main.on_cloud_tpu_vm(str(tmp_path / "none"))


def test_command_line_rejects_unknown_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={tmp_path}",
       "--config.batchsize=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode != 0
  assert "batchsize" in proc.stderr
