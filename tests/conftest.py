"""Test configuration: 8 host CPU devices (for sharding tests), set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += "" if "device_count" in os.environ["XLA_FLAGS"] else (
    " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never reach for the network from a test (tfds would retry DNS for minutes).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")
