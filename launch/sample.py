"""Sample a continuation from the latest checkpoint in a workdir written by launch/train.py."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", action="append", default=[])
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prompt_attention", choices=("auto", "bidirectional", "causal"),
                      default="auto", help="auto: as the model trained (bidirectional over the "
                      "prompt after UL2, causal after causal-LM training)")
  args = parser.parse_args(argv)
  prefix_lm = {"auto": None, "bidirectional": True, "causal": False}[args.prompt_attention]
  from openmoe_jax import inference  # pylint: disable=import-outside-toplevel
  try:
    session = inference.load(args.workdir)
    texts = session.complete(args.prompt or ["def "], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, prefix_lm=prefix_lm)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for prompt, text in zip(args.prompt or ["def "], texts):
    print(f"--- prompt: {prompt!r} (step {session.step})\n{prompt}{text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
