"""Expert-parallel scaling: training tokens/s on 1 and n devices, same per-device batch.

    python -m openmoe_jax.bench.scaling [--devices 1,2] [--batch_per_device 16 --seq 1024]
        [--d_model 1024 --layers 4 --experts 16 --top_k 2 --d_expert 2048]
        [--dispatch shard_map] [--exchange auto] [--steps 6 --warmup 2] [--json FILE]
        [--profile_dir DIR]

For each device count n, the real `train_step` (sharded init, explicit shardings, donated state)
runs on a mesh (data=1, fsdp=1, expert=n) with the "fsdp_expert" rules: each device holds E/n
experts and its own batch slice; MoE layers use the dropless shard_map dispatch (ragged
all-to-all around the gmm kernel on GPU). Synthetic tokens, so only jax / flax / optax /
numpy are needed. Scaling efficiency = tokens/s(n) / (n * tokens/s(1)).
Before timing, `--check` compares the expert-parallel MoE layer with the one-device result on
small shapes (forward and gradients), so the collective's offsets are verified on the device.
`--profile_dir` traces 3 more steps of each device count (in DIR/n<devices>) and prints where
their device time goes, summed over the devices (`openmoe_jax.bench.profile_summary`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax import distributed
from openmoe_jax import expert_parallel as ep
from openmoe_jax import router as router_lib
from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.config import MeshConfig, ModelConfig, MoeConfig, OptimConfig


@dataclasses.dataclass
class Row:
  devices: int
  global_batch: int
  seq: int
  step_ms: float
  tokens_per_s: float
  loss: float


def model_config(a: argparse.Namespace) -> ModelConfig:
  moe = MoeConfig(num_experts=a.experts, top_k=a.top_k, d_expert=a.d_expert, dispatch=a.dispatch,
                  exchange=a.exchange, exchange_slack=a.slack,
                  exchange_chunks=a.chunks, dropless=a.dispatch != "einsum", capacity_factor_train=1.25)
  return ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers,
                     n_heads=a.d_model // 128, d_ff=4 * a.d_model, max_seq_len=a.seq,
                     dtype="bfloat16", moe=moe)


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """Plain causal-LM rows in the data contract's format (docs/CONTRACTS.md)."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, vocab, (batch, seq), dtype=np.int32)
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((batch, seq), np.float32),
          "decoder_segment_ids": np.ones((batch, seq), np.int32),
          "decoder_positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          "decoder_causal_attention": np.zeros((batch, seq), np.int32)}


def measure(a: argparse.Namespace, n: int) -> Row:
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, expert=n), jax.devices()[:n])
  setup = ts.make_setup(model_config(a), OptimConfig(warmup_steps=0), 100, 0, mesh,
                        sharding.rules_for("fsdp_expert"))
  global_batch = a.batch_per_device * n
  batches = [{k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
              for k, v in synthetic_batch(global_batch, a.seq, a.vocab, s).items()}
             for s in range(2)]
  state = ts.init_state(setup, 0)
  step = ts.jit_train_step(setup, batches[0])
  for i in range(a.warmup):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(a.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  if a.profile_dir:
    from openmoe_jax.bench import train_step as bench_step  # pylint: disable=import-outside-toplevel
    where = f"{a.profile_dir}/n{n}"
    jax.profiler.start_trace(where, create_perfetto_trace=True)
    for i in range(3):
      state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    print(f"profile of {n} device(s), 3 steps:", flush=True)
    bench_step.print_profile(where)
  med = statistics.median(times)
  return Row(n, global_batch, a.seq, med * 1e3, global_batch * a.seq / med,
             float(metrics["loss"]))


def check(n: int, exchange: str, slack: float) -> float:
  """Max |EP - one device| over the MoE layer's output and gradients (small shapes, float32)."""
  g, s, d, f, e = 4 * n, 64, 128, 256, 4 * n
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(ks[0], (g, s, d))
  routing = router_lib.top_k_routing(jax.random.normal(ks[1], (g, s, e)) * 3,
                                     jnp.ones((g, s), jnp.int32), top_k=2, capacity=None)
  w = [jax.random.normal(k, shape) * 0.1
       for k, shape in zip(ks[2:], [(e, d, f), (e, d, f), (e, f, d)])]
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=n), jax.devices()[:n])

  def loss(x, *w, sharded):
    fn = functools.partial(ep.moe_ffn, activation="swiglu", exchange=exchange, slack=slack,
                           top_k=2)
    args = (x, routing.token_GA, routing.expert_GA, routing.kept_GA, routing.gate_GA, *w)
    if not sharded:
      return jnp.sum(fn(*args) ** 2)
    with sharding.activate(mesh, sharding.rules_for("fsdp_expert")):
      return jnp.sum(fn(*args) ** 2)

  grads = [jax.jit(jax.value_and_grad(functools.partial(loss, sharded=sh), argnums=(0, 1, 2, 3)))(
      x, *w) for sh in (False, True)]
  return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-9))
             for u, v in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])))


def bandwidth(n: int, mbytes: int = 256) -> dict[str, float]:
  """GB/s (bytes per device / time) of a bf16 psum and all_to_all over n devices: the link speed
  that bounds the data-parallel gradient reduction and the expert all-to-all."""
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=n), jax.devices()[:n])
  rows = mbytes * 2 ** 20 // (2 * 1024)
  x = jax.device_put(jnp.ones((n * rows, 1024), jnp.bfloat16),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
  ops = {"all_reduce": lambda v: jax.lax.psum(v, "expert"),
         "all_to_all": lambda v: jax.lax.all_to_all(v, "expert", 0, 0, tiled=True)}
  out = {}
  for name, op in ops.items():
    f = jax.jit(jax.shard_map(op, mesh=mesh, in_specs=jax.sharding.PartitionSpec("expert"),
                              out_specs=jax.sharding.PartitionSpec("expert")))
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(5):
      jax.block_until_ready(f(x))
    out[name] = mbytes / 1024 / ((time.perf_counter() - t0) / 5)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2")
  p.add_argument("--batch_per_device", type=int, default=16)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--d_expert", type=int, default=2048)
  p.add_argument("--dispatch", default="shard_map", choices=["shard_map", "einsum", "gmm"])
  p.add_argument("--exchange", default="auto", choices=list(ep.EXCHANGES))
  p.add_argument("--slack", type=float, default=1.25,
                 help="exchange buffers: x the balanced share while it fits; 0 = worst case")
  p.add_argument("--chunks", type=int, default=1, help="MoeConfig.exchange_chunks")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--check", action="store_true")
  p.add_argument("--bandwidth", action="store_true", help="time psum / all_to_all first")
  p.add_argument("--json", default="")
  p.add_argument("--profile_dir", default="", help="trace 3 more steps per device count")
  a = p.parse_args(argv)
  distributed.apply_default_xla_flags()  # before the first JAX call starts the backend
  counts = [int(c) for c in a.devices.split(",")]
  if max(counts) > jax.device_count():
    raise ValueError(f"--devices={a.devices}; only {jax.device_count()} devices here")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; exchange "
        f"{ep.resolve_exchange(a.exchange)}; {model_config(a)}", flush=True)
  if a.check and max(counts) > 1:
    print(f"check: max relative |EP - local| = {check(max(counts), a.exchange, a.slack):.2e}", flush=True)
  if a.bandwidth and max(counts) > 1:
    print(f"link GB/s per device (256 MiB bf16): {bandwidth(max(counts))}", flush=True)
  rows = []
  for n in counts:
    rows.append(measure(a, n))
    print(rows[-1], flush=True)
  base = rows[0].tokens_per_s / rows[0].devices
  print("| GPUs | global batch x seq | step ms | tokens/s | tokens/s per GPU | scaling eff. |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    eff = r.tokens_per_s / (r.devices * base)
    print(f"| {r.devices} | {r.global_batch} x {r.seq} | {r.step_ms:.1f} | {r.tokens_per_s:,.0f} "
          f"| {r.tokens_per_s / r.devices:,.0f} | {eff:.1%} |")
  if a.json:
    with open(a.json, "w", encoding="utf-8") as fh:
      json.dump({"args": vars(a), "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=2)


if __name__ == "__main__":
  main()
