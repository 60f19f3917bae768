"""Test setup: 8 simulated CPU devices (set before jax is imported), strict ranks, and
one persistent XLA compilation cache for the session.

The cache directory is new and empty for every pytest session (removed at exit), so no
result depends on an earlier run; within the session, tests that build the same
program (the same tiny models and shapes in several files, and the processes tests start,
which inherit the environment) compile it once.
"""

import atexit
import os
import shutil
import tempfile

# the tiny test programs run in microseconds: skip LLVM's expensive optimisations
# (compiling is most of the suite's time; both sides of every comparison share the flags)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "MOESD_TEST_XLA_CACHE" not in os.environ:  # set once; worker processes inherit it
    _cache = tempfile.mkdtemp(prefix="moesd_xla_cache_")
    os.environ["MOESD_TEST_XLA_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MOESD_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
