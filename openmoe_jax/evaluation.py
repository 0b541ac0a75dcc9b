"""`run`: evaluate a checkpoint of a training workdir on a data split (launch/eval.py).

Training evaluates a few fixed batches now and then; this is the measurement to report: a full
pass over the validation split (or N batches), loss / perplexity / token accuracy in total and,
for UL2 data, per denoiser (S = prefix LM, R = regular and X = extreme span corruption, told
apart by the mode token each example starts with), plus the MoE routing statistics at
evaluation capacity. Results go to `<workdir>/eval/<split>_step<N>.json`, TensorBoard and
metrics.jsonl (prefix `eval_<split>`).

The per-denoiser sums cost one forward: the loss weights are [B, L, J] (the total and one
masked copy per group), and the loss reduces every per-token value against all J at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx
from tqdm import tqdm

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import losses
from openmoe_jax import metrics as metrics_lib
from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.config import DataConfig, MeshConfig, OptimConfig

TOTAL = "all"
LM = "LM"  # examples without a UL2 mode token (plain language-model data)


def group_names(ul2: bool) -> tuple[str, ...]:
  """Result groups after the total: one per UL2 denoiser kind (S, R, X) and plain LM."""
  if not ul2:
    return ()
  from openmoe_jax.data import ul2 as ul2_lib  # pylint: disable=import-outside-toplevel
  kinds = dict.fromkeys(d.name for d in ul2_lib.DEFAULT_DENOISERS)
  return (*kinds, LM)


def mode_prefixes(vocab: Any) -> dict[str, tuple[int, ...]]:
  """Denoiser kind -> the token ids of its mode token ("S" -> ids of "[S2S]", ...)."""
  from openmoe_jax.data import ul2 as ul2_lib  # pylint: disable=import-outside-toplevel
  from openmoe_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  out: dict[str, tuple[int, ...]] = {}
  for d in ul2_lib.DEFAULT_DENOISERS:
    out.setdefault(d.name, vocab_lib.mode_token_ids(vocab, d.mode))
  return out


def denoiser_groups(batch: dict[str, np.ndarray], prefixes: dict[str, tuple[int, ...]],
                    names: tuple[str, ...]) -> np.ndarray:
  """int32[B, L]: index into `names` of the group of each token's packed example.

  An example's first target token(s) are its mode token (data/ul2.py puts it first in the
  inputs, and the packed targets are inputs + targets); positions restart at 0 per example,
  so a token's example starts at its column minus its position. No mode token: LM."""
  targets_BL, positions_BL = batch["decoder_target_tokens"], batch["decoder_positions"]
  length = targets_BL.shape[1]
  start_BL = np.clip(np.arange(length)[None, :] - positions_BL, 0, length - 1)
  group_BL = np.full(targets_BL.shape, names.index(LM), np.int32)
  for name, ids in prefixes.items():
    match_BL = np.ones(targets_BL.shape, bool)
    for j, token in enumerate(ids):
      idx_BL = np.minimum(start_BL + j, length - 1)
      match_BL &= np.take_along_axis(targets_BL, idx_BL, axis=1) == token
    group_BL = np.where(match_BL & (group_BL == names.index(LM)), names.index(name), group_BL)
  return group_BL


def group_weights(batch: dict[str, np.ndarray], group_BL: np.ndarray | None,
                  num_groups: int) -> np.ndarray:
  """float32[B, L, J]: the loss weights in total, then masked to each of the G groups."""
  weights_BL = batch["decoder_loss_weights"].astype(np.float32)
  if group_BL is None:
    return weights_BL[..., None]
  masks_BLG = group_BL[..., None] == np.arange(num_groups, dtype=np.int32)
  return np.concatenate([weights_BL[..., None], weights_BL[..., None] * masks_BLG], axis=-1)


def jit_grouped_eval(setup: ts.Setup, batch_spec: dict[str, Any]) -> Callable[..., Any]:
  """(params, batch with [B, L, J] loss weights) -> (loss sums of shape [J], MoE aux).

  `losses.cross_entropy` reduces each per-token value against the J weightings at once, so
  the model and the head run once for all groups."""
  replicated = NamedSharding(setup.mesh, P())

  def step(params, batch):
    with sharding.activate(setup.mesh, setup.rules):
      return ts.eval_step(setup, params, batch, with_aux=True)

  return jax.jit(step, in_shardings=(setup.state_shardings["params"],
                                     ts.batch_shardings(setup, batch_spec)),
                 out_shardings=replicated)


class Evaluator:
  """Loss sums in total and per UL2 denoiser over batches, for one Setup (compiled at the
  first batch). Used by `run` and by the training loop's periodic evaluation."""

  def __init__(self, setup: ts.Setup, data_cfg: DataConfig):
    from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    self.setup = setup
    self.names = group_names(data_cfg.ul2)
    self.prefixes = mode_prefixes(pipeline.get_vocabulary(data_cfg)) if self.names else {}
    self._step_fn = None

  def __call__(self, params: Any, batches: Iterable[dict[str, np.ndarray]],
               bar: Any = None) -> tuple[dict[str, dict[str, float]], dict[str, float], int]:
    """(results per group, "all" first; MoE statistics; number of batches) of this host's
    `batches` (numpy, host-local rows), every host calling with as many batches."""
    mesh = self.setup.mesh
    total = aux_total = None
    n_done = 0
    for batch in batches:
      group_BL = denoiser_groups(batch, self.prefixes, self.names) if self.names else None
      batch = {**batch, "decoder_loss_weights": group_weights(batch, group_BL, len(self.names))}
      global_batch = {k: jax.make_array_from_process_local_data(
          sharding.batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}
      if self._step_fn is None:
        self._step_fn = jit_grouped_eval(self.setup, global_batch)
      sums, aux = self._step_fn(params, global_batch)
      # Summed on the device: no host sync per batch. The MoE summary is linear in `aux`.
      total, aux_total = ((sums, aux) if total is None else
                          jax.tree.map(jnp.add, (total, aux_total), (sums, aux)))
      n_done += 1
      if bar is not None:
        bar.update(1)
    if total is None:
      raise ValueError("no batch to evaluate")
    total = jax.device_get(total)
    moe = metrics_lib.moe_summary(jax.tree.map(lambda a: a / n_done, aux_total))[0]
    results = {}
    for i, name in enumerate((TOTAL, *self.names)):
      group_sums = {k: total[k][i] for k in ("loss_sum", "correct_sum", "weight_sum")}
      row = {k: float(v) for k, v in losses.summarize(group_sums).items()}
      if name == TOTAL or row["tokens"] > 0:
        results[name] = row
    return results, moe, n_done


def flat_scalars(results: dict[str, dict[str, float]], moe: dict[str, float]) -> dict[str, float]:
  """{"loss": ..., "S/loss": ..., "moe/...": ...}: the total unprefixed, groups by name."""
  scalars = {}
  for name, row in results.items():
    for k, v in row.items():
      scalars[k if name == TOTAL else f"{name}/{k}"] = v
  return {**scalars, **moe}


def _batches(it: Iterator[dict[str, np.ndarray]], n_batches: int, hosts: int,
             ) -> Iterator[dict[str, np.ndarray]]:
  """`n_batches` batches (0: until the split ends). With several hosts, a host whose shard
  has ended feeds all-padding batches (zero loss weight) until every host's has."""
  done, spare = 0, None
  while not n_batches or done < n_batches:
    batch = next(it, None)
    more = batch is not None
    if hosts > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      more = bool(np.any(multihost_utils.process_allgather(np.int32(more))))
    if not more:
      if n_batches:
        raise ValueError(f"the split ended after {done} batches; asked for {n_batches} "
                         "(use 0 for a full pass)")
      return
    if batch is None:
      batch = {k: np.zeros_like(v) for k, v in spare.items()}
    spare = batch
    done += 1
    yield batch


def _available_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def run(workdir: str, split: str = "validation", batches: int = 0, step: int | None = None,
        batch_size: int = 0, seq_len: int = 0, data: dict[str, Any] | None = None,
        mesh: MeshConfig | None = None, write: bool = True,
        progress: bool = True) -> dict[str, Any]:
  """Evaluates the latest (or `step`'s) checkpoint of `workdir` on `split`.

  batches: 0 = one full pass over the split (the last batch padded with empty rows), else
  its first N batches (the ones training evaluates on, for N = TrainConfig.eval_batches);
  more than one pass holds is an error.
  batch_size, seq_len: 0 = the run's TrainConfig values. data: DataConfig fields to change
  (evaluate on other text: {"mixture": "text_files_lm", "ul2": False, "text_files": (...)}).
  mesh: None = the run's own MeshConfig.
  Returns {"step", "split", "batches", "results": {"all": {...}, "S": {...}, ...}, "moe"}.
  """
  from openmoe_jax import inference  # pylint: disable=import-outside-toplevel
  from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if batches < 0:
    raise ValueError(f"batches={batches}; expected >= 0 (0 = a full pass)")
  config = inference.load_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  steps = _available_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {os.path.abspath(directory)}")
  if step is not None and step not in steps:
    raise ValueError(f"step={step} has no checkpoint in {directory}; saved steps: {steps}")
  model_cfg, data_cfg = inference.model_and_data(config)
  if data:
    unknown = set(data) - {f.name for f in dataclasses.fields(DataConfig)}
    if unknown:
      raise ValueError(f"data overrides {sorted(unknown)} are not DataConfig fields")
    data_cfg = dataclasses.replace(data_cfg, **{
        k: tuple(v) if k == "text_files" else v for k, v in data.items()})
  if pipeline.vocab_size(data_cfg) > model_cfg.vocab_size:
    raise ValueError(f"the data's vocabulary ({pipeline.vocab_size(data_cfg)} ids) is larger "
                     f"than the model's ({model_cfg.vocab_size})")
  train_fields = config["train"]
  mesh_cfg = mesh if mesh is not None else MeshConfig(**config["mesh"])
  batch_size = batch_size or int(train_fields["batch_size"])
  seq_len = seq_len or int(train_fields["seq_len"])
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  host, hosts = jax.process_index(), jax.process_count()
  device_mesh = sharding.make_mesh(mesh_cfg)
  sharding.check_batch(batch_size, device_mesh, hosts)
  rules = sharding.RULES[mesh_cfg.rules]
  setup = ts.make_setup(model_cfg, OptimConfig(**config["optim"]),
                        int(train_fields["steps"]), int(train_fields["seed"]), device_mesh, rules)
  abstract = nnx.split(nnx.eval_shape(lambda: ts.build_model(model_cfg, 0)), nnx.Param)[1]
  params, restored = ckpt_lib.restore_params(directory, abstract,
                                             setup.state_shardings["params"], step)

  it = pipeline.make_iterator(data_cfg, split, batch_size // hosts, seq_len, data_cfg.seed,
                              shard_index=host, num_shards=hosts, num_epochs=1)
  bar = tqdm(total=batches or None, disable=not progress or host != 0, unit="batch",
             dynamic_ncols=True, desc=f"eval {split}")
  try:
    results, moe, n_done = Evaluator(setup, data_cfg)(params, _batches(it, batches, hosts), bar)
  finally:
    bar.close()
  summary = {"step": restored, "split": split, "mixture": data_cfg.mixture, "batches": n_done,
             "batch_size": batch_size, "seq_len": seq_len, "results": results, "moe": moe}
  if write and host == 0:
    _write(workdir, summary)
  return summary


def _write(workdir: str, summary: dict[str, Any]) -> None:
  """eval/<split>_step<N>.json (atomically), TensorBoard and metrics.jsonl."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{summary['split']}_step{summary['step']}.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, path)
  writer = metrics_lib.Writer(workdir)
  try:
    writer.scalars(summary["step"], flat_scalars(summary["results"], summary["moe"]),
                   prefix=f"eval_{summary['split']}")
  finally:
    writer.close()


def format_table(summary: dict[str, Any]) -> str:
  """The results as a Markdown table, one row per group."""
  lines = [f"step {summary['step']}, {summary['mixture']} {summary['split']} split, "
           f"{summary['batches']} batches "
           f"of {summary['batch_size']} x {summary['seq_len']}",
           "| group | tokens | loss | perplexity | accuracy |", "| --- | --- | --- | --- | --- |"]
  for name, r in summary["results"].items():
    lines.append(f"| {name} | {r['tokens']:,.0f} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
                 f"{r['accuracy']:.4f} |")
  for k, v in sorted(summary["moe"].items()):
    lines.append(f"{k}: {v:.4f}")
  return "\n".join(lines)

