"""`distributed`'s default XLA flags: added once, never over the user's own setting, and
accepted by XLA (a process that starts a backend with them runs)."""
import argparse
import os
import subprocess
import sys

from openmoe_jax import distributed

FLAG = "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer"


def test_default_flags_are_added_once_and_keep_the_users_value():
  assert distributed.with_default_xla_flags("") == f"{FLAG}=true"
  mine = "--xla_force_host_platform_device_count=8"
  assert distributed.with_default_xla_flags(f" {mine} ") == f"{mine} {FLAG}=true"
  off = f"{mine} {FLAG}=false"
  assert distributed.with_default_xla_flags(off) == off
  twice = distributed.with_default_xla_flags(distributed.with_default_xla_flags(mine))
  assert twice.split().count(f"{FLAG}=true") == 1


def test_a_process_with_the_default_flags_runs():
  code = ("from openmoe_jax import distributed; distributed.apply_default_xla_flags(); "
          "import os, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); print(jnp.ones(3).sum())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env={**env, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == [f"{FLAG}=true", "3.0"]


def test_decomposer_setting_is_read_from_the_flags():
  assert not distributed.ragged_all_to_all_decomposed("")
  assert distributed.ragged_all_to_all_decomposed(f"--a=1 {FLAG}=true")
  assert not distributed.ragged_all_to_all_decomposed(f"{FLAG}=true {FLAG}=false")
  assert distributed.ragged_all_to_all_decomposed(distributed.with_default_xla_flags("--a=1"))


def _launcher():
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), "..", "launch", "multi_gpu.py")
  spec = importlib.util.spec_from_file_location("multi_gpu", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_launcher_pins_a_gpu_only_with_one_process_per_gpu():
  """Several hosts with one process each: every process drives all its host's GPUs (no
  JAX_LOCAL_DEVICE_IDS; pinning it to 0 left the other GPUs idle). One process per GPU: each
  gets its own."""
  launcher = _launcher()
  parse = lambda *args: launcher.commands(argparse.Namespace(  # noqa: E731
      gin_file=["x.gin"], gin_bindings=[], workdir="w", coordinator="host0:1234", host_rank=1,
      **dict(args)))
  [(env, _)] = parse(("num_hosts", 2), ("processes_per_host", 1))
  assert env["JAX_PROCESS_ID"] == "1" and "JAX_LOCAL_DEVICE_IDS" not in env
  envs = [env for env, _ in parse(("num_hosts", 2), ("processes_per_host", 4))]
  assert [e["JAX_PROCESS_ID"] for e in envs] == ["4", "5", "6", "7"]
  assert [e["JAX_LOCAL_DEVICE_IDS"] for e in envs] == ["0", "1", "2", "3"]
