"""Tests run on a simulated 8-device CPU mesh; the flag must be set before jax is imported."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MAXDPO_CACHE_DIR", tempfile.mkdtemp(prefix="maxdpo-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
