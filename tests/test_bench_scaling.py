"""The expert-parallel scaling benchmark on fake CPU devices: the layer check compares with one
device, and the run writes one row per device count with the per-device batch kept."""
import json

import pytest

from openmoe_jax.bench import scaling


@pytest.mark.parametrize("exchange,slack", [("dense", 1.25), ("dense", 0.0)])
def test_check_matches_one_device(exchange, slack):
  assert scaling.check(2, exchange, slack) < 1e-5


def test_run_writes_a_row_per_device_count(tmp_path, capsys):
  out = tmp_path / "scaling.json"
  scaling.main(["--devices", "1,2", "--batch_per_device", "2", "--seq", "32", "--vocab", "128",
                "--d_model", "128", "--layers", "1", "--experts", "4", "--d_expert", "64",
                "--steps", "1", "--warmup", "1", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [(r["devices"], r["global_batch"], r["seq"]) for r in rows] == [(1, 2, 32), (2, 4, 32)]
  assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
  assert "| 2 | 4 x 32 |" in capsys.readouterr().out
