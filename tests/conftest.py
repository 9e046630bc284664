"""Tests run on a simulated 8-device CPU mesh; the flag must be set before jax is imported."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# each process (an xdist worker included) gets its own data cache, so cache hits and misses stay per test order
os.environ["MAXDPO_CACHE_DIR"] = tempfile.mkdtemp(prefix="maxdpo-test-cache-")
# XLA executables are shared by every test, worker and run subprocess of a session: the same tiny programs
# recur across tests and the cache is keyed on the whole compiled program, so results do not change
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="maxdpo-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# xdist workers that compile for TPU topologies each load libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
