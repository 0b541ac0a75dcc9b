"""Train a model from gin files: `python launch/train.py --gin_file=... --workdir=...`.

Flags: --gin_file (repeatable), --gin_bindings (repeatable, e.g. "TrainConfig.steps=100"),
--workdir (per-run directory; re-running the same command resumes from its last checkpoint),
--dry_run (print the resolved config and parameter counts, then exit).
On SIGTERM (a scheduler's preemption notice) the run checkpoints the step it is on and exits
with 143; on Ctrl-C it does the same and exits with 130 (a second Ctrl-C stops at once, without
that checkpoint). Re-running the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--gin_search_path", action="append", default=[])
  parser.add_argument("--workdir", required=False, default=None)
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  if not args.dry_run and not args.workdir:
    parser.error("--workdir is required unless --dry_run")
  from openmoe_jax import gin_setup  # pylint: disable=import-outside-toplevel
  from openmoe_jax import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize_from_env()
    gin_setup.parse(args.gin_file, args.gin_bindings, args.gin_search_path)
    result = gin_setup.configured("run")(workdir=args.workdir or "", dry_run=args.dry_run,
                                         progress=not args.no_progress)
  except (ValueError, FileNotFoundError, FloatingPointError, UnicodeDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(str(e) or "Ctrl-C: stopped", file=sys.stderr)
    return 128 + signal.SIGINT
  if result.get("preempted"):
    from openmoe_jax import preemption  # pylint: disable=import-outside-toplevel
    print(f"preempted (SIGTERM) after step {result['step']}: its checkpoint is saved; re-run "
          "the same command to resume", file=sys.stderr)
    return preemption.EXIT_CODE
  if not args.dry_run:
    final = {k: v for k, v in result.items() if k != "sample"}
    print(f"done: {final}")
    if "sample" in result:
      print(f"sample: {result['sample']!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
