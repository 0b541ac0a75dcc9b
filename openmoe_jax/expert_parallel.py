"""Expert parallelism with `shard_map`: all-to-all around the grouped-matmul kernel.

Each device of the "expert" mesh axis holds E/n experts (the rule for `axes.EXPERT`) and a
slice of the batch (the rule for `axes.BATCH`, which includes the expert axis). Per device:

  1. its kept (token, expert) assignments are sorted by expert, so the rows for each device are
     a contiguous block: `x_sorted_MD`, with per-expert counts `counts_E`;
  2. rows travel to the device owning their expert: `ragged_all_to_all` (only the real rows
     move; GPU / TPU) or a dense `all_to_all` of a worst-case [n, M, D] buffer (CPU);
  3. received rows are labelled with their local expert from everyone's `counts_E`
     (one small all-gather), grouped by a second sort fused into the gmm's row gather, and run
     through the expert FFN with `kernels.gmm` (rows past the groups cost nothing and give 0);
  4. the outputs travel back the same way and are combined with the router weights.

Dropless by construction: every kept assignment is processed. The exchange buffers hold
`slack` x the balanced share (M / n rows per source and destination) while every pair fits,
which all devices know from the all-gathered counts; else one `lax.cond` branch with
worst-case buffers (all M rows to one device) runs instead. With a capacity the router's `kept` flags are honoured, so
this computes exactly what the "einsum" / "ragged" / "gmm" dispatches compute. Without an
active mesh (`sharding.activate`) or with one expert shard it runs the same code locally.
Shape letters: M assignments on this device, R rows received (n * M), J = n * E_local
(source, local expert) segments; the rest as in `openmoe_jax.axes`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from openmoe_jax import axes as ax
from openmoe_jax import distributed
from openmoe_jax import grouped
from openmoe_jax import layers
from openmoe_jax import sharding
from openmoe_jax.config import EXCHANGES
from openmoe_jax.kernels import gmm as gmm_lib


def resolve_exchange(exchange: str) -> str:
  """"auto": the ragged all-to-all on TPU, and on GPU where XLA decomposes it
  (`distributed.DEFAULT_XLA_FLAGS`, which `distributed.initialize()` applies); else the dense
  one. On 2 x H200 in one process XLA's own ragged kernel ran the step at 19.7% scaling
  efficiency, decomposed at 80%, the dense exchange at 73% (docs/scaling.md); XLA:CPU has no
  ragged all-to-all."""
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}; expected one of {EXCHANGES}")
  if exchange == "auto":
    backend = jax.default_backend()
    if backend == "tpu" or (backend == "gpu" and distributed.ragged_all_to_all_decomposed()):
      return "ragged"
    return "dense"
  return exchange


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                       *, axis_name):
  """jax.lax.ragged_all_to_all (a module-level name, so CPU tests can substitute an emulation)."""
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                   recv_sizes, axis_name=axis_name)


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _count(ids: jax.Array, length: int) -> jax.Array:
  """int32 histogram of `ids` over [0, length); ids >= length (sentinels) are not counted."""
  return jnp.zeros((length,), jnp.int32).at[ids].add(1, mode="drop")


def _label_rows(num_rows: int, starts_J: jax.Array, sizes_J: jax.Array, e_local: int) -> jax.Array:
  """Local expert of each received row (segments ordered source-major); e_local for padding."""
  rows_R = jnp.arange(num_rows, dtype=jnp.int32)
  seg_R = jnp.clip(jnp.searchsorted(starts_J, rows_R, side="right") - 1, 0, starts_J.shape[0] - 1)
  inside_R = rows_R < starts_J[seg_R] + sizes_J[seg_R]
  return jnp.where(inside_R, seg_R % e_local, e_local).astype(jnp.int32)


def expert_ffn(x_RD: jax.Array, local_R: jax.Array, weights: tuple[jax.Array, ...], *,
               activation: str, gmm_backend: str) -> jax.Array:
  """Rows labelled with a local expert (or the sentinel E_local) through their expert's FFN."""
  w_gate_EDF, w_out_EFD = weights[0], weights[-1]
  w_up_EDF = weights[1] if len(weights) == 3 else None
  e_local = w_gate_EDF.shape[0]
  order_R = jnp.argsort(local_R, stable=True).astype(jnp.int32)  # padding (sentinel) last
  inverse_R = grouped.inverse_permutation(order_R)
  sizes_E = _count(local_R, e_local)
  # row_positions: each row is read once, so the lhs gradient is a gather, not a scatter-add.
  mm = functools.partial(gmm_lib.gmm, group_sizes_G=sizes_E, backend=gmm_backend)
  rows = dict(row_index=order_R, row_positions=inverse_R[:, None])
  gate_RF = mm(x_RD, w_gate_EDF, **rows)
  up_RF = None if w_up_EDF is None else mm(x_RD, w_up_EDF, **rows)
  out_RD = mm(layers.activate(activation, gate_RF, up_RF), w_out_EFD)
  return grouped.permute_rows(out_RD, inverse_R, order_R)


def exchange_capacity(m: int, n: int, slack: float) -> int:
  """Rows each (source, destination) pair's exchange buffer holds on the fast path: `slack`
  times the balanced share m / n, rounded up to 8 rows; m (the worst case) when slack <= 0."""
  if slack <= 0 or n <= 1:
    return m
  return min(m, -(-math.ceil(slack * m / n) // 8) * 8)


def _dense_exchange(x_sorted_MD, send_n, counts_nE, me, n, ffn, axis, cap):
  """Each destination's rows in a [cap, D] slot block of one dense all_to_all (cap >= every
  pair's row count), and the results back the same way."""
  m, d = x_sorted_MD.shape
  e_local = counts_nE.shape[1] // n
  start_n = _exclusive_cumsum(send_n)
  slot_nC = jnp.arange(cap, dtype=jnp.int32)[None, :]
  # Sorted row i goes to destination dest(i), slot i - start_n[dest(i)]; rows past
  # sum(send_n) (dropped: the sentinel expert, sorted last) go nowhere. Both maps are
  # injective and each other's inverse, so both directions move rows with gathers only.
  slot_rows_R = jnp.where(slot_nC < send_n[:, None], start_n[:, None] + slot_nC, m).reshape(-1)
  rows_M = jnp.arange(m, dtype=jnp.int32)
  dest_M = jnp.clip(jnp.searchsorted(start_n, rows_M, side="right") - 1, 0, n - 1)
  row_slots_M = jnp.where(rows_M < jnp.sum(send_n), dest_M * cap + rows_M - start_n[dest_M],
                          n * cap)
  send_RD = grouped.take_rows(x_sorted_MD, slot_rows_R, row_slots_M)
  recv_RD = jax.lax.all_to_all(send_RD, axis, 0, 0, tiled=True)
  mine_nE = jax.lax.dynamic_slice_in_dim(counts_nE, me * e_local, e_local, axis=1)
  starts_J = (jnp.arange(n, dtype=jnp.int32)[:, None] * cap + _exclusive_cumsum(mine_nE, 1))
  y_RD = ffn(recv_RD, _label_rows(n * cap, starts_J.reshape(-1), mine_nE.reshape(-1), e_local))
  back_RD = jax.lax.all_to_all(y_RD, axis, 0, 0, tiled=True)
  return grouped.take_rows(back_RD, row_slots_M, slot_rows_R)


def _ragged_exchange(x_sorted_MD, send_n, counts_nE, me, n, ffn, axis, cap):
  """Only the real rows move (ragged all-to-all), into an [n * cap, D] receive buffer."""
  m, d = x_sorted_MD.shape
  e_local = counts_nE.shape[1] // n
  start_n = _exclusive_cumsum(send_n)
  sizes_nn = counts_nE.reshape(n, n, e_local).sum(-1)  # [source, destination]
  recv_n = sizes_nn[:, me]
  recv_start_n = _exclusive_cumsum(recv_n)
  out_start_n = _exclusive_cumsum(sizes_nn, 0)[me]  # where my rows land on each destination
  buf_RD = jnp.zeros((n * cap, d), x_sorted_MD.dtype)
  recv_RD = _ragged_all_to_all(x_sorted_MD, buf_RD, start_n, send_n, out_start_n, recv_n,
                               axis_name=axis)
  mine_nE = jax.lax.dynamic_slice_in_dim(counts_nE, me * e_local, e_local, axis=1)
  starts_J = recv_start_n[:, None] + _exclusive_cumsum(mine_nE, 1)
  y_RD = ffn(recv_RD, _label_rows(n * cap, starts_J.reshape(-1), mine_nE.reshape(-1), e_local))
  # Back: my block from source s returns to s at the offset s sent it from.
  back_start_n = _exclusive_cumsum(sizes_nn, 1)[:, me]
  out_MD = jnp.zeros((m, d), y_RD.dtype)
  return _ragged_all_to_all(y_RD, out_MD, recv_start_n, recv_n, back_start_n, send_n,
                            axis_name=axis)


def _device_moe(x_GSD, token_GA, expert_GA, kept_GA, weight_GA, *weights, chunks: int = 1,
                **kw) -> jax.Array:
  """One device's share, its routing groups in `chunks` independent pieces (each its own
  sort, exchange and expert FFN), so XLA can overlap one piece's all-to-all with another's
  matmuls."""
  g = x_GSD.shape[0]
  if chunks <= 1:
    return _device_moe_chunk(x_GSD, token_GA, expert_GA, kept_GA, weight_GA, *weights, **kw)
  if g % chunks:
    raise ValueError(f"MoeConfig.exchange_chunks={chunks} does not divide the {g} routing "
                     "groups on each device")
  parts = [jnp.split(a, chunks) for a in (x_GSD, token_GA, expert_GA, kept_GA, weight_GA)]
  return jnp.concatenate([_device_moe_chunk(*piece, *weights, **kw) for piece in zip(*parts)])


def _device_moe_chunk(x_GSD, token_GA, expert_GA, kept_GA, weight_GA, *weights,
                      axis: str | None, n: int, exchange: str, activation: str,
                      gmm_backend: str, slack: float = 0.0, top_k: int = 0) -> jax.Array:
  """One device's share: local tokens and assignments, E/n local experts -> y_GSD float32.

  `top_k` > 0: the assignments are token choice in `router.top_k_routing`'s k-major layout
  (every token exactly top_k times, once per block of S), so the tokens are gathered with a
  gather-and-sum gradient and the outputs combined by a gather and a K-sum: no scatter-add.
  0: any layout (expert choice too), combined by a float32 scatter-add."""
  g, s, d = x_GSD.shape
  a = token_GA.shape[1]
  e_local = weights[0].shape[0]
  e = e_local * n
  x_TD = x_GSD.reshape(g * s, d)
  token_M = (token_GA + s * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)
  kept_M = kept_GA.reshape(-1)
  expert_M = jnp.where(kept_M, expert_GA.reshape(-1), e)  # dropped -> sentinel e, sorted last
  weight_M = jnp.where(kept_M, weight_GA.reshape(-1), 0.0)
  m = expert_M.shape[0]
  order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
  sorted_expert_M = expert_M[order_M]
  token_choice = top_k > 0 and a == top_k * s
  if token_choice:
    # tk = token * K + choice is a permutation of [T * K]; row_TK: sorted row of each (token,
    # choice), the inverse of the sort in (token, choice) order.
    tk_M = token_M * top_k + jnp.tile(jnp.arange(a, dtype=jnp.int32) // s, g)
    row_TK = grouped.inverse_permutation(tk_M[order_M])
    x_sorted_MD = grouped.gather_rows(x_TD, token_M[order_M], row_TK.reshape(g * s, top_k))
  else:
    x_sorted_MD = x_TD[token_M[order_M]]
  ffn = functools.partial(expert_ffn, weights=weights, activation=activation,
                          gmm_backend=gmm_backend)
  counts_E = _count(expert_M, e)
  if axis is None:
    y_sorted_MD = ffn(x_sorted_MD, jnp.minimum(sorted_expert_M, e))
  else:
    me = jax.lax.axis_index(axis)
    counts_nE = jax.lax.all_gather(counts_E, axis)  # [source, expert]: tiny
    send_n = counts_E.reshape(n, e_local).sum(-1)
    exchange_fn = _ragged_exchange if exchange == "ragged" else _dense_exchange
    run = functools.partial(exchange_fn, x_sorted_MD, send_n, counts_nE, me, n, ffn, axis)
    cap = exchange_capacity(m, n, slack)
    if cap >= m:
      y_sorted_MD = run(m)
    else:
      # Every device sees the same counts, so all take the same branch: buffers of cap rows
      # per (source, destination) pair when every pair fits, else the worst case (m rows).
      fits = jnp.max(counts_nE.reshape(n, n, e_local).sum(-1)) <= cap
      y_sorted_MD = jax.lax.cond(fits, lambda: run(cap), lambda: run(m))
  # Rows of dropped assignments come back as zeros, and their weights are 0.
  if token_choice:
    w_TK = jnp.zeros((m,), jnp.float32).at[tk_M].set(weight_M, unique_indices=True)
    y_TKD = grouped.permute_rows(y_sorted_MD, row_TK, tk_M[order_M]).reshape(g * s, top_k, d)
    y_TD = jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), w_TK.reshape(g * s, top_k))
  else:
    y_MD = grouped.permute_rows(y_sorted_MD, grouped.inverse_permutation(order_M), order_M)
    y_MD = y_MD.astype(jnp.float32) * weight_M[:, None]
    y_TD = jnp.zeros((g * s, d), jnp.float32).at[token_M].add(y_MD)
  return y_TD.reshape(g, s, d)


def moe_ffn(x_GSD: jax.Array, token_GA: jax.Array, expert_GA: jax.Array, kept_GA: jax.Array,
            weight_GA: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array | None,
            w_out_EFD: jax.Array, *, activation: str, gmm_backend: str = "auto",
            exchange: str = "auto", slack: float = 1.25, chunks: int = 1,
            top_k: int = 0) -> jax.Array:
  """Routed experts' output y_GSD (float32), expert-parallel over the active mesh.

  Routing arrays are [G, A] (`router.Routing` fields; `weight_GA` = combine weights). Groups G
  are split over the batch mesh axes, experts over the expert axis. `slack`: the exchange
  buffers hold `slack` times the balanced share of rows per (source, destination) pair while
  every pair fits, else the worst case (`exchange_capacity`); <= 0 always the worst case.
  `chunks`: each device's groups in that many independent pieces (see `_device_moe`).
  `top_k`: the routing's k when it is token choice in `router.top_k_routing`'s layout
  (gathers instead of scatter-adds, see `_device_moe_chunk`); 0 for any other.
  """
  weights = (w_gate_EDF, w_out_EFD) if w_up_EDF is None else (w_gate_EDF, w_up_EDF, w_out_EFD)
  e = w_gate_EDF.shape[0]
  mesh = sharding.active_mesh()
  run: Callable[..., jax.Array]
  if mesh is None:
    run = functools.partial(_device_moe, axis=None, n=1, exchange="dense",
                            activation=activation, gmm_backend=gmm_backend, chunks=chunks,
                            top_k=top_k)
    return run(x_GSD, token_GA, expert_GA, kept_GA, weight_GA, *weights)
  expert_axes = sharding.mesh_axes_for(ax.EXPERT)
  batch_axes = sharding.mesh_axes_for(ax.BATCH)
  expert_axes = tuple(a for a in expert_axes if mesh.shape[a] > 1)
  if len(expert_axes) > 1:
    raise ValueError(f"expert parallelism over one mesh axis only; rules map experts to "
                     f"{expert_axes}")
  axis = expert_axes[0] if expert_axes else None
  n = mesh.shape[axis] if axis else 1
  if e % n:
    raise ValueError(f"MoeConfig.num_experts={e} is not divisible by the expert mesh axis "
                     f"{axis!r} of size {n}")
  if axis is not None and axis not in batch_axes:
    raise ValueError(f"the batch rule {batch_axes} must include the expert axis {axis!r} "
                     "(each expert shard routes its own tokens)")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if x_GSD.shape[0] % shards:
    raise ValueError(f"{x_GSD.shape[0]} routing groups are not divisible by the {shards} batch "
                     f"shards of mesh {dict(mesh.shape)}; use a batch (or MoeConfig.group_size) "
                     "that splits evenly")
  run = functools.partial(_device_moe, axis=axis, n=n, exchange=resolve_exchange(exchange),
                          activation=activation, gmm_backend=gmm_backend, slack=slack,
                          chunks=chunks, top_k=top_k)
  tok = P(batch_axes or None)
  w = P(axis)
  # check_vma=False: Pallas gmm kernels declare outputs without varying-axis types. shard_map
  # still sums the weights' gradients over the batch axes they are replicated on (tested).
  sharded = jax.shard_map(run, mesh=mesh, in_specs=(tok,) * 5 + (w,) * len(weights),
                          out_specs=tok, check_vma=False)
  return sharded(x_GSD, token_GA, expert_GA, kept_GA, weight_GA, *weights)
