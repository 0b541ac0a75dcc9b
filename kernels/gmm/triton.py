"""Grouped matmul as a raw Triton kernel called through jax-triton (the `[gpu]` extra).

Same work list and masking as `pallas_gpu` (see metadata.py). `triton`/`jax_triton` are
imported lazily inside the call: importing triton at module import time can abort a process
that has already imported tensorflow.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from openmoe_jax.kernels.gmm import metadata as md_lib
from openmoe_jax.kernels.gmm.tiling import Tiling

DEFAULT_TILING = Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, group_m=8)


def _jax_triton():
  """Imports jax_triton; shims the one name jax-triton 0.4 takes from triton >= 3.7."""
  import triton.backends.nvidia.driver as driver
  if not hasattr(driver, "TMA_TF32"):
    driver.TMA_TF32 = 0  # only used for TMA descriptors, which these kernels do not use
  import jax_triton
  return jax_triton


@functools.cache
def _kernels():
  """Builds the @triton.jit kernels on first use."""
  import triton
  import triton.language as tl

  @triton.jit
  def gmm_kernel(grp_ptr, tile_ptr, starts_ptr, ends_ptr, nvalid_ptr, rowidx_ptr, lhs_ptr,
                 rhs_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                 NUM_ITEMS: tl.constexpr, G: tl.constexpr, TM: tl.constexpr,
                 TN: tl.constexpr, TK: tl.constexpr, GROUP_M: tl.constexpr,
                 TRANSPOSE_RHS: tl.constexpr, GATHER: tl.constexpr):
    # Masks along a contiguous dim block 16-byte vector loads; EVEN_* drop them statically.
    EVEN_K: tl.constexpr = K % TK == 0
    EVEN_N: tl.constexpr = N % TN == 0
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, TN)
    per_band = GROUP_M * num_n
    first = (pid // per_band) * GROUP_M
    rows_in_band = tl.minimum(NUM_ITEMS - first, GROUP_M)
    item = first + (pid % per_band) % rows_in_band
    j = (pid % per_band) // rows_in_band
    if item < tl.load(nvalid_ptr):
      g = tl.load(grp_ptr + item)
      r0 = tl.load(tile_ptr + item) * TM
      rows = r0 + tl.arange(0, TM)
      cols = j * TN + tl.arange(0, TN)
      keep = ((rows >= tl.load(starts_ptr + g)) & (rows < tl.load(ends_ptr + g)))[:, None] & (
          cols < N)[None, :]
      out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
      if g == G:
        tl.store(out_ptrs, tl.zeros((TM, TN), out_ptr.dtype.element_ty), mask=keep)
      else:
        in_m = rows < M
        if GATHER:
          src = tl.load(rowidx_ptr + rows, mask=in_m, other=0).to(tl.int64)
        else:
          src = rows.to(tl.int64)
        ks = tl.arange(0, TK)
        a_ptrs = lhs_ptr + src[:, None] * K + ks[None, :]
        rhs_g = rhs_ptr + g.to(tl.int64) * K * N
        if TRANSPOSE_RHS:  # rhs[g] stored [N, K]
          b_ptrs = rhs_g + cols[None, :] * K + ks[:, None]
        else:
          b_ptrs = rhs_g + ks[:, None] * N + cols[None, :]
        acc = tl.zeros((TM, TN), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, TK)):
          if EVEN_K:
            a = tl.load(a_ptrs, mask=in_m[:, None], other=0.0)
            if EVEN_N:
              b = tl.load(b_ptrs)
            else:
              b = tl.load(b_ptrs, mask=(cols < N)[None, :], other=0.0)
          else:
            k_ok = ks < K - kk * TK
            a = tl.load(a_ptrs, mask=in_m[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
          acc = tl.dot(a, b, acc, input_precision="ieee" if a.dtype == tl.float32 else None)
          a_ptrs += TK
          b_ptrs += TK if TRANSPOSE_RHS else TK * N
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=keep)

  @triton.jit
  def tgmm_kernel(starts_ptr, ends_ptr, rowidx_ptr, lhs_ptr, rhs_ptr, out_ptr,
                  K: tl.constexpr, N: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
                  TK: tl.constexpr, GATHER: tl.constexpr):
    num_n = tl.cdiv(N, TN)
    kt = tl.program_id(0) // num_n
    j = tl.program_id(0) % num_n
    g = tl.program_id(1)
    start = tl.load(starts_ptr + g)
    end = tl.load(ends_ptr + g)
    ks = kt * TK + tl.arange(0, TK)
    cols = j * TN + tl.arange(0, TN)
    acc = tl.zeros((TK, TN), dtype=tl.float32)
    for rt in range(start // TM, tl.cdiv(end, TM)):
      rows = rt * TM + tl.arange(0, TM)
      ok = (rows >= start) & (rows < end)
      if GATHER:
        src = tl.load(rowidx_ptr + rows, mask=ok, other=0).to(tl.int64)
      else:
        src = rows.to(tl.int64)
      if K % TK == 0:  # no mask along the contiguous dim: vector loads
        a = tl.load(lhs_ptr + src[None, :] * K + ks[:, None], mask=ok[None, :], other=0.0)
      else:
        a = tl.load(lhs_ptr + src[None, :] * K + ks[:, None],
                    mask=ok[None, :] & (ks < K)[:, None], other=0.0)
      if N % TN == 0:
        b = tl.load(rhs_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=ok[:, None],
                    other=0.0)
      else:
        b = tl.load(rhs_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                    mask=ok[:, None] & (cols < N)[None, :], other=0.0)
      acc = tl.dot(a, b, acc, input_precision="ieee" if a.dtype == tl.float32 else None)
    out_ptrs = out_ptr + g.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ks < K)[:, None] & (cols < N)[None, :])

  return gmm_kernel, tgmm_kernel


def gmm(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
        out_dtype=None, tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[m] = lhs[row(m)] @ rhs[group(m)] (rows past the end zero)."""
  jt = _jax_triton()
  if interpret:
    raise ValueError("the jax-triton backend has no interpret mode; use backend='pallas_gpu'")
  t = tiling or DEFAULT_TILING
  gather = row_index_M is not None
  m = row_index_M.shape[0] if gather else lhs_XK.shape[0]
  k, g = lhs_XK.shape[1], rhs_GKN.shape[0]
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  meta = md_lib.make_group_metadata(group_sizes_G, m, t.tm)
  num_items = meta.item_group.shape[0]
  rowidx = row_index_M.astype(jnp.int32) if gather else meta.num_items  # dummy when unused
  return jt.triton_call(
      meta.item_group, meta.item_tile, meta.starts, meta.ends, meta.num_items, rowidx, lhs_XK,
      rhs_GKN, kernel=_kernels()[0],
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype or lhs_XK.dtype),
      grid=(num_items * (-(-n // t.tn)),), num_warps=t.num_warps, num_stages=t.num_stages,
      M=m, K=k, N=n, NUM_ITEMS=num_items, G=g, TM=t.tm, TN=t.tn, TK=t.tk,
      GROUP_M=min(t.group_m, num_items), TRANSPOSE_RHS=transpose_rhs, GATHER=gather)


def tgmm(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g]; empty groups give zeros."""
  jt = _jax_triton()
  if interpret:
    raise ValueError("the jax-triton backend has no interpret mode; use backend='pallas_gpu'")
  t = tiling or Tiling(tm=128, tn=128, tk=128, num_warps=8, num_stages=3)
  m, n = rhs_MN.shape
  k, g = lhs_XK.shape[1], group_sizes_G.shape[0]
  gather = row_index_M is not None
  meta = md_lib.make_group_metadata(group_sizes_G, m, t.tm, with_tail=False)
  rowidx = row_index_M.astype(jnp.int32) if gather else meta.num_items
  return jt.triton_call(
      meta.starts, meta.ends, rowidx, lhs_XK, rhs_MN, kernel=_kernels()[1],
      out_type=jax.ShapeDtypeStruct((g, k, n), out_dtype or lhs_XK.dtype),
      grid=((-(-k // t.tk)) * (-(-n // t.tn)), g), num_warps=t.num_warps,
      num_stages=t.num_stages, K=k, N=n, TM=t.tm, TN=t.tn, TK=t.tk, GATHER=gather)
