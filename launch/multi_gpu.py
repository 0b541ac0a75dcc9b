"""Train on GPUs: one host (all GPUs in one process, or one process per GPU), or several hosts.

    # one host, one process driving every GPU (simplest):
    python launch/multi_gpu.py --gin_file=gin/experiments/X.gin \
        --gin_file=gin/sharding/fsdp_expert.gin --workdir=runs/x
    # one process per GPU (what multi-host looks like, on one machine):
    python launch/multi_gpu.py --processes_per_host=8 ... --workdir=runs/x
    # host r of N (run on every host, same coordinator = host 0's address):
    python launch/multi_gpu.py --num_hosts=N --host_rank=r --coordinator=host0:1234 \
        --processes_per_host=8 ... --workdir=/shared/runs/x
    # under SLURM, one task per GPU: srun python launch/train.py ... (JAX detects SLURM)

Prints each command with its environment, then starts them (unless --dry_run) and waits. A
SIGTERM sent to this launcher is passed on to every training process, which checkpoints the step
it is on and exits with 143; a terminal's Ctrl-C reaches them directly and ends them the same way
with 130. The launcher then exits with the largest of their exit codes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(a: argparse.Namespace) -> list[tuple[dict[str, str], list[str]]]:
  train = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--workdir={a.workdir}"]
  train += [f"--gin_file={f}" for f in a.gin_file]
  train += [f"--gin_bindings={b}" for b in a.gin_bindings]
  n = a.num_hosts * a.processes_per_host
  if n == 1:
    return [({}, train)]
  if a.num_hosts > 1 and not a.coordinator:
    raise ValueError(f"--num_hosts={a.num_hosts} needs --coordinator=HOST:PORT (host 0)")
  if not 0 <= a.host_rank < a.num_hosts:
    raise ValueError(f"--host_rank={a.host_rank}; expected 0..{a.num_hosts - 1}")
  out = []
  for local in range(a.processes_per_host):
    env = {"JAX_COORDINATOR_ADDRESS": a.coordinator or "127.0.0.1:12355",
           "JAX_NUM_PROCESSES": str(n),
           "JAX_PROCESS_ID": str(a.host_rank * a.processes_per_host + local)}
    if a.processes_per_host > 1:  # one GPU each; one process per host drives all its GPUs
      env["JAX_LOCAL_DEVICE_IDS"] = str(local)
    out.append((env, train + ["--no_progress"] * (local > 0)))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=[], required=True)
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--workdir", required=True, help="shared by all hosts for checkpoints")
  p.add_argument("--processes_per_host", type=int, default=1, help="1, or one per GPU")
  p.add_argument("--num_hosts", type=int, default=1)
  p.add_argument("--host_rank", type=int, default=0)
  p.add_argument("--coordinator", default="", help="HOST:PORT of process 0")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  a = p.parse_args(argv)
  try:
    cmds = commands(a)
  except ValueError as e:
    p.error(str(e))
  for env, cmd in cmds:
    print("+ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd), flush=True)
  if a.dry_run:
    return 0
  procs = [subprocess.Popen(cmd, env={**os.environ, **env}) for env, cmd in cmds]

  def forward(signum, frame):  # pylint: disable=unused-argument
    """A scheduler's SIGTERM often reaches this process only (PID 1 of a container): pass it
    on, so each training process checkpoints its step (exit 143), and wait for them."""
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  def wait_for_them(signum, frame):  # pylint: disable=unused-argument
    """A terminal's Ctrl-C reaches the training processes too (one process group): each one
    checkpoints its step and exits with 130. Passing it on as well would make it their second
    Ctrl-C, which stops at once."""

  previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
              signal.SIGINT: signal.signal(signal.SIGINT, wait_for_them)}
  try:
    return max(proc.wait() for proc in procs)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


if __name__ == "__main__":
  sys.exit(main())
