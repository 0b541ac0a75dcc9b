"""Checkpoint evaluation (openmoe_jax.evaluation, launch/eval.py): the training run's own
evaluation, a float64 reference per UL2 denoiser, a full pass that covers the split, errors."""
import fcntl
import json
import os
import runpy
import shutil

import numpy as np
import pytest

from openmoe_jax import evaluation, inference, losses, metrics, train
from openmoe_jax.config import (DataConfig, MeshConfig, ModelConfig, MoeConfig, OptimConfig,
                                TrainConfig)
from openmoe_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Eval capacity of every token (cf * k / E = 1): no drops, so the 2-device evaluation and the
# one-device reference route the same tokens.
MODEL = ModelConfig(vocab_size=0, d_model=64, n_layers=2, n_heads=4, d_ff=128, dtype="float32",
                    moe=MoeConfig(num_experts=4, top_k=2, d_expert=64, layer_period=2,
                                  layer_offset=1, capacity_factor_eval=2.0))
BATCH, SEQ, EVAL_BATCHES = 8, 128, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 6-step training run, trained once per test session: xdist's workers share it through a
  file lock in their common temporary root, and each works on its own copy."""
  root = tmp_path_factory.getbasetemp().parent
  shared, result_json = root / "eval_run", root / "eval_run.json"
  with open(root / "eval_run.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result_json.exists():
      result = train.run(str(shared), model=MODEL, data=DataConfig(),
                         optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
                         train=TrainConfig(steps=6, batch_size=BATCH, seq_len=SEQ, eval_every=0,
                                           eval_batches=EVAL_BATCHES, checkpoint_every=3,
                                           sample_tokens=0),
                         mesh=MeshConfig(num_devices=2), progress=False)
      result_json.write_text(json.dumps(result["eval"]), encoding="utf-8")
  path = tmp_path_factory.mktemp("eval") / "run"
  shutil.copytree(shared, path)
  return str(path), json.loads(result_json.read_text(encoding="utf-8"))


def _reference_groups(batch, prefixes):
  """Group name per token, example by example through the segment ids (not the positions)."""
  names = np.full(batch["decoder_target_tokens"].shape, evaluation.LM, object)
  for b, (seg_L, tgt_L) in enumerate(zip(batch["decoder_segment_ids"],
                                         batch["decoder_target_tokens"])):
    for s in set(seg_L.tolist()) - {0}:
      idx = np.flatnonzero(seg_L == s)
      for name, ids in prefixes.items():
        if tuple(tgt_L[idx[:len(ids)]].tolist()) == ids:
          names[b, idx] = name
          break
  return names


def _float64_reference(workdir, n_batches, data=None, seq_len=SEQ):
  """Per-group (loss sum, correct sum, tokens) from the model's logits in float64 numpy."""
  session = inference.load(workdir)
  model, data = session.model, data or session.data
  prefixes = evaluation.mode_prefixes(pipeline.get_vocabulary(data))
  it = pipeline.make_iterator(data, "validation", BATCH, seq_len, data.seed)
  out = {}
  for _ in range(n_batches):
    batch = next(it)
    logits, _, _ = model(batch["decoder_input_tokens"], positions_BL=batch["decoder_positions"],
                         segment_ids_BL=batch["decoder_segment_ids"],
                         prefix_BL=batch["decoder_causal_attention"], deterministic=True)
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    log_p = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    tgt = batch["decoder_target_tokens"]
    nll = -np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
    correct = (np.take_along_axis(logits, tgt[..., None], -1)[..., 0] >= m[..., 0]).astype(float)
    w = batch["decoder_loss_weights"].astype(np.float64)
    groups = _reference_groups(batch, prefixes)
    for name in (evaluation.TOTAL, *prefixes, evaluation.LM):
      mask = w if name == evaluation.TOTAL else w * (groups == name)
      acc = out.setdefault(name, np.zeros(3))
      acc += [(nll * mask).sum(), (correct * mask).sum(), mask.sum()]
  return out


def test_matches_training_eval_and_float64_reference(workdir):
  path, train_eval = workdir
  summary = evaluation.run(path, batches=EVAL_BATCHES, progress=False)
  assert summary["step"] == 6 and summary["batches"] == EVAL_BATCHES
  res = summary["results"]
  # The training loop's end-of-run evaluation covers the same batches.
  np.testing.assert_allclose(res["all"]["loss"], train_eval["loss"], rtol=1e-6)
  assert res["all"]["tokens"] == train_eval["tokens"]
  for name in ("S", "R", "X"):  # training logs the per-denoiser losses too
    np.testing.assert_allclose(res[name]["loss"], train_eval[f"{name}/loss"], rtol=1e-6)
  logged = [r for r in metrics.read_jsonl(path) if "eval/S/loss" in r]
  assert logged and logged[-1]["step"] == 6 and "eval/moe/dropped_fraction" in logged[-1]
  ref = _float64_reference(path, EVAL_BATCHES)
  assert set(res) == {k for k, v in ref.items() if v[2] > 0}
  assert {"S", "R", "X"} <= set(res)  # all three UL2 denoiser kinds are in two batches
  for name, row in res.items():
    loss_sum, correct_sum, tokens = ref[name]
    assert row["tokens"] == tokens, name
    np.testing.assert_allclose(row["loss"], loss_sum / tokens, rtol=2e-6, err_msg=name)
    np.testing.assert_allclose(row["accuracy"], correct_sum / tokens, atol=1e-6, err_msg=name)
  assert summary["moe"]["moe/dropped_fraction"] == 0.0
  assert 0.0 < summary["moe"]["moe/router_entropy"] <= np.log(4) + 1e-6


def test_full_pass_covers_the_split_and_is_written(workdir):
  path, _ = workdir
  summary = evaluation.run(path, batches=0, step=3, progress=False)
  assert summary["step"] == 3
  data = inference.load(path).data
  it = pipeline.make_iterator(data, "validation", BATCH, SEQ, data.seed, num_epochs=1)
  weights = [b["decoder_loss_weights"].sum() for b in it]
  res = summary["results"]
  assert summary["batches"] == len(weights) > EVAL_BATCHES
  assert res["all"]["tokens"] == sum(weights)
  groups = [r for name, r in res.items() if name != "all"]
  assert sum(r["tokens"] for r in groups) == res["all"]["tokens"]
  np.testing.assert_allclose(sum(r["loss"] * r["tokens"] for r in groups),
                             res["all"]["loss"] * res["all"]["tokens"], rtol=1e-5)
  with open(os.path.join(path, "eval", "validation_step3.json"), encoding="utf-8") as f:
    assert json.load(f)["results"] == res
  logged = [r for r in metrics.read_jsonl(path) if "eval_validation/loss" in r]
  assert logged[-1]["step"] == 3
  assert logged[-1]["eval_validation/S/loss"] == res["S"]["loss"]


def test_other_data_and_length(workdir):
  """Plain-LM examples at another length: one group, against the float64 reference."""
  path, _ = workdir
  summary = evaluation.run(path, batches=2, seq_len=64, data={"mixture": "stdlib_lm", "ul2": False},
                           write=False, progress=False)
  assert summary["mixture"] == "stdlib_lm" and summary["seq_len"] == 64
  assert list(summary["results"]) == ["all"]
  ref = _float64_reference(path, 2, DataConfig(mixture="stdlib_lm", ul2=False), 64)["all"]
  row = summary["results"]["all"]
  assert row["tokens"] == ref[2] > 0
  np.testing.assert_allclose(row["loss"], ref[0] / ref[2], rtol=2e-6)
  with pytest.raises(ValueError, match="not DataConfig fields"):
    evaluation.run(path, data={"mixtures": "x"})
  with pytest.raises(ValueError, match="max_seq_len"):
    evaluation.run(path, seq_len=4096)


def test_denoiser_groups_by_mode_prefix():
  prefixes = {"S": (7,), "R": (5, 6)}
  names = ("S", "R", evaluation.LM)
  # Row 0: an S example (3 tokens), an R example (2-token mode), padding. Row 1: a plain
  # example that starts with 5 but not 5, 6 (LM), then an S example.
  batch = {"decoder_target_tokens": np.array([[7, 1, 2, 5, 6, 3, 0, 0], [5, 9, 9, 7, 4, 0, 0, 0]]),
           "decoder_positions": np.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 0, 1, 0, 0, 0]]),
           "decoder_segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 0, 0, 0]])}
  got = evaluation.denoiser_groups(batch, prefixes, names)
  np.testing.assert_array_equal(got, [[0, 0, 0, 1, 1, 1, 2, 2], [2, 2, 2, 0, 0, 2, 2, 2]])
  ref = _reference_groups(batch, prefixes)
  real = batch["decoder_segment_ids"] > 0
  assert all(names[g] == r for g, r in zip(got[real], ref[real]))
  w = evaluation.group_weights({"decoder_loss_weights": np.ones((2, 8), np.float32)}, got, 3)
  assert w.shape == (2, 8, 4)
  np.testing.assert_array_equal(w[..., 1:].sum(-1), w[..., 0])
  np.testing.assert_array_equal(w[..., 1:].argmax(-1), got)


def test_errors_name_the_problem(workdir, tmp_path):
  path, _ = workdir
  with pytest.raises(FileNotFoundError, match="training workdir"):
    evaluation.run(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match=r"saved steps: \[3, 6\]"):
    evaluation.run(path, step=4)
  with pytest.raises(ValueError, match="batches=-1"):
    evaluation.run(path, batches=-1)
  with pytest.raises(ValueError, match="split ended after"):
    evaluation.run(path, batches=10_000, write=False, progress=False)


def test_command_line_prints_the_table(workdir, capsys, monkeypatch):
  path, _ = workdir
  # main() applies distributed.DEFAULT_XLA_FLAGS to XLA_FLAGS: undone after the test.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  cli = runpy.run_path(os.path.join(REPO, "launch", "eval.py"))  # its main(argv), in-process
  assert cli["main"]([f"--workdir={path}", "--batches=1", "--no_progress",
                      "--data_parallel"]) == 0
  out = capsys.readouterr().out
  assert "| all |" in out and "| S |" in out, out
  assert cli["main"]([f"--workdir={path}", "--step=5"]) == 2
  assert "saved steps" in capsys.readouterr().err


def test_parameters_restore_into_another_mesh(workdir):
  """Trained on 2 devices, restored into a data-parallel mesh of 8 with the shardings asked for."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from openmoe_jax import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from openmoe_jax import train_step as ts  # pylint: disable=import-outside-toplevel
  path, _ = workdir
  model_cfg, _ = inference.model_and_data(inference.load_config(path))
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, rules="fsdp"))
  setup = ts.make_setup(model_cfg, OptimConfig(), 6, 0, mesh, sharding.RULES["fsdp"])
  abstract = nnx.split(nnx.eval_shape(lambda: ts.build_model(model_cfg, 0)), nnx.Param)[1]
  want = setup.state_shardings["params"]
  params, step = checkpoint.restore_params(os.path.join(path, "checkpoints"), abstract, want)
  assert step == 6
  got, ref = jax.tree.leaves(params), jax.tree.leaves(inference.load(path).params)
  assert any(len(a.sharding.device_set) == 8 for a in got)
  for a, s, r in zip(got, jax.tree.leaves(want), ref):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


def test_groups_of_a_scanned_moeut_model_equal_separate_evaluations():
  """SwitchHead + sigma-MoE in scanned repeats (the ragged_dot path on CPU): the grouped
  evaluation gives each group's sums of its own masked evaluation."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from openmoe_jax import presets, sharding, train_step as ts  # pylint: disable=import-outside-toplevel
  data = DataConfig()
  cfg = dataclasses.replace(presets.get("moeut-tiny"), vocab_size=pipeline.vocab_size(data))
  mesh = sharding.make_mesh(MeshConfig(num_devices=2))
  setup = ts.make_setup(cfg, OptimConfig(), 10, 0, mesh, sharding.RULES["data_parallel"])
  params = ts.init_state(setup, 0)["params"]
  batch = next(pipeline.make_iterator(data, "validation", 4, 64, 0))
  evaluator = evaluation.Evaluator(setup, data)
  results, _, n = evaluator(params, [batch])
  assert n == 1 and len(results) >= 3  # the total and at least two denoiser kinds
  group_BL = evaluation.denoiser_groups(batch, evaluator.prefixes, evaluator.names)
  one = jax.jit(lambda p, b: ts.eval_step(setup, p, b))
  for j, name in enumerate(evaluator.names):
    if name not in results:
      continue
    masked = {**batch, "decoder_loss_weights":
              batch["decoder_loss_weights"] * (group_BL == j)}
    want = {k: float(v) for k, v in losses.summarize(one(params, masked)).items()}
    assert results[name]["tokens"] == want["tokens"], name
    np.testing.assert_allclose(results[name]["loss"], want["loss"], rtol=1e-5, err_msg=name)
