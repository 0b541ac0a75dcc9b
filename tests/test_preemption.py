"""openmoe_jax.preemption on two CPU processes joined by `distributed.initialize`: a SIGTERM or a
Ctrl-C (SIGINT, passed on to the service as a SIGTERM) to one host makes `Watch.reached` answer
True on both hosts at the same step (JAX's preemption service; no Python handler replaces its
own SIGTERM handler). The one-process path (Python handlers) is tested with a real training run
in test_train.py."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker() -> None:
  """One host: steps at its own pace (host 1 at half host 0's speed) until `reached`."""
  from openmoe_jax import distributed  # pylint: disable=import-outside-toplevel
  assert distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel
  from openmoe_jax import preemption  # pylint: disable=import-outside-toplevel
  host = jax.process_index()
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with preemption.Watch() as watch:
    assert signal.getsignal(signal.SIGTERM) is before[0]  # the service keeps SIGTERM
    for step in range(1, 100_000):
      time.sleep(0.01 * (1 + host))
      if step == 20:
        print("running", flush=True)
      if watch.reached(step):
        print(f"saves step {step}, interrupted {watch.interrupted}", flush=True)
        break
    else:
      raise AssertionError("no preemption sync point was reached")
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_to_one_host_stops_both_at_the_same_step(signum):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, __file__], env={**env, "JAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    for p in procs:  # both hosts are in their loops
      line = p.stdout.readline()
      assert line.strip() == "running", (line, p.stderr.read()[-3000:] if p.poll() else "")
    procs[1].send_signal(signum)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  steps = [int(re.search(r"saves step (\d+)", out).group(1)) for out, _ in outs]
  assert steps[0] == steps[1] > 20, steps  # one agreed step, after the notice
  interrupted = [re.search(r"interrupted (\w+)", out).group(1) for out, _ in outs]
  assert interrupted == ["False", "True" if signum == signal.SIGINT else "False"]


if __name__ == "__main__":
  _worker()
