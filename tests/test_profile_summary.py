"""profile_summary on a synthetic Perfetto trace and XLA text dump."""
import gzip
import json

from openmoe_jax.bench import profile_summary as ps

HLO = """HloModule jit_step, entry_computation_layout={()->()}

ENTRY %main {
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c1, metadata={op_name="jit(step)/jvp()/mul" source_file="/x/moe.py" source_line=12}
  %fusion.27 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c2, metadata={op_name="jit(step)/jvp()/mul" source_file="/x/moe.py" source_line=12}
  ROOT %custom-call.3 = f32[4]{0} custom-call(%p), custom_call_target="x", metadata={op_name="jit(step)/transpose(jvp(layer3))/dot_general" source_file="/x/router.py" source_line=7}
}
"""


def _trace(path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "k1", "dur": 100.0, "args": {"hlo_op": "fusion.1"}},
      {"ph": "X", "pid": 1, "name": "k2", "dur": 50.0, "args": {"hlo_op": "fusion.27"}},
      {"ph": "X", "pid": 1, "name": "k3", "dur": 400.0, "args": {"hlo_op": "custom-call.3"}},
      {"ph": "X", "pid": 1, "name": "k4", "dur": 10.0, "args": {"hlo_op": "copy.9"}},
      {"ph": "X", "pid": 2, "name": "host", "dur": 999.0, "args": {"hlo_op": "fusion.1"}},
  ]
  with gzip.open(path, "wt", encoding="utf-8") as f:
    json.dump({"traceEvents": events}, f)


def test_groups_by_instance_kind_and_source(tmp_path):
  trace = tmp_path / "prof" / "run" / "perfetto_trace.json.gz"
  trace.parent.mkdir(parents=True)
  _trace(trace)
  dump = tmp_path / "dump"
  dump.mkdir()
  (dump / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO)
  path = ps.find_trace(str(tmp_path / "prof"))

  rows, total = ps.summarize(path, steps=2)
  assert total == (100 + 50 + 400 + 10) / 2  # host events are not device time
  assert rows[0][0].startswith("custom-call.3") and rows[0][1] == 200.0

  kinds = dict((n, us) for n, us, _ in ps.summarize(path, steps=1, by_kind=True)[0])
  assert kinds["fusion"] == 150.0

  sources = ps.hlo_sources(str(dump))
  assert sources["fusion.27"] == "fusion  jvp()/mul (moe.py:12)"
  assert sources["custom-call.3"] == "custom-call  transpose(jvp(layer#))/dot_general (router.py:7)"
  by_src = {n: (us, c) for n, us, c in ps.summarize(path, steps=1, sources=sources)[0]}
  assert by_src["fusion  jvp()/mul (moe.py:12)"] == (150.0, 2)  # two instances, one source
  assert by_src["copy"] == (10.0, 1)  # not in the dump: its kind
  table = ps.format_table(*ps.summarize(path, steps=1, sources=sources), top=5)
  assert "router.py:7" in table
