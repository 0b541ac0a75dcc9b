"""Whole-model training-step benchmark: tokens/s, step time, model FLOPs, MFU and peak memory.

    python -m openmoe_jax.bench.train_step --preset NAME [--batch B --seq L]
        [--attention_impl xla|cudnn|pallas] [--remat none|dots|full] [--dispatch einsum|ragged|gmm]
        [--steps 10 --warmup 3] [--mask causal|prefix_packed] [--scan_layers true|false]
        [--remat_cse_repeats N] [--loss_chunk_len C] [--attention_mask packed|causal]
        [--profile_dir DIR] [--json FILE]

It compiles the real `train_step` (`train_step.make_setup / init_state / jit_train_step`, state
donated) on the default device with synthetic batches in the data contract's format, times
`--steps` device-synchronised steps after `--warmup` ones and reports their median.

Model FLOPs per token: `openmoe_jax.bench.flops` (formula in its docstring).
MFU = model FLOPs per second / the dense bf16 matmul peak measured on the same device in the same
run (an n x n x n matmul, fastest of 30). Peak memory is the allocator's peak bytes in use where the
device reports it (GPU/TPU; once per process, so run one configuration per process for exact
numbers), and XLA's static estimate (arguments + temporaries + outputs - aliased) otherwise.
Imports nothing beyond jax / flax / optax / numpy (no gin, seqio, TF): runs on a bare GPU image.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.bench.flops import active_params_per_token, model_flops_per_token  # noqa: F401
from openmoe_jax.bench.presets import (BUILTIN_PRESETS, available_presets,  # noqa: F401
                                       resolve_preset)
from openmoe_jax.config import MeshConfig, ModelConfig, OptimConfig

MIN_STEPS = 10  # the median is taken over at least this many timed steps
MASKS = ("causal", "prefix_packed")



def apply_overrides(cfg: ModelConfig, *, seq: int, attention_impl: str | None = None,
                    remat: str | None = None, dispatch: str | None = None,
                    gmm_backend: str | None = None, dtype: str | None = None,
                    scan_layers: bool | None = None,
                    logits_dtype: str | None = None,
                    remat_cse_repeats: int | None = None,
                    loss_chunk_len: int | None = None,
                    attention_mask: str | None = None) -> ModelConfig:
  """The preset with benchmark overrides; None leaves a field as the preset has it."""
  changes: dict[str, Any] = {"max_seq_len": max(cfg.max_seq_len, seq)}
  if attention_impl is not None:
    if not any(f.name == "attention_impl" for f in dataclasses.fields(ModelConfig)):
      raise ValueError("--attention_impl needs ModelConfig.attention_impl, which this "
                       "checkout does not have")
    changes["attention_impl"] = attention_impl
  for name, value in (("remat", remat), ("dtype", dtype), ("scan_layers", scan_layers),
                      ("logits_dtype", logits_dtype), ("remat_cse_repeats", remat_cse_repeats),
                      ("loss_chunk_len", loss_chunk_len), ("attention_mask", attention_mask)):
    if value is not None:
      changes[name] = value
  if (dispatch is not None or gmm_backend is not None) and cfg.moe is not None:
    moe_changes = {}
    if dispatch is not None:
      moe_changes["dispatch"] = dispatch
    if gmm_backend is not None:
      moe_changes["gmm_backend"] = gmm_backend
    changes["moe"] = dataclasses.replace(cfg.moe, **moe_changes)
  return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------- batches

def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0,
                    mask: str = "causal") -> dict[str, np.ndarray]:
  """A batch in the data contract's format (docs/CONTRACTS.md) with random tokens.

  "causal": one segment filling each row, every target scored (plain LM).
  "prefix_packed": rows packed with segments of random lengths, each a prefix-LM example whose
  first part is bidirectional and unscored, with a padded tail (UL2-like).
  """
  if mask not in MASKS:
    raise ValueError(f"mask={mask!r}; expected one of {MASKS}")
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, vocab, size=(batch, seq), dtype=np.int32)
  seg = np.ones((batch, seq), np.int32)
  prefix = np.zeros((batch, seq), np.int32)
  weights = np.ones((batch, seq), np.float32)
  if mask == "prefix_packed":
    for b in range(batch):
      start, s = 0, 1
      end_all = seq - int(rng.integers(0, max(seq // 8, 1) + 1))  # padded tail
      while start < end_all:
        length = min(int(rng.integers(max(seq // 8, 2), max(seq // 2, 3))), end_all - start)
        seg[b, start:start + length] = s
        n_in = int(rng.integers(0, length))  # inputs part, then targets
        prefix[b, start:start + n_in + 1] = 1  # seqio: inputs plus the first target position
        weights[b, start:start + n_in] = 0.0
        start, s = start + length, s + 1
      seg[b, end_all:] = 0
  weights *= seg != 0
  targets *= seg != 0
  prefix *= seg != 0
  # Inputs are the targets shifted right within each segment; 0 (BOS) at each segment start.
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = np.where(seg[:, 1:] == seg[:, :-1], targets[:, :-1], 0)
  starts = np.ones((batch, seq), bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  idx = np.arange(seq)[None, :].repeat(batch, 0)
  last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  positions = ((idx - last_start) * (seg != 0)).astype(np.int32)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights, "decoder_segment_ids": seg,
          "decoder_positions": positions, "decoder_causal_attention": prefix}


# ----------------------------------------------------------------------------- timing

def time_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batches: Sequence[Any],
               warmup: int, steps: int) -> tuple[list[float], Any, Any]:
  """Runs warmup + steps train steps (cycling `batches`); returns (timed seconds, state, metrics).

  Each timed step is bracketed by a device sync of the new state, so its time is the device's
  time for that step (dispatch included). The state is donated and threaded through.
  """
  if steps < MIN_STEPS:
    raise ValueError(f"steps={steps}; the median needs at least {MIN_STEPS} timed steps")
  metrics = None
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[(warmup + i) % len(batches)])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return times, state, metrics


def matmul_peak_flops(n: int, dtype: Any = jnp.bfloat16, reps: int = 30) -> float:
  """Dense n x n x n matmul FLOP/s on the default device: the fastest of `reps` timed products
  on random operands (a peak, so MFU errs low; the median moved 606-706 TFLOP/s between
  processes on one H100)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
  jax.block_until_ready(f(a, b))
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / min(times)


def device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return int(peak) if peak is not None else None


def xla_memory_estimate(compiled: Any) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # backends without a memory analysis
    return None


# ----------------------------------------------------------------------------- the run

def print_profile(profile_dir: str) -> None:
  """The top kernels of the 3 profiled steps (best effort: a trace format change only warns)."""
  from openmoe_jax.bench import profile_summary  # pylint: disable=import-outside-toplevel
  try:
    path = profile_summary.find_trace(profile_dir)
    tables = [profile_summary.summarize(path, steps=3, by_kind=k) for k in (True, False)]
  except (OSError, ValueError, KeyError) as e:
    print(f"profile summary unavailable: {e}", flush=True)
    return
  for (rows, total), top in zip(tables, (25, 30)):
    print(profile_summary.format_table(rows, total, top=top), flush=True)


@dataclasses.dataclass
class Result:
  """One benchmark configuration's numbers (seconds, bytes, FLOPs)."""
  preset: str
  batch: int
  seq: int
  device: str
  attention_impl: str
  remat: str
  dispatch: str
  step_s: float  # median timed step
  step_s_min: float
  step_s_max: float
  tokens_per_s: float
  model_flops_per_token: float
  attention_flops_per_token: float
  active_params: float
  total_params: int
  mfu: float  # model FLOP/s over peak_flops
  peak_flops: float  # measured dense matmul FLOP/s (bf16 unless --peak_dtype)
  peak_memory_bytes: int | None  # allocator peak in use (GPU/TPU)
  xla_memory_bytes: int | None  # XLA's static estimate for the step
  compile_s: float
  loss_first: float
  loss_last: float
  steps_done: int
  scan_layers: bool = True  # False: the layer loop unrolled (--scan_layers false)
  remat_cse_repeats: int = 0  # --remat_cse_repeats (shown as "dots+cse" (all) or "dots+cseN")
  loss_chunk_len: int = 0  # --loss_chunk_len (shown in the layers column as "+ceC")
  attention_mask: str = "packed"  # --attention_mask (causal is shown as "+causal" after attn)


def run(preset: str, batch: int, seq: int, *, attention_impl: str | None = None,
        remat: str | None = None, dispatch: str | None = None, gmm_backend: str | None = None,
        dtype: str | None = None, steps: int = MIN_STEPS, warmup: int = 3, mask: str = "causal",
        peak_size: int | None = None, peak_dtype: str = "bfloat16",
        optimizer: str = "adamw", profile_dir: str | None = None, num_devices: int = 1,
        logits_dtype: str | None = None, scan_layers: bool | None = None,
        remat_cse_repeats: int | None = None, loss_chunk_len: int | None = None,
        attention_mask: str | None = None, cfg: ModelConfig | None = None) -> Result:
  """Benchmarks one configuration on `num_devices` devices (data parallel; 0 = all of them)."""
  base = cfg if cfg is not None else resolve_preset(preset)
  cfg = apply_overrides(base, seq=seq, attention_impl=attention_impl, remat=remat,
                        dispatch=dispatch, gmm_backend=gmm_backend, dtype=dtype,
                        logits_dtype=logits_dtype, scan_layers=scan_layers,
                        remat_cse_repeats=remat_cse_repeats, loss_chunk_len=loss_chunk_len,
                        attention_mask=attention_mask)
  if cfg.attention_mask == "causal" and mask != "causal":
    raise ValueError(f"--attention_mask causal ignores the segments and prefixes of --mask "
                     f"{mask}; use --mask causal")
  if cfg.vocab_size <= 0:
    cfg = dataclasses.replace(cfg, vocab_size=32128)  # the T5 / OpenMoE vocabulary size
  devices = jax.devices()
  if not 0 <= num_devices <= len(devices):
    raise ValueError(f"--num_devices={num_devices}; expected 0..{len(devices)} (0 = all)")
  mesh = sharding.make_mesh(MeshConfig(), devices[:num_devices or len(devices)])
  if batch % mesh.size:
    raise ValueError(f"--batch={batch} not divisible by the {mesh.size} devices")
  rules = sharding.RULES["data_parallel"]
  optim = OptimConfig(name=optimizer, learning_rate=1e-3, warmup_steps=0, schedule="constant")
  setup = ts.make_setup(cfg, optim, total_steps=warmup + steps + 10, seed=0, mesh=mesh,
                        rules=rules)
  state = ts.init_state(setup, seed=0)
  host_batches = [synthetic_batch(batch, seq, cfg.vocab_size, seed=i, mask=mask)
                  for i in range(2)]
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batches[0].items()}
  shardings = ts.batch_shardings(setup, spec)
  batches = [jax.device_put(b, shardings) for b in host_batches]  # no host->device per step
  step = ts.jit_train_step(setup, spec)
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  # Warm-up (its first step also gives the starting loss), then the timed steps.
  state, metrics = compiled(state, batches[0])
  first_loss = float(metrics["loss"])
  times, state, metrics = time_steps(compiled, state, batches[1:] + batches[:1],
                                     max(warmup - 1, 0), steps)
  last_loss = float(metrics["loss"])
  peak_mem = device_peak_bytes()
  if profile_dir:
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    for i in range(3):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    print_profile(profile_dir)
  steps_done = int(state["step"])
  del state, metrics
  platform = jax.devices()[0].platform
  n = peak_size or (8192 if platform in ("gpu", "tpu") else 512)
  peak = matmul_peak_flops(n, jnp.dtype(peak_dtype))
  tokens = batch * seq
  step_s = statistics.median(times)
  flops_tok, _, attn_tok = model_flops_per_token(cfg, seq)
  total_params = sum(int(math.prod(x.shape)) for x in
                     jax.tree.leaves(jax.eval_shape(lambda: nnx.state(
                         ts.build_model(cfg, 0), nnx.Param))))
  return Result(
      preset=preset, batch=batch, seq=seq, device=jax.devices()[0].device_kind,
      attention_impl=getattr(cfg, "attention_impl", "xla"), remat=cfg.remat,
      dispatch=cfg.moe.dispatch if cfg.moe is not None else "-",
      step_s=step_s, step_s_min=min(times), step_s_max=max(times),
      tokens_per_s=tokens / step_s, model_flops_per_token=flops_tok,
      attention_flops_per_token=attn_tok, active_params=flops_tok and (flops_tok - attn_tok) / 6,
      total_params=total_params, mfu=flops_tok * tokens / step_s / peak / mesh.size,
      peak_flops=peak, peak_memory_bytes=peak_mem, xla_memory_bytes=xla_memory_estimate(compiled),
      compile_s=compile_s,
      loss_first=first_loss, loss_last=last_loss, steps_done=steps_done,
      scan_layers=cfg.scan_layers, remat_cse_repeats=cfg.remat_cse_repeats,
      loss_chunk_len=cfg.loss_chunk_len, attention_mask=cfg.attention_mask)


# ----------------------------------------------------------------------------- reporting

def _gib(x: int | None) -> str:
  return "-" if x is None else f"{x / 2 ** 30:.2f}"


TABLE_HEADER = ("| preset | B x L | attn | remat | dispatch | layers | step ms | tokens/s | "
                "GFLOP/tok | MFU | peak TFLOP/s | peak GiB | XLA GiB | compile s |")


def table_row(r: Result) -> str:
  remat = r.remat
  if r.remat_cse_repeats and r.remat != "none" and not r.scan_layers:
    remat += "+cse" if r.remat_cse_repeats < 0 else f"+cse{r.remat_cse_repeats}"
  attn = r.attention_impl + ("+causal" if r.attention_mask == "causal" else "")
  return (f"| {r.preset} | {r.batch} x {r.seq} | {attn} | {remat} | {r.dispatch} | "
          f"{'scan' if r.scan_layers else 'unrolled'}{f'+ce{r.loss_chunk_len}' if r.loss_chunk_len else ''} | {r.step_s * 1e3:.2f} | {r.tokens_per_s:,.0f} | {r.model_flops_per_token / 1e9:.3f} | "
          f"{100 * r.mfu:.1f}% | {r.peak_flops / 1e12:.1f} | {_gib(r.peak_memory_bytes)} | "
          f"{_gib(r.xla_memory_bytes)} | {r.compile_s:.1f} |")


def report(r: Result) -> str:
  lines = [
      f"device: {r.device}  preset: {r.preset}  batch x seq: {r.batch} x {r.seq}",
      f"step time (median of timed steps): {r.step_s * 1e3:.2f} ms "
      f"(min {r.step_s_min * 1e3:.2f}, max {r.step_s_max * 1e3:.2f})",
      f"tokens/s: {r.tokens_per_s:,.0f}",
      f"model FLOPs/token: {r.model_flops_per_token:.4g} (attention {r.attention_flops_per_token:.4g},"
      f" active params {r.active_params:.4g} of {r.total_params:,})",
      f"measured dense matmul peak: {r.peak_flops / 1e12:.1f} TFLOP/s   MFU: {100 * r.mfu:.1f}%",
      f"peak device memory: {_gib(r.peak_memory_bytes)} GiB (allocator)  "
      f"{_gib(r.xla_memory_bytes)} GiB (XLA estimate)",
      f"loss: {r.loss_first:.4f} -> {r.loss_last:.4f} after {r.steps_done} steps; "
      f"compile {r.compile_s:.1f} s",
      TABLE_HEADER, table_row(r)]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", required=True, help="preset name (--list_presets shows them)")
  p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed steps (>= {MIN_STEPS})")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--attention_impl", default=None, help="override ModelConfig.attention_impl")
  p.add_argument("--remat", default=None, help="override ModelConfig.remat: none|dots|full")
  p.add_argument("--dispatch", default=None, help="override MoeConfig.dispatch")
  p.add_argument("--gmm_backend", default=None, help="override MoeConfig.gmm_backend")
  p.add_argument("--dtype", default=None, help="override ModelConfig.dtype (activations)")
  p.add_argument("--logits_dtype", default=None, help="override ModelConfig.logits_dtype")
  p.add_argument("--scan_layers", default=None, choices=("true", "false"),
                 help="override ModelConfig.scan_layers (false: a Python loop over the layers)")
  p.add_argument("--remat_cse_repeats", type=int, default=None,
                 help="override ModelConfig.remat_cse_repeats (unrolled layers: the first N "
                      "repeats let XLA reuse forward values in their backward; -1 = all)")
  p.add_argument("--loss_chunk_len", type=int, default=None,
                 help="override ModelConfig.loss_chunk_len (head + cross-entropy over chunks "
                      "of C positions, rematerialised: the [B, L, V] logits never exist whole)")
  p.add_argument("--attention_mask", default=None, choices=("packed", "causal"),
                 help="override ModelConfig.attention_mask (causal: one causal stream per row, "
                      "cuDNN's causal kernel with --attention_impl cudnn)")
  p.add_argument("--mask", default="causal", choices=MASKS, help="synthetic batch layout")
  p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
  p.add_argument("--peak_size", type=int, default=None, help="n of the n^3 peak matmul")
  p.add_argument("--peak_dtype", default="bfloat16", help="dtype of the peak matmul")
  p.add_argument("--profile_dir", default=None, help="write a profiler trace of 3 more steps")
  p.add_argument("--num_devices", type=int, default=1, help="devices (data parallel); 0 = all")
  p.add_argument("--json", default=None, help="append the result as one JSON line to FILE")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Result:
  args = sys.argv[1:] if argv is None else list(argv)
  if "--list_presets" in args:
    print("\n".join(sorted(available_presets())))
    raise SystemExit(0)
  a = parse_args(args)
  r = run(a.preset, a.batch, a.seq, attention_impl=a.attention_impl, remat=a.remat,
          dispatch=a.dispatch, gmm_backend=a.gmm_backend, dtype=a.dtype, steps=a.steps,
          warmup=a.warmup, mask=a.mask, peak_size=a.peak_size, peak_dtype=a.peak_dtype,
          optimizer=a.optimizer, profile_dir=a.profile_dir,
          num_devices=a.num_devices, logits_dtype=a.logits_dtype,
          scan_layers=None if a.scan_layers is None else a.scan_layers == "true",
          remat_cse_repeats=a.remat_cse_repeats, loss_chunk_len=a.loss_chunk_len,
          attention_mask=a.attention_mask)
  print(report(r), flush=True)
  if a.json:
    with open(a.json, "a", encoding="utf-8") as f:
      f.write(json.dumps(dataclasses.asdict(r)) + "\n")
  return r


if __name__ == "__main__":
  main()
