"""End-to-end training: loss falls below the unigram entropy, resume reproduces the run exactly,
gradient accumulation equals the big batch, bad input fails with one clear error."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import gin_setup, inference, metrics, sharding, train, train_step as ts
from openmoe_jax.config import (DataConfig, MeshConfig, ModelConfig, MoeConfig, OptimConfig,
                                TrainConfig)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ModelConfig(vocab_size=0, d_model=64, n_layers=2, n_heads=4, d_ff=128, dtype="float32")
# In-process runs use 2 of the 8 fake devices: still sharded, at a fraction of the compile time.
MESH = MeshConfig(num_devices=2)


def _train(workdir, steps, **kw):
  cfg = dict(steps=steps, batch_size=8, seq_len=128, eval_every=0, eval_batches=2,
             checkpoint_every=4, log_every=1, sample_tokens=0)
  cfg.update(kw)
  return train.run(str(workdir), model=MODEL, data=DataConfig(),
                   optim=OptimConfig(learning_rate=3e-3, warmup_steps=5),
                   train=TrainConfig(**cfg), mesh=MESH, progress=False)


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(str(workdir))
          if "train/loss" in r}


def test_resume_reproduces_uninterrupted_run(tmp_path):
  """Resuming after a kill (stop_after), a SIGTERM or a Ctrl-C continues bit-exactly."""
  full = _train(tmp_path / "full", 8, sample_tokens=6)
  _train(tmp_path / "cut", 8, stop_after=4)  # "killed" right after the step-4 checkpoint
  assert _losses(tmp_path / "cut").keys() == {1, 2, 3, 4}
  resumed = _train(tmp_path / "cut", 8)
  a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
  assert a.keys() == b.keys() == set(range(1, 9))
  assert all(a[s] == b[s] for s in a), (a, b)  # bit-exact, not approximately
  assert full["eval"]["loss"] == resumed["eval"]["loss"]
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints"))[-1] == "8"
  # Re-running a finished run (the README's main job, run twice) finishes at once with the
  # same evaluation and trains nothing more.
  again = _train(tmp_path / "cut", 8)
  assert again["step"] == 8 and again["eval"]["loss"] == full["eval"]["loss"]
  assert _losses(tmp_path / "cut") == b
  # Extending the run is allowed, but the cosine schedule, as long as the run, changes: said.
  with pytest.warns(UserWarning, match=r"at step 8 with TrainConfig.steps=10 .* with 8\)"):
    assert _train(tmp_path / "cut", 10)["step"] == 10
  # The end-of-run sample is the config's sampled continuation (not greedy): the same text
  # comes from the step-8 checkpoint restored onto one device and sampled the same way.
  sample = (tmp_path / "full" / "sample.txt").read_text(encoding="utf-8").rstrip("\n")
  assert sample == full["sample"]
  session = inference.load(str(tmp_path / "full"))
  cfg = TrainConfig()
  assert session.step == 8
  assert sample == cfg.sample_prompt + session.complete(
      [cfg.sample_prompt], max_new_tokens=6, temperature=cfg.sample_temperature,
      top_p=cfg.sample_top_p, seed=cfg.sample_seed)[0]
  _signal_run_resumes_exactly(tmp_path / "term", full, signal.SIGTERM)
  _signal_run_resumes_exactly(tmp_path / "int", full, signal.SIGINT)
  _second_ctrl_c_stops_at_once(tmp_path / "int2")


def _tensorboard_texts(workdir, tag: str) -> dict[int, str]:
  """{step: text} of a text summary in the run's TensorBoard event files (read by TF)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = {}
  for path in (workdir / "tensorboard").glob("events*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == f"{tag}/text_summary":
          out[event.step] = tf.make_ndarray(value.tensor).item().decode()
  return out


def _signalled_train(workdir, signums):
  """An 8-step run whose process gets `signums` while step 5's batch is built."""
  to_global, calls = train._to_global, []  # pylint: disable=protected-access

  def to_global_then_signal(batch, setup):
    calls.append(1)
    if len(calls) == 5:
      for signum in signums:
        os.kill(os.getpid(), signum)
    return to_global(batch, setup)

  train._to_global = to_global_then_signal  # pylint: disable=protected-access
  try:
    return _train(workdir, 8)
  finally:
    train._to_global = to_global  # pylint: disable=protected-access


def _signal_run_resumes_exactly(workdir, full, signum):
  """A SIGTERM (a scheduler's preemption notice) or a Ctrl-C that arrives while step 5's batch
  is built ends the run after step 5 with a checkpoint of it (between the step-4 and step-8
  saves), and the resumed run's losses equal the uninterrupted run's, bit for bit."""
  handler = signal.getsignal(signum)
  if signum == signal.SIGINT:  # Ctrl-C: the save, then KeyboardInterrupt (a notebook's stop)
    with pytest.raises(KeyboardInterrupt, match="stopped after step 5, whose checkpoint is saved"):
      _signalled_train(workdir, [signum])
    reason, text = "interrupted", "Ctrl-C: stopped after step 5, checkpoint saved"
  else:
    cut = _signalled_train(workdir, [signum])
    assert cut["preempted"] and cut["step"] == 5 and "eval" not in cut
    reason, text = "preempted", "SIGTERM: stopped after step 5, checkpoint saved"
  assert signal.getsignal(signum) is handler  # the run's handler is gone again
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [4, 5]
  assert max(_losses(workdir)) == 5  # step 5's metrics were written, not dropped
  assert _tensorboard_texts(workdir, reason) == {5: text}
  resumed = _train(workdir, 8)
  assert "preempted" not in resumed
  assert _losses(workdir) == _losses(workdir.parent / "full")
  assert resumed["eval"]["loss"] == full["eval"]["loss"]


def _second_ctrl_c_stops_at_once(workdir):
  """A second Ctrl-C raises where it lands (here: after the iterator gave step 5's batch, before
  the step ran) and saves nothing: the step-4 checkpoint stays the last."""
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt) as raised:
    _signalled_train(workdir, [signal.SIGINT, signal.SIGINT])
  assert "checkpoint is saved" not in str(raised.value)
  assert signal.getsignal(signal.SIGINT) is handler
  assert os.listdir(workdir / "checkpoints") == ["4"]
  assert max(_losses(workdir)) == 4


def _launch_and_stop(wd, after_step: int, stop) -> tuple[int, str]:
  """Runs launch/multi_gpu.py until its run has logged `after_step`, calls `stop(proc)`, and
  returns the exit code and stderr."""
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "multi_gpu.py"),
       "--gin_file=gin/experiments/tiny_dense_ul2.gin", f"--workdir={wd}",
       "--gin_bindings=TrainConfig.steps = 100000", "--gin_bindings=TrainConfig.log_every = 1",
       "--gin_bindings=TrainConfig.checkpoint_every = 0", "--gin_bindings=TrainConfig.eval_every = 0",
       "--gin_bindings=TrainConfig.seq_len = 64", "--gin_bindings=MeshConfig.num_devices = 1"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)  # its own process group: the finally below ends the children too
  try:
    deadline = time.time() + 240
    while not (wd / "metrics.jsonl").exists() or max(_losses(wd) or [0]) < after_step:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, f"the run did not reach step {after_step}"
      time.sleep(0.2)
    stop(proc)
    _, err = proc.communicate(timeout=120)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  return proc.returncode, err


def test_ctrl_c_and_sigterm_from_outside_save_the_step_and_exit_130_and_143(tmp_path):
  """The real thing, from a terminal and as a container's PID 1 gets it:
  - a Ctrl-C reaches launch/multi_gpu.py and its launch/train.py process (one process group):
    the launcher waits, the run saves the step it is on, prints one line (no traceback) and
    exits with 130 (128 + SIGINT), and so does the launcher;
  - the same command resumes from that step; a SIGTERM to the launcher alone is passed on, the
    run saves its step and exits with 143 (128 + SIGTERM), and so does the launcher."""
  wd = tmp_path / "wd"
  code, err = _launch_and_stop(wd, 3, lambda proc: os.killpg(proc.pid, signal.SIGINT))
  assert code == 130, err[-3000:]
  first = int(re.search(r"Ctrl-C: stopped after step (\d+), whose checkpoint is saved", err).group(1))
  assert first >= 3 and "Traceback" not in err and "Exception ignored" not in err
  assert os.listdir(wd / "checkpoints") == [str(first)]
  assert max(_losses(wd)) == first
  code, err = _launch_and_stop(wd, first + 2, lambda proc: proc.send_signal(signal.SIGTERM))
  assert code == 143, err[-3000:]
  saved = int(re.search(r"preempted \(SIGTERM\) after step (\d+)", err).group(1))
  assert saved >= first + 2 and "Traceback" not in err and "Exception ignored" not in err
  assert sorted(int(s) for s in os.listdir(wd / "checkpoints")) == [first, saved]
  assert max(_losses(wd)) == saved


def _loss_and_unigram(workdir: str) -> tuple[float, float]:
  """(held-out loss after 150 steps, that of a unigram model fitted on the training stream)."""
  from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  data = DataConfig(mixture="stdlib_lm", ul2=False)
  counts = np.ones(pipeline.vocab_size(data))  # add-one smoothing
  it = pipeline.make_iterator(data, "train", 8, 128, 0)
  for _ in range(200):
    b = next(it)
    np.add.at(counts, b["decoder_target_tokens"], b["decoder_loss_weights"])
  log_p = np.log(counts / counts.sum())
  val = pipeline.make_iterator(data, "validation", 8, 128, 0)
  nll = weight = 0.0
  for _ in range(2):  # the same batches train.run evaluates on
    b = next(val)
    nll -= float((log_p[b["decoder_target_tokens"]] * b["decoder_loss_weights"]).sum())
    weight += float(b["decoder_loss_weights"].sum())
  unigram = nll / weight
  result = train.run(workdir, model=ModelConfig(vocab_size=0, d_model=64, n_layers=2,
                                                 n_heads=4, d_ff=256, dtype="float32"),
                     data=data, optim=OptimConfig(learning_rate=1e-2, warmup_steps=10),
                     train=TrainConfig(steps=150, batch_size=8, seq_len=128, eval_every=0,
                                       eval_batches=2, checkpoint_every=0, sample_tokens=0),
                     mesh=MESH, progress=False)
  return result["eval"]["loss"], unigram


def test_loss_falls_well_below_unigram_entropy(tmp_path):
  """Held-out loss beats a unigram model fitted on the training stream by >= 0.5 nats.

  The run is a subprocess at XLA's default optimisation level: conftest's level 0 (fast
  compiles for the many small programs) made these 150 steps four times slower."""
  flags = re.sub(r"--xla_backend_optimization_level=\d+", "", os.environ.get("XLA_FLAGS", ""))
  code = ("import json, test_train; "
          f"print(json.dumps(test_train._loss_and_unigram({str(tmp_path)!r})))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                     cwd=os.path.join(REPO, "tests"), env={**os.environ, "XLA_FLAGS": flags})
  assert r.returncode == 0, r.stderr[-3000:]
  loss, unigram = json.loads(r.stdout.strip().splitlines()[-1])
  assert loss < unigram - 0.5, (loss, unigram)


def _random_batch(b: int, length: int, seed: int, vocab: int = 64) -> dict[str, jax.Array]:
  """One unpacked causal batch of random tokens, with random 0/1 loss weights."""
  rng = np.random.default_rng(seed)
  batch = {"decoder_input_tokens": rng.integers(1, vocab, (b, length)),
           "decoder_target_tokens": rng.integers(1, vocab, (b, length)),
           "decoder_loss_weights": rng.integers(0, 2, (b, length)).astype(np.float32),
           "decoder_segment_ids": np.ones((b, length), np.int32),
           "decoder_positions": np.tile(np.arange(length), (b, 1)),
           "decoder_causal_attention": np.zeros((b, length), np.int32)}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_grad_accumulation_equals_big_batch():
  """Two micro-batches give the big batch's gradient (its norm before clipping, so a wrongly
  scaled sum would fail; AdamW's first step alone is almost scale-free), its loss and MoE
  auxiliary loss (the router z-loss, a per-token mean; the load-balancing loss is a statistic
  of the whole (micro-)batch, so it is off here), and the same parameters after the step."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dtype="float32",
                    moe=MoeConfig(num_experts=4, top_k=2, load_balance_weight=0.0,
                                  z_loss_weight=1e-3))
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  batch = _random_batch(4, 16, seed=0)
  out = []
  for accum in (1, 2):
    setup = ts.make_setup(cfg, OptimConfig(grad_accum_steps=accum, warmup_steps=0), 10, 0, mesh,
                          sharding.RULES["data_parallel"])
    state, m = ts.jit_train_step(setup, batch)(ts.init_state(setup, 0), batch)
    out.append((state["params"], m))
  for x, y in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(x, y, atol=2e-6)
  for key in ("loss", "grad_norm", "aux_loss"):
    np.testing.assert_allclose(out[0][1][key], out[1][1][key], rtol=1e-5)
  assert float(out[0][1]["aux_loss"]) > 0


@pytest.mark.parametrize("tie, bias", [(False, False), (True, False), (False, True)])
def test_loss_chunks_equal_one_pass_loss(tie, bias):
  """ModelConfig.loss_chunk_len runs the head + loss chunk by chunk (the fused form under a
  gradient): same gradients, training metrics and evaluation sums as the one-pass loss (tied
  and untied heads, a head with a bias (and LayerNorms), z-loss on)."""
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  batch = _random_batch(2, 16, seed=1)
  out = []
  for chunk in (0, 4):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dtype="float32",
                      tie_embeddings=tie, z_loss=1e-2, loss_chunk_len=chunk, head_bias=bias,
                      norm_type="layer" if bias else "rms")
    setup = ts.make_setup(cfg, OptimConfig(warmup_steps=0), 10, 0, mesh,
                          sharding.RULES["data_parallel"])
    state = ts.init_state(setup, 0)
    grads = jax.grad(lambda p, setup=setup: ts._forward_sums(  # pylint: disable=protected-access
        setup, p, batch, None, True, for_grad=True)[0]["objective_sum"])(state["params"])
    state, m = ts.jit_train_step(setup, batch)(state, batch)
    out.append((grads, m, ts.eval_step(setup, state["params"], batch)))
  for x, y in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  for key in ("loss", "accuracy", "z_loss"):
    np.testing.assert_allclose(out[0][1][key], out[1][1][key], rtol=1e-6)
  for key in ("loss_sum", "z_loss_sum", "correct_sum", "weight_sum"):  # eval_step's sums
    np.testing.assert_allclose(out[0][2][key], out[1][2][key], rtol=1e-6)


def _launch(*args, env=None):
  """launch/train.py in a fresh interpreter: for what only shows at interpreter shutdown."""
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300,
                        env={**os.environ, **(env or {})})


@pytest.fixture(name="launch")
def fixture_launch(capsys, monkeypatch):
  """launch/train.py's `main` in this process (no interpreter and TensorFlow start-up per
  call): returns its exit code and what it printed, as `_launch` does."""
  spec = importlib.util.spec_from_file_location("launch_train",
                                                os.path.join(REPO, "launch", "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.chdir(REPO)

  def call(*args):
    capsys.readouterr()
    try:
      code = module.main(list(args))
    except SystemExit as e:  # argparse's usage errors
      code = e.code
    finally:
      gin_setup.clear()
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
  return call


def test_unknown_gin_binding_fails_cleanly(tmp_path, launch):
  wd = tmp_path / "wd"
  r = launch("--gin_file=gin/experiments/tiny_dense_ul2.gin", "--gin_bindings=TrainConfig.stepz=3",
              f"--workdir={wd}")
  assert r.returncode == 2
  assert "stepz" in r.stderr and "Traceback" not in r.stderr
  assert not wd.exists()


def test_non_finite_step_fails_cleanly(tmp_path):
  """A diverging run stops with a one-line error (exit 2): no traceback, and TensorBoard's
  writer is closed before exit (left open, it raised again at interpreter shutdown)."""
  r = _launch("--gin_file=gin/experiments/tiny_dense_ul2.gin",
              "--gin_bindings=OptimConfig.learning_rate = 1e30",
              "--gin_bindings=OptimConfig.warmup_steps = 0", "--gin_bindings=TrainConfig.steps = 4",
              "--gin_bindings=MeshConfig.num_devices = 1",
              f"--workdir={tmp_path / 'wd'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "non-finite loss/gradient" in r.stderr
  assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("binding,needle", [
    ("OptimConfig.learning_rate=-1.0", "learning_rate=-1.0"),
    ("DataConfig.vocab_path='/nonexistent/spm.model'", "/nonexistent/spm.model"),
    ("DataConfig.mixture='text_files'", "text_files"),
    ("ModelConfig.loss_chunk_len=3", "loss_chunk_len"),
    ("ModelConfig.attention_mask='causal'", "attention_mask='causal' ignores the bidirectional"),
])
def test_bad_values_fail_before_touching_workdir(tmp_path, launch, binding, needle):
  wd = tmp_path / "wd"
  r = launch("--gin_file=gin/experiments/tiny_dense_ul2.gin", f"--gin_bindings={binding}",
              f"--workdir={wd}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert needle in r.stderr and "Traceback" not in r.stderr
  assert not wd.exists()


def test_non_utf8_text_file_names_the_file(tmp_path, launch):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\n\xff\xfe broken\n")
  wd = tmp_path / "wd"
  r = launch("--gin_file=gin/experiments/tiny_dense_ul2.gin",
              "--gin_bindings=DataConfig.mixture='text_files_ul2'",
              f"--gin_bindings=DataConfig.text_files=('{bad}',)", f"--workdir={wd}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "bad.txt" in r.stderr and "Traceback" not in r.stderr
  assert not wd.exists()


def test_dry_run_prints_resolved_config(launch):
  r = launch("--gin_file=gin/experiments/tiny_dense_ul2.gin", "--dry_run")
  assert r.returncode == 0, r.stderr[-2000:]
  printed = json.loads(r.stdout[r.stdout.index("{"):])
  assert printed["model"]["vocab_size"] > 0 and printed["params"]["total"] > 0
