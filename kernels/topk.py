"""Top-k indices of short rows (router selection): a Pallas (Triton) kernel for GPUs.

Routers pick k of E experts per token. On an H100, `jax.lax.top_k` over [65536, 387] with
k = 16 (MoEUT-244M's sigma-MoE) took 1.10 ms (this kernel: 0.20 ms), and over [262144, 10]
with k = 2 (its SwitchHead selections) 0.26 ms (here: 0.05 ms); together over 50 ms of a
490 ms training step. The rows are short, so one program holds a block of whole rows in
registers as int32 keys in lax.top_k's order and runs k rounds of one (key, index) argmax
per row, marking each pick as taken; one pass over the logits.

`top_k_indices(x, k)` returns int32 [..., k], the same as `jax.lax.top_k(x, k)[1]`: values
in descending order, ties to the lowest index, NaN above +inf, -0.0 below +0.0. The caller
takes values with `jnp.take_along_axis`, so gradients follow the usual gather. backend:
"auto" (the kernel on a GPU when k <= MAX_K and E <= MAX_WIDTH, else `jax.lax.top_k`),
"pallas_gpu", "xla", or `interpret=True` (the kernel in Pallas' interpreter, for CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from openmoe_jax.kernels import batch_partition

MAX_K = 32        # rounds are unrolled
MAX_WIDTH = 4096  # whole rows are held in registers
# One warp per program over 1024 elements (a few rows, 32 per thread): on an H100 that was
# the fastest of 7 shapes tried for [65536, 387] k=16 (0.196 ms; 4 warps x 8192: 0.96 ms).
_BLOCK_ELEMS = 1024
_NUM_WARPS = 1


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _order_keys(x):
  """int32 keys in the total order lax.top_k ranks floats by (NaN highest, -0.0 below +0.0),
  every key above INT32_MIN (the mark of a taken column)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  keys = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
  return jnp.where(jnp.isnan(x), jnp.int32(2**31 - 1), keys)


def _kernel(x_ref, idx_ref, *, rows: int, width: int, k: int, br: int, wp: int, kp: int):
  r0 = pl.program_id(0) * br
  row_ok = (r0 + jnp.arange(br, dtype=jnp.int32)) < rows
  cols = jnp.arange(wp, dtype=jnp.int32)[None, :]
  x = plt.load(x_ref.at[pl.ds(r0, br), pl.ds(0, wp)],
               mask=row_ok[:, None] & (cols < width), other=0).astype(jnp.float32)
  taken = jnp.int32(-2**31)
  keys = jnp.where(cols < width, _order_keys(x), taken)  # padding columns are never picked
  slots = jnp.arange(kp, dtype=jnp.int32)[None, :]
  out = jnp.zeros((br, kp), jnp.int32)
  for j in range(k):  # argmax: one (key, index) reduction, ties to the lowest index
    pick = jnp.argmax(keys, axis=1).astype(jnp.int32)[:, None]
    out = jnp.where(slots == j, pick, out)
    keys = jnp.where(cols == pick, taken, keys)
  plt.store(idx_ref.at[pl.ds(r0, br), pl.ds(0, kp)], out,
            mask=row_ok[:, None] & (slots < k))


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block_elems", "num_warps"))
def _pallas_top_k(x_RW: jax.Array, k: int, interpret: bool = False,
                  block_elems: int = _BLOCK_ELEMS, num_warps: int = _NUM_WARPS) -> jax.Array:
  rows, width = x_RW.shape
  wp, kp = _pow2(width), _pow2(k)
  br = max(1, min(block_elems // wp, _pow2(rows)))
  return pl.pallas_call(
      functools.partial(_kernel, rows=rows, width=width, k=k, br=br, wp=wp, kp=kp),
      out_shape=jax.ShapeDtypeStruct((rows, k), jnp.int32),
      grid=(pl.cdiv(rows, br),),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="openmoe_top_k",
  )(x_RW)


def _top_k_rows(x_RW: jax.Array, k: int, interpret: bool) -> jax.Array:
  return _pallas_top_k(x_RW, k, interpret=interpret)


# Sharded rows stay sharded under jit (each device ranks its own rows).
_sharded_top_k = batch_partition.batch_partitioned(_top_k_rows, num_arrays=1, num_static=2)


def kernel_fits(width: int, k: int) -> bool:
  return 1 <= k <= min(MAX_K, width) and width <= MAX_WIDTH


def top_k_indices(x: jax.Array, k: int, *, backend: str = "auto",
                  interpret: bool = False) -> jax.Array:
  """int32 [..., k]: indices of the k largest entries of each row of x (see module doc)."""
  if backend not in ("auto", "pallas_gpu", "xla"):
    raise ValueError(f"top_k backend={backend!r}; expected auto, pallas_gpu or xla")
  *lead, width = x.shape
  if not 1 <= k <= width:
    raise ValueError(f"k={k}; expected 1..{width}")
  use_kernel = interpret or backend == "pallas_gpu" or (
      backend == "auto" and jax.default_backend() == "gpu")
  if not use_kernel or not kernel_fits(width, k):
    if backend == "pallas_gpu" and not kernel_fits(width, k):
      raise ValueError(f"pallas_gpu top-k needs k <= {MAX_K} and width <= {MAX_WIDTH}; "
                       f"got k={k}, width={width}")
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)
  rows = 1
  for d in lead:
    rows *= d
  idx = _sharded_top_k(jax.lax.stop_gradient(x).reshape(rows, width), k, interpret)
  return idx.reshape(*lead, k)
