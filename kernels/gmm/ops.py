"""Public grouped matmul ops: `gmm` and `tgmm` with one `custom_vjp`, behind a backend switch.

Backends: "reference" (jax.lax.ragged_dot; CPU and tests), "pallas_gpu" (Pallas Triton
lowering), "pallas_tpu" (megablox-style Pallas TPU), "triton" (jax-triton; GPU extra),
"pallas_mgpu" (Pallas Mosaic GPU, Hopper: TMA + wgmma + warp specialisation; calls it cannot
run, a fused row gather or float32, go to "pallas_gpu"). "auto" picks by platform: gpu ->
pallas_gpu, tpu -> pallas_tpu, else reference; on a Hopper GPU (compute capability 9.x) a
call goes to pallas_mgpu when a pallas_mgpu tile was measured for its op and widths (the
shipped tuned.json or the user's cache) and the call is one it runs. $OPENMOE_JAX_GMM_BACKEND
overrides "auto".
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp

from openmoe_jax.kernels.gmm import tuning
from openmoe_jax.kernels.gmm.tiling import Tiling

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_mgpu", "pallas_tpu", "triton")
_MODULES = {"reference": "reference", "pallas_gpu": "pallas_gpu", "pallas_tpu": "pallas_tpu",
            "triton": "triton", "pallas_mgpu": "pallas_mgpu"}


def resolve_backend(backend: str = "auto") -> str:
  """Maps "auto" (or $OPENMOE_JAX_GMM_BACKEND) to a concrete backend name."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
  if backend == "auto":
    backend = os.environ.get("OPENMOE_JAX_GMM_BACKEND", "auto")
    if backend not in BACKENDS:
      raise ValueError(f"$OPENMOE_JAX_GMM_BACKEND={backend!r}; expected one of {BACKENDS}")
  if backend == "auto":
    platform = jax.default_backend()
    backend = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(
        platform, "reference")
  return backend


def _hopper() -> bool:
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _static(backend: str, out_dtype, tiling: Tiling | None, interpret: bool) -> "_Static":
  resolved = resolve_backend(backend)
  prefer = (backend == "auto" and resolved == "pallas_gpu" and tiling is None
            and not interpret and _hopper())
  return _Static(resolved, jnp.dtype(out_dtype), tiling, interpret, prefer_mgpu=prefer)


def _module(backend: str):
  return importlib.import_module(f"openmoe_jax.kernels.gmm.{_MODULES[backend]}")


@dataclasses.dataclass(frozen=True)
class _Static:
  backend: str
  out_dtype: jnp.dtype
  tiling: Tiling | None
  interpret: bool
  prefer_mgpu: bool = False  # "auto" on Hopper: pallas_mgpu for calls with a measured tile


def _tile(st: _Static, op: str, m: int, k: int, n: int, g: int, dtype, gather: bool):
  if st.tiling is not None or st.backend == "reference":
    return st.tiling
  return tuning.lookup(st.backend, op, m=m, k=k, n=n, g=g, dtype=dtype, gather=gather)


def _routed(st: _Static, op: str, m: int, k: int, n: int, g: int, dtype, gather: bool):
  """(static, tiling) for the call: a pallas_mgpu call it cannot run goes to pallas_gpu;
  with prefer_mgpu, a call with a measured pallas_mgpu tile that it can run goes to it."""
  if st.prefer_mgpu and not gather:
    from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
    t = tuning.tuned("pallas_mgpu", op, m=m, k=k, n=n, g=g, dtype=dtype, gather=gather)
    if t is not None and not pallas_mgpu.supports(dtype, gather=gather, k=k, n=n, t=t,
                                                  op=op.split("_")[0]):
      return dataclasses.replace(st, backend="pallas_mgpu", tiling=t), t
  tiling = _tile(st, op, m, k, n, g, dtype, gather)
  if st.backend == "pallas_mgpu":
    from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
    if pallas_mgpu.supports(dtype, gather=gather, k=k, n=n, t=tiling, op=op.split("_")[0]):
      st = dataclasses.replace(st, backend="pallas_gpu", tiling=None)
      tiling = _tile(st, op, m, k, n, g, dtype, gather)
  return st, tiling


class Call(NamedTuple):
  """One kernel call as the tuning cache keys it, plus the lhs row count (gathered calls
  read `rows` lhs rows through their row index)."""
  op: str      # "gmm", "gmm_t" (rhs read transposed) or "tgmm"
  m: int
  k: int
  n: int
  g: int
  dtype: str
  gather: bool
  rows: int


_RECORDING: list[Call] | None = None


@contextlib.contextmanager
def record_calls() -> Iterator[list[Call]]:
  """Collects the kernel calls made (traced) inside the block, in order, repeats included;
  `openmoe_jax.bench.tune_model` tunes a model's calls from it."""
  global _RECORDING
  previous, _RECORDING = _RECORDING, []
  try:
    yield _RECORDING
  finally:
    _RECORDING = previous


def _record(op: str, m: int, k: int, n: int, g: int, dtype, gather: bool, rows: int) -> None:
  if _RECORDING is not None:
    _RECORDING.append(Call(op, m, k, n, g, jnp.dtype(dtype).name, gather, rows))


def _fwd_impl(st: _Static, lhs, rhs, group_sizes, row_index, transpose_rhs: bool = False):
  m = lhs.shape[0] if row_index is None else row_index.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  op = "gmm_t" if transpose_rhs else "gmm"
  _record(op, m, lhs.shape[1], n, rhs.shape[0], lhs.dtype, row_index is not None, lhs.shape[0])
  st, tiling = _routed(st, op, m, lhs.shape[1], n, rhs.shape[0], lhs.dtype,
                       row_index is not None)
  return _module(st.backend).gmm(lhs, rhs, group_sizes, row_index_M=row_index,
                                 transpose_rhs=transpose_rhs, out_dtype=st.out_dtype,
                                 tiling=tiling, interpret=st.interpret)


def _tgmm_impl(st: _Static, lhs_XK, rhs_MN, group_sizes, row_index, out_dtype):
  m, n = rhs_MN.shape
  _record("tgmm", m, lhs_XK.shape[1], n, group_sizes.shape[0], lhs_XK.dtype,
          row_index is not None, lhs_XK.shape[0])
  st, tiling = _routed(st, "tgmm", m, lhs_XK.shape[1], n, group_sizes.shape[0], lhs_XK.dtype,
                       row_index is not None)
  return _module(st.backend).tgmm(lhs_XK, rhs_MN, group_sizes, row_index_M=row_index,
                                  out_dtype=out_dtype, tiling=tiling, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(st: _Static, lhs, rhs, group_sizes, row_index, row_positions):
  del row_positions  # only the backward uses it
  return _fwd_impl(st, lhs, rhs, group_sizes, row_index)


def _gmm_fwd(st, lhs, rhs, group_sizes, row_index, row_positions):
  out = _fwd_impl(st, lhs, rhs, group_sizes, row_index)
  return out, (lhs, rhs, group_sizes, row_index, row_positions)


def _gmm_bwd(st, res, dout_MN):
  lhs, rhs, group_sizes, row_index, row_positions = res
  dout_MN = dout_MN.astype(lhs.dtype)
  # dlhs_rows = dout @ rhs[g].T: the same kernel reading rhs transposed (no copy of rhs).
  dst = dataclasses.replace(st, out_dtype=lhs.dtype)
  drows_MK = _fwd_impl(dst, dout_MN, rhs, group_sizes, None, transpose_rhs=True)
  if row_index is None:
    dlhs = drows_MK
  elif row_positions is not None:
    # Each lhs row r was used at rows row_positions[r, :]: gather them and sum (one fused
    # read of drows, no float32 [M, K] buffer, no atomics).
    dlhs = jnp.sum(drows_MK[row_positions].astype(jnp.float32), axis=1).astype(lhs.dtype)
  else:  # rows past the end are zero, so the scatter-add is exact.
    dlhs = jnp.zeros(lhs.shape, jnp.float32).at[row_index].add(
        drows_MK.astype(jnp.float32)).astype(lhs.dtype)
  drhs = _tgmm_impl(st, lhs, dout_MN, group_sizes, row_index, rhs.dtype)
  return dlhs, drhs, None, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check(lhs, rhs, group_sizes, row_index):
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm wants lhs[M,K] and rhs[G,K,N]; got {lhs.shape} and {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"contracting dims differ: lhs K={lhs.shape[1]}, rhs K={rhs.shape[1]}")
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be int[{rhs.shape[0]}]; got {group_sizes.dtype}"
                     f"{list(group_sizes.shape)}")
  if row_index is not None and (row_index.ndim != 1 or
                                not jnp.issubdtype(row_index.dtype, jnp.integer)):
    raise ValueError(f"row_index must be a 1-D int array; got {row_index.dtype}{row_index.shape}")
  if lhs.dtype != rhs.dtype:
    raise ValueError(f"lhs dtype {lhs.dtype} != rhs dtype {rhs.dtype}")


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        backend: str = "auto", preferred_element_type=None, row_index: jax.Array | None = None,
        row_positions: jax.Array | None = None, tiling: Tiling | None = None,
        interpret: bool = False) -> jax.Array:
  """Grouped matmul: out[m] = lhs[m] @ rhs[group(m)], rows sorted by group.

  With `row_index` (int[M']) the lhs rows are lhs_MK[row_index] (fused gather; lhs_MK may
  then have any number of rows). Rows past sum(group_sizes) are zero. Differentiable in lhs
  and rhs. `tiling=None` uses the tuning cache or a default.

  `row_positions` (int[R, P], optional, with `row_index`): when every lhs row r is used exactly
  P times, at rows row_positions[r, :] (row_index[row_positions[r, p]] == r), the lhs
  gradient is a gather-and-sum over those rows instead of a float32 scatter-add.
  """
  _check(lhs_MK, rhs_GKN, group_sizes_G, row_index)
  if row_positions is not None:
    if row_index is None:
      raise ValueError("row_positions needs row_index (it inverts the fused gather)")
    if (row_positions.ndim != 2 or row_positions.shape[0] != lhs_MK.shape[0]
        or row_positions.size != row_index.shape[0]):
      raise ValueError(f"row_positions must be int[{lhs_MK.shape[0]}, P] with "
                       f"{lhs_MK.shape[0]} * P == {row_index.shape[0]} rows; got "
                       f"{row_positions.shape}")
    row_positions = row_positions.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MK.dtype)
  st = _static(backend, out_dtype, tiling, interpret)
  return _gmm(st, lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
              None if row_index is None else row_index.astype(jnp.int32), row_positions)


def tgmm(lhs_KM: jax.Array, rhs_MN: jax.Array, group_sizes_G: jax.Array, *,
         backend: str = "auto", preferred_element_type=None, tiling: Tiling | None = None,
         interpret: bool = False) -> jax.Array:
  """Weight-gradient form: out[g] = lhs_KM[:, rows of g] @ rhs_MN[rows of g] -> [G, K, N].

  Not differentiable (it is itself a backward op); empty groups give zeros.
  """
  if lhs_KM.ndim != 2 or rhs_MN.ndim != 2 or lhs_KM.shape[1] != rhs_MN.shape[0]:
    raise ValueError(f"tgmm wants lhs[K,M] and rhs[M,N]; got {lhs_KM.shape} and {rhs_MN.shape}")
  out_dtype = jnp.dtype(preferred_element_type or lhs_KM.dtype)
  st = _static(backend, out_dtype, tiling, interpret)
  # The kernels read lhs row-major [M, K]; under jit the transpose of a transpose is free.
  return _tgmm_impl(st, lhs_KM.T, rhs_MN.astype(lhs_KM.dtype), group_sizes_G.astype(jnp.int32),
                    None, out_dtype)


def gmm_nodiff(lhs_XK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
               row_index: jax.Array | None = None, transpose_rhs: bool = False,
               backend: str = "auto", preferred_element_type=None,
               interpret: bool = False) -> jax.Array:
  """The raw kernel call behind `gmm`, for building other custom VJPs: out[m] =
  lhs_rows[m] @ rhs[group(m)] (@ rhs[group(m)].T with `transpose_rhs`, reading rhs as
  [G, N, K] with no transposed copy). Not differentiable."""
  if lhs_XK.dtype != rhs_GKN.dtype:
    raise ValueError(f"lhs dtype {lhs_XK.dtype} != rhs dtype {rhs_GKN.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or lhs_XK.dtype)
  st = _static(backend, out_dtype, None, interpret)
  ri = None if row_index is None else row_index.astype(jnp.int32)
  return _fwd_impl(st, lhs_XK, rhs_GKN, group_sizes_G.astype(jnp.int32), ri, transpose_rhs)


def tgmm_rows(lhs_XK: jax.Array, rhs_MN: jax.Array, group_sizes_G: jax.Array, *,
              row_index: jax.Array | None = None, backend: str = "auto",
              preferred_element_type=None, interpret: bool = False) -> jax.Array:
  """Weight-gradient form with the kernel's fused row gather: out[g] =
  lhs_rows(g).T @ rhs_rows(g) -> [G, K, N], lhs rows taken as lhs_XK[row_index]. Not
  differentiable."""
  out_dtype = jnp.dtype(preferred_element_type or lhs_XK.dtype)
  st = _static(backend, out_dtype, None, interpret)
  ri = None if row_index is None else row_index.astype(jnp.int32)
  return _tgmm_impl(st, lhs_XK, rhs_MN.astype(lhs_XK.dtype), group_sizes_G.astype(jnp.int32),
                    ri, out_dtype)
