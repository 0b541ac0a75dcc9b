"""Where a profiled step's device time goes: a top-N table of kernels from a Perfetto trace.

    python -m openmoe_jax.bench.profile_summary PROFILE_DIR [--top 30] [--steps 3]
        [--hlo_dump DUMP_DIR]

Reads the newest `perfetto_trace.json.gz` that `jax.profiler.start_trace(dir,
create_perfetto_trace=True)` wrote under PROFILE_DIR, keeps the complete events ("ph": "X") of
device processes (their process name mentions a GPU / TPU / stream), groups them by the HLO op
they belong to (the event's `hlo_op` / `long_name` argument, else its name) and prints total
milliseconds per step, share of device time and call count. No TensorBoard plugin needed, so
it runs on a bare device image.

With `--hlo_dump` (the folder of `XLA_FLAGS=--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text`;
profile with `--xla_gpu_enable_command_buffer=` so kernels keep their HLO names) a third table
groups the time by the JAX operation each HLO instruction came from (its `op_name` metadata,
numbers stripped, with the source line where the metadata carries one; jax 0.11's GPU dumps
keep only the op_name): which operation of the model costs what, forward, backward and
rematerialised forward apart. Checked on an H100 dump of the MoEUT-244M step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Sequence

_DEVICE_RE = re.compile(r"gpu|tpu|stream|device", re.IGNORECASE)
_HOST_RE = re.compile(r"host|cpu|python|threadpool", re.IGNORECASE)


def find_trace(profile_dir: str) -> str:
  paths = glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {profile_dir!r} (profile with "
                            "create_perfetto_trace=True)")
  return max(paths, key=os.path.getmtime)


def _device_pids(events: Sequence[dict[str, Any]]) -> set[Any]:
  pids = set()
  for ev in events:
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      name = str(ev.get("args", {}).get("name", ""))
      if _DEVICE_RE.search(name) and not _HOST_RE.search(name):
        pids.add(ev.get("pid"))
  return pids


def _op_name(ev: dict[str, Any]) -> str:
  args = ev.get("args") or {}
  for key in ("hlo_op", "long_name", "tf_op", "name"):
    if key in args and args[key]:
      return str(args[key])[:90]
  return str(ev.get("name", "?"))[:90]


def _detail(ev: dict[str, Any]) -> str:
  """What an op instance computes, when the trace says (its HLO text, shortened)."""
  args = ev.get("args") or {}
  text = str(args.get("long_name") or args.get("hlo_text") or "")
  text = re.sub(r"\s+", " ", text)
  return f"  [{text[:150]}]" if text else ""


def kernel_kind(ev: dict[str, Any]) -> str:
  """A coarse kind: the kernel's own name for Pallas / custom calls, else the HLO op name
  without its instance number (fusion.65 -> fusion), so repeated layers add up."""
  name = str(ev.get("name", "?"))
  op = _op_name(ev)
  if op.startswith(("pallas_call", "custom-call", "custom_call")):
    return f"{re.sub(r'[.][0-9]+$', '', op)}:{name[:60]}"
  return re.sub(r"[.][0-9]+$", "", op)


def hlo_sources(dump_dir: str) -> dict[str, str]:
  """HLO instruction name -> "kind  op_name (file:line)" from the largest optimized module in
  an XLA text dump (the train step's); op_name has the jit prefix and numbers stripped."""
  paths = glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
  if not paths:
    raise FileNotFoundError(f"no *after_optimizations.txt under {dump_dir!r} (dump with "
                            "XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text)")
  sources: dict[str, str] = {}
  with open(max(paths, key=os.path.getsize), encoding="utf-8") as f:
    for line in f:
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", line)
      if not m or m.group(1) in sources:
        continue
      meta = m.group(2)
      op = re.search(r'op_name="([^"]*)"', meta)
      src = re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)
      op_name = re.sub(r"^jit\([^)]*\)/", "", op.group(1)) if op else "?"
      where = f" ({os.path.basename(src.group(1))}:{src.group(2)})" if src else ""
      kind = re.sub(r"[.][0-9]+$", "", m.group(1))
      sources[m.group(1)] = f"{kind}  {re.sub(r'[0-9]+', '#', op_name)}{where}"
  return sources


def summarize(trace_path: str, steps: int = 1, by_kind: bool = False,
              sources: dict[str, str] | None = None
              ) -> tuple[list[tuple[str, float, int]], float]:
  """([(op, total microseconds per step, calls per step)] sorted by time, device us per step);
  `by_kind` groups by `kernel_kind` instead of by HLO op instance, `sources` (from
  `hlo_sources`) by the JAX operation the instruction came from."""
  with gzip.open(trace_path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  pids = _device_pids(events)
  totals: dict[str, float] = collections.defaultdict(float)
  calls: dict[str, int] = collections.defaultdict(int)
  for ev in events:
    if ev.get("ph") != "X" or ev.get("pid") not in pids:
      continue
    if sources is not None:
      name = sources.get(_op_name(ev), kernel_kind(ev))
    else:
      name = kernel_kind(ev) if by_kind else _op_name(ev) + _detail(ev)
    totals[name] += float(ev.get("dur", 0.0))
    calls[name] += 1
  rows = sorted(((n, t / steps, round(calls[n] / steps)) for n, t in totals.items()),
                key=lambda r: -r[1])
  return rows, sum(totals.values()) / steps


def format_table(rows: list[tuple[str, float, int]], total_us: float, top: int) -> str:
  lines = [f"device time per step: {total_us / 1e3:.2f} ms (sum over device streams)",
           f"{'ms/step':>9} {'share':>6} {'calls':>6}  op"]
  for name, us, n in rows[:top]:
    lines.append(f"{us / 1e3:9.3f} {100 * us / max(total_us, 1e-9):5.1f}% {n:6d}  {name[:240]}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("profile_dir")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--steps", type=int, default=3, help="steps the trace covers")
  p.add_argument("--hlo_dump", default=None, help="XLA text dump of the profiled program: "
                 "also group the time by JAX operation and source line")
  a = p.parse_args(argv)
  path = find_trace(a.profile_dir)
  for by_kind in (True, False):
    rows, total = summarize(path, a.steps, by_kind=by_kind)
    print(format_table(rows, total, a.top))
  if a.hlo_dump:
    rows, total = summarize(path, a.steps, sources=hlo_sources(a.hlo_dump))
    print(format_table(rows, total, a.top))


if __name__ == "__main__":
  main()
