"""Test set-up, before jax is imported: 8 fake CPU devices (sharded == unsharded tests), and
compilation tuned for a suite of many small programs that run a few times each.

- `--xla_backend_optimization_level=0`: the CPU backend skips LLVM's optimisation pipeline,
  which is most of a small program's compile time (the suite ran ~20% faster). Float
  semantics do not change (no fast-math either way).
- A persistent compilation cache shared by the xdist workers of one run: in-process training
  runs (resume, the notebook's checkpoint, ...) build fresh jitted functions for the same
  programs, which then compile once. The main process makes the directory (the workers and
  the tests' subprocesses inherit it) and removes it at the end: nothing carries over.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # False in xdist workers
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="openmoe_jax_tests_jit_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
