"""Train on a Cloud TPU pod slice: copy the repo to every worker, then run the same command on all.

    python launch/tpu_pod.py --tpu=my-v5p-64 --zone=us-east5-a \
        --gin_file=gin/experiments/tiny_openmoe_ul2.gin --gin_file=gin/sharding/fsdp_expert.gin \
        --workdir=gs://bucket/runs/moe [--project=P] [--setup] [--dry_run]

Prints each gcloud command, then runs it (unless --dry_run). Every worker runs launch/train.py;
`openmoe_jax.distributed` finds the pod's coordinator itself (TPU_WORKER_HOSTNAMES), each host
reads its shard of the data, and orbax writes one checkpoint from all hosts (use a gs:// workdir).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = "~/openmoe_jax"


def commands(a: argparse.Namespace) -> list[list[str]]:
  where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.tpu, *where, "--worker=all", "--command"]
  train = ["python3", "launch/train.py", f"--workdir={a.workdir}", "--no_progress"]
  train += [f"--gin_file={f}" for f in a.gin_file]
  train += [f"--gin_bindings={b}" for b in a.gin_bindings]
  out = [["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".",
          f"{a.tpu}:{REMOTE_DIR}", *where, "--worker=all"]]
  if a.setup:
    out.append(ssh + [f"cd {REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"])
  out.append(ssh + [f"cd {REMOTE_DIR} && " + shlex.join(train)])
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--gin_file", action="append", default=[], required=True)
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--workdir", required=True, help="shared by all hosts, e.g. gs://bucket/run")
  p.add_argument("--setup", action="store_true", help="pip install the repo on every worker")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  a = p.parse_args(argv)
  if not a.workdir.startswith("gs://"):
    print(f"warning: --workdir={a.workdir} is not on GCS; every host must see the same "
          "directory for sharded checkpoints", file=sys.stderr)
  for cmd in commands(a):
    print("+ " + shlex.join(cmd), flush=True)
    if not a.dry_run and subprocess.call(cmd) != 0:
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
