"""`run`: the single training entry point (gin binds its arguments), flat top to bottom.

Order matters for "nothing half-written": every input (configs, vocabulary, corpus) is checked
and the data pipeline built before the workdir is touched.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import chunked_loss
from openmoe_jax import evaluation
from openmoe_jax import metrics as metrics_lib
from openmoe_jax import preemption
from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.config import (DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig)

CONFIG_FILE = "config.json"


def _git_sha() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def resolved_config(model: ModelConfig, data: DataConfig, optim: OptimConfig, train: TrainConfig,
                    mesh: MeshConfig) -> dict[str, Any]:
  return {"model": dataclasses.asdict(model), "data": dataclasses.asdict(data),
          "optim": dataclasses.asdict(optim), "train": dataclasses.asdict(train),
          "mesh": dataclasses.asdict(mesh)}


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
  """Rebuilds the ModelConfig saved in config.json (for sampling and conversion)."""
  from openmoe_jax.config import MoeConfig  # pylint: disable=import-outside-toplevel
  fields = dict(d)
  if fields.get("moe") is not None:
    fields["moe"] = MoeConfig(**fields["moe"])
  from openmoe_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  for name, cls in (("switchhead", config_lib.SwitchHeadConfig), ("umoe", config_lib.UmoeConfig)):
    if fields.get(name) is not None:
      fields[name] = cls(**fields[name])
  fields["extra"] = tuple(tuple(kv) for kv in fields.get("extra", ()))
  return ModelConfig(**fields)


def _write_run_files(workdir: str, config: dict[str, Any]) -> None:
  """config.json (+ git SHA, command line) and the operative gin config, at step 0."""
  record = {**config, "git_sha": _git_sha(), "argv": sys.argv}
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, default=str)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
  if "gin" in sys.modules:
    from openmoe_jax import gin_setup  # pylint: disable=import-outside-toplevel
    with open(os.path.join(workdir, "operative_config.gin"), "w", encoding="utf-8") as f:
      f.write(gin_setup.operative_config())


def _check_resume_config(workdir: str, config: dict[str, Any], optim: OptimConfig,
                         start: int) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
    saved = json.load(f)
  for key in ("model", "data", "optim"):
    if json.loads(json.dumps(saved[key])) != json.loads(json.dumps(config[key], default=str)):
      raise ValueError(f"{workdir} holds a run with a different {key} config; "
                       "use a new --workdir or the same configuration to resume")
  # Extending (or shortening) a run is allowed, but a cosine schedule without decay_steps is
  # as long as the run: its learning rate changes from this step on. Say so.
  was, now = saved["train"]["steps"], config["train"]["steps"]
  if was != now and optim.schedule == "cosine" and not optim.decay_steps:
    from openmoe_jax import optimizer  # pylint: disable=import-outside-toplevel
    lr_was, lr_now = (float(optimizer.schedule(optim, n)(start)) for n in (was, now))
    warnings.warn(f"resuming at step {start} with TrainConfig.steps={now} (the run started "
                  f"with {was}): the cosine decay follows it, so the learning rate there is "
                  f"{lr_now:.3g} (was {lr_was:.3g}); set OptimConfig.decay_steps in a new run "
                  "to decouple the schedule from the run's length", stacklevel=2)


def _to_global(batch: dict[str, np.ndarray], setup: ts.Setup) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(setup.mesh, v.ndim), v) for k, v in batch.items()}


def evaluate(evaluator: evaluation.Evaluator, params: Any, eval_it: Any,
             start_state: dict[str, Any], n_batches: int) -> dict[str, float]:
  """Loss / perplexity / accuracy (in total and per UL2 denoiser, "S/loss") and the MoE
  statistics over the same `n_batches` validation batches every time."""
  eval_it.set_state(start_state)
  results, moe, _ = evaluator(params, itertools.islice(eval_it, n_batches))
  return evaluation.flat_scalars(results, moe)


def run(workdir: str, model: ModelConfig = ModelConfig(), data: DataConfig = DataConfig(),
        optim: OptimConfig = OptimConfig(), train: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(), dry_run: bool = False,
        progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) a model in `workdir`; returns final train/eval metrics."""
  host, hosts = jax.process_index(), jax.process_count()
  # Checks of the configs alone come first: they fail in seconds, before the data pipeline
  # (TensorFlow, seqio, the vocabulary) is built.
  if train.batch_size % (optim.grad_accum_steps * hosts):
    raise ValueError(f"TrainConfig.batch_size={train.batch_size} not divisible by "
                     f"grad_accum_steps * hosts = {optim.grad_accum_steps * hosts}")
  device_mesh = sharding.make_mesh(mesh)
  # Each micro-batch must split evenly over the batch mesh axes and the hosts.
  sharding.check_batch(train.batch_size // optim.grad_accum_steps, device_mesh, hosts)
  rules = sharding.RULES.get(mesh.rules)
  if rules is None:
    raise ValueError(f"MeshConfig.rules={mesh.rules!r}; expected one of {sorted(sharding.RULES)}")
  chunked_loss.num_chunks(train.seq_len, model.loss_chunk_len)  # raises if it does not divide
  if model.attention_mask == "causal" and data.ul2:
    raise ValueError("ModelConfig.attention_mask='causal' ignores the bidirectional prefixes "
                     "that the UL2 objective (DataConfig.ul2=True) trains with; use 'packed', "
                     "or DataConfig.ul2=False")
  from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  train_it = pipeline.make_iterator(data, "train", train.batch_size // hosts, train.seq_len,
                                    data.seed, shard_index=host, num_shards=hosts)
  data_vocab_size = pipeline.vocab_size(data)
  if model.vocab_size and model.vocab_size < data_vocab_size:
    raise ValueError(f"ModelConfig.vocab_size={model.vocab_size} is smaller than the "
                     f"vocabulary's {data_vocab_size} ids")
  model = dataclasses.replace(model, vocab_size=model.vocab_size or data_vocab_size)
  setup = ts.make_setup(model, optim, train.steps, train.seed, device_mesh, rules)
  config = resolved_config(model, data, optim, train, mesh)
  if dry_run:
    from openmoe_jax import params as params_lib  # pylint: disable=import-outside-toplevel
    counts = params_lib.count_params(model)
    print(json.dumps({**config, "params": counts}, indent=2, default=str))
    return {"params": counts}

  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), train.keep_checkpoints,
                               train.checkpoint_every)
  eval_it = pipeline.make_iterator(data, "validation", train.batch_size // hosts, train.seq_len,
                                   data.seed, shard_index=host, num_shards=hosts)
  eval_start = eval_it.get_state()
  start = ckpt.latest_step()
  if start is None:
    _write_run_files(workdir, config)
    state, start = ts.init_state(setup, train.seed), 0
  else:
    _check_resume_config(workdir, config, optim, start)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                            jax.eval_shape(lambda: ts.init_state(setup, train.seed)))
    state, data_state = ckpt.restore(abstract, setup.state_shardings, start)
    train_it.set_state(data_state)
  writer = metrics_lib.Writer(workdir, enabled=host == 0)
  step_fn = None
  evaluator = evaluation.Evaluator(setup, data)
  tokens_per_step = train.batch_size * train.seq_len
  bar = tqdm(total=train.steps, initial=start, disable=not progress or host != 0,
             unit="step", dynamic_ncols=True, desc="train")
  pending, last_time, summary = None, time.time(), {}

  def drain(pending) -> dict[str, float]:
    """Fetches one step's metrics (one step late, so the device never waits on the host)."""
    step, m = pending
    m = jax.device_get(m)
    scalars = {k: float(v) for k, v in m.items() if k != "moe"}
    if not np.isfinite(scalars["loss"]) or not np.isfinite(scalars["grad_norm"]):
      raise FloatingPointError(f"non-finite loss/gradient at step {step}: {scalars}; "
                               "last good checkpoint is kept")
    moe_scalars, loads = metrics_lib.moe_summary(m["moe"])
    scalars.update(moe_scalars)
    if step % train.log_every == 0 or step == train.steps:
      writer.scalars(step, scalars)
      if loads:
        writer.expert_load(step, loads["expert_load_LE"])
    return scalars

  step = start
  watch = preemption.Watch().start()  # SIGTERM, Ctrl-C: checkpoint the step in flight, then stop
  try:
    while step < train.steps:
      batch = _to_global(next(train_it), setup)
      if step_fn is None:
        step_fn = ts.jit_train_step(setup, batch)
      state, step_metrics = step_fn(state, batch)
      step += 1
      if pending is not None:
        summary["train"] = drain(pending)
      pending = (step, step_metrics)
      now = time.time()
      # Metrics arrive one step late (no host sync in the loop): no loss before step 2.
      train_loss = summary.get("train", {}).get("loss")
      bar.set_postfix(loss="-" if train_loss is None else f"{train_loss:.3f}",
                      tok_s=f"{tokens_per_step / max(now - last_time, 1e-9):,.0f}")
      bar.update(1)
      last_time = now
      if train.eval_every and step % train.eval_every == 0 and step < train.steps:
        result = evaluate(evaluator, state["params"], eval_it, eval_start, train.eval_batches)
        writer.scalars(step, result, prefix="eval")
      if train.checkpoint_every and step % train.checkpoint_every == 0:
        summary["train"] = drain(pending)  # never checkpoint a non-finite state
        pending = None
        ckpt.save(step, state, train_it.get_state())
      if watch.reached(step):
        if pending is not None:
          summary["train"] = drain(pending)
          pending = None
        if ckpt.latest_step() != step:
          ckpt.save(step, state, train_it.get_state(), force=True)
        reason, signal_name = (("interrupted", "Ctrl-C") if watch.interrupted
                               else ("preempted", "SIGTERM"))
        summary[reason] = True
        writer.text(step, reason, f"{signal_name}: stopped after step {step}, checkpoint saved")
        break
      if train.stop_after and step >= train.stop_after:
        break
    if pending is not None:
      summary["train"] = drain(pending)
      pending = None
  except BaseException:
    # Also a second Ctrl-C, which stops at once: nothing is saved then, since the state may be
    # donated to a step whose result never arrived (preemption.py). Finish pending checkpoint
    # writes and stop TensorBoard's writer thread before the error propagates (a writer left
    # open fails again in an atexit hook at interpreter shutdown).
    ckpt.close()
    writer.close()
    raise
  finally:
    watch.stop()
    bar.close()
  if summary.get("interrupted"):
    ckpt.close()
    writer.close()
    raise KeyboardInterrupt(f"Ctrl-C: stopped after step {step}, whose checkpoint is saved; "
                            "re-running the same command resumes from it")
  if step >= train.steps:
    if ckpt.latest_step() != step:
      ckpt.save(step, state, train_it.get_state(), force=True)
    summary["eval"] = evaluate(evaluator, state["params"], eval_it, eval_start,
                               train.eval_batches)
    writer.scalars(step, summary["eval"], prefix="eval")
    if train.sample_tokens:
      summary["sample"] = sample_text(setup, state["params"], data, train.sample_prompt,
                                      train.sample_tokens, train.sample_temperature,
                                      train.sample_top_p, train.sample_seed)
      with open(os.path.join(workdir, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(summary["sample"] + "\n")
      writer.text(step, "sample", summary["sample"])
  ckpt.close()
  writer.close()
  summary["step"] = step
  return summary


def sample_text(setup: ts.Setup, params: Any, data: DataConfig, prompt: str, n_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
  """Sampled (greedy at temperature 0) continuation of `prompt` as a prefix-LM prompt."""
  from openmoe_jax import inference  # pylint: disable=import-outside-toplevel
  session = inference.Session(setup.graphdef, params, data, int(-1))
  return prompt + session.complete([prompt], max_new_tokens=n_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed)[0]
