"""Evaluate a checkpoint of a training workdir: `python launch/eval.py --workdir=runs/x`.

One full pass over the validation split by default (--batches N for the first N batches),
loss / perplexity / token accuracy in total and per UL2 denoiser, MoE routing statistics.
Writes <workdir>/eval/<split>_step<N>.json and TensorBoard scalars (prefix eval_<split>).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default="validation", choices=("validation", "train"))
  parser.add_argument("--batches", type=int, default=0, help="0 = one full pass")
  parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  parser.add_argument("--batch_size", type=int, default=0, help="0 = the run's batch size")
  parser.add_argument("--seq_len", type=int, default=0, help="0 = the run's sequence length")
  parser.add_argument("--mixture", default=None, help="another seqio task / mixture")
  parser.add_argument("--text_file", action="append", default=[],
                      help="evaluate on these files (with --mixture text_files_ul2 / _lm)")
  parser.add_argument("--ul2", choices=("true", "false"), default=None,
                      help="override DataConfig.ul2 (false: plain LM examples)")
  parser.add_argument("--data_parallel", action="store_true",
                      help="plain data parallelism over all devices instead of the run's mesh")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  from openmoe_jax import distributed  # pylint: disable=import-outside-toplevel
  from openmoe_jax import evaluation  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  data = {}
  if args.mixture:
    data["mixture"] = args.mixture
  if args.text_file:
    data["text_files"] = tuple(args.text_file)
  if args.ul2:
    data["ul2"] = args.ul2 == "true"
  try:
    distributed.initialize_from_env()
    summary = evaluation.run(args.workdir, split=args.split, batches=args.batches,
                             step=args.step, batch_size=args.batch_size,
                             seq_len=args.seq_len, data=data,
                             mesh=MeshConfig() if args.data_parallel else None,
                             progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(evaluation.format_table(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
