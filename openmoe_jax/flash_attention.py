"""Flash attention in Pallas (GPU via Triton; interpreted elsewhere) under any boolean mask.

`flash_attention(q_BLHK, k_BSNK, v_BSNK, mask_BLS)` equals `attention.dot_product_attention`
(impl "xla"): softmax(q k^T / sqrt(K)) v in float32 statistics, H query heads sharing N kv heads,
zeros on query rows that see no key. It never materialises the [B, H, L, S] scores.

Masks. The t5x decoder mask (causal, prefix-LM, packed segments) is passed as the dense boolean
[B, L, S] the model already builds: one byte per (query, key) pair, read once per tile, which is
small next to the scores a fused kernel avoids (for B=64, L=S=1024: 64 MiB per layer pass). From
it a [B, L/bq, S/bk] table of non-empty tiles gives every query block the range of key blocks it
must visit (and every key block its query-block range in the backward pass), so the masked-out
upper triangle of causal / prefix-LM attention and other segments' tiles outside that range cost
nothing; tiles inside the range are masked element-wise.

Backward (FlashAttention-2): the forward saves the row log-sum-exp; delta = rowsum(dO * O) is one
XLA reduction; one kernel accumulates dK, dV per key block, another dQ per query block.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from openmoe_jax.kernels import batch_partition

NEG_INF = -1e30  # finite, so that exp(NEG_INF - NEG_INF) stays defined on fully masked rows


class Blocks(NamedTuple):
  """Tile sizes (powers of two dividing L and S) and Triton launch settings."""
  fwd_q: int = 128
  fwd_k: int = 64
  bwd_q: int = 64
  bwd_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _compiler_params(blocks: Blocks):
  if _interpret():
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _fit(block: int, length: int, name: str) -> int:
  block = min(block, length)
  if length % block or block & (block - 1):
    raise ValueError(f"flash_attention: {name} length {length} needs a power-of-two tile "
                     f"dividing it; got tile {block}")
  return block


def _tile_ranges(mask_BLS: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
  """[B, nq, 4] key-block ranges per query block and [B, nk, 4] query-block ranges per key
  block: (lo, hi, full_lo, full_hi). Blocks in [lo, hi) hold every visible pair; those in
  [full_lo, full_hi) (a run of fully visible tiles, empty if there is none) skip the
  element-wise mask."""
  b, l, s = mask_BLS.shape
  tiles = mask_BLS.reshape(b, l // bq, bq, s // bk, bk)
  any_BQK, all_BQK = jnp.any(tiles, axis=(2, 4)), jnp.all(tiles, axis=(2, 4))

  def ranges(any_, all_):  # [B, rows, cols] -> per row
    n = any_.shape[-1]
    has = jnp.any(any_, axis=-1)
    lo = jnp.where(has, jnp.argmax(any_, axis=-1), 0)
    hi = jnp.where(has, n - jnp.argmax(any_[..., ::-1], axis=-1), 0)
    full_lo = jnp.argmax(all_, axis=-1)
    after = ~all_ & (jnp.arange(n) >= full_lo[..., None])
    full_hi = jnp.where(jnp.any(after, axis=-1), jnp.argmax(after, axis=-1), n)
    has_full = jnp.any(all_, axis=-1)
    full_lo, full_hi = jnp.where(has_full, full_lo, hi), jnp.where(has_full, full_hi, hi)
    return jnp.stack([lo, hi, full_lo, full_hi], -1).astype(jnp.int32)

  return (ranges(any_BQK, all_BQK),
          ranges(jnp.swapaxes(any_BQK, 1, 2), jnp.swapaxes(all_BQK, 1, 2)))


def _three_loops(range_ref, body, init):
  """body(j, carry, masked) over [lo, hi): masked before and after the full run."""
  lo, hi, full_lo, full_hi = range_ref[0], range_ref[1], range_ref[2], range_ref[3]
  carry = jax.lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), init)
  carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _dot_t(a, b):  # a [m, k] @ b[n, k]^T in float32
  return jnp.dot(a, b.T, preferred_element_type=jnp.float32)


def _fwd_kernel(range_ref, q_ref, k_ref, v_ref, m_ref, o_ref, lse_ref, *, scale, bk):
  q = q_ref[...]
  bq, kdim = q.shape

  def body(j, carry, masked):
    acc, m_i, l_i = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot_t(q, k) * scale
    if masked:
      visible = m_ref[:, pl.ds(start, bk)] != 0
      s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if masked:
      p = jnp.where(visible, p, 0.0)
    alpha = jnp.exp(m_i - m_new)
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return acc, m_new, l_i

  init = (jnp.zeros((bq, kdim), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m_i, l_i = _three_loops(range_ref, body, init)
  seen = l_i > 0.0
  o_ref[...] = (acc / jnp.where(seen, l_i, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m_i + jnp.log(jnp.where(seen, l_i, 1.0)), 0.0)


def _probs(q, k, visible, lse, scale):
  p = jnp.exp(_dot_t(q, k) * scale - lse[:, None])
  return p if visible is None else jnp.where(visible, p, 0.0)


def _dq_kernel(range_ref, q_ref, k_ref, v_ref, m_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, bk):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq, masked):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    p = _probs(q, k, (m_ref[:, pl.ds(start, bk)] != 0) if masked else None, lse, scale)
    ds = p * (_dot_t(do, v) - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = _three_loops(range_ref, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(range_ref, q_ref, k_ref, v_ref, m_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, bq):
  k, v = k_ref[...], v_ref[...]

  def body(i, carry, masked):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    q = q_ref[pl.ds(start, bq), :]
    do = do_ref[pl.ds(start, bq), :]
    lse = lse_ref[pl.ds(start, bq)]
    delta = delta_ref[pl.ds(start, bq)]
    p = _probs(q, k, (m_ref[pl.ds(start, bq), :] != 0) if masked else None, lse, scale)
    dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    ds = p * (_dot_t(do, v) - delta[:, None])
    dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _three_loops(range_ref, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, mask_i8, q_ranges, blocks: Blocks):
  b, l, h, kd = q.shape
  s, n = k.shape[1], k.shape[2]
  g = h // n
  bq, bk = _fit(blocks.fwd_q, l, "query"), _fit(blocks.fwd_k, s, "key")
  kernel = functools.partial(_fwd_kernel, scale=kd ** -0.5, bk=bk)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, h, l // bq),
      in_specs=[
          pl.BlockSpec((None, None, 4), lambda bi, hi, qi: (bi, qi, 0)),
          pl.BlockSpec((None, bq, None, kd), lambda bi, hi, qi: (bi, qi, hi, 0)),
          pl.BlockSpec((None, s, None, kd), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, s, None, kd), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, bq, s), lambda bi, hi, qi: (bi, qi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, kd), lambda bi, hi, qi: (bi, qi, hi, 0)),
          pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, l), jnp.float32)],
      compiler_params=_compiler_params(blocks),
      interpret=_interpret(),
      name="flash_attention_fwd",
  )(q_ranges, q, k, v, mask_i8)
  return out, lse


# Under jit with batch-sharded operands each device runs the kernels on its own sequences.
_forward_sharded = batch_partition.batch_partitioned(_forward, num_arrays=5, num_static=1)


def _backward(q, k, v, mask_i8, out, lse, dout, blocks: Blocks):
  b, l, h, kd = q.shape
  s, n = k.shape[1], k.shape[2]
  g = h // n
  bq, bk = _fit(blocks.bwd_q, l, "query"), _fit(blocks.bwd_k, s, "key")
  q_ranges, k_ranges = _tile_ranges(mask_i8 != 0, bq, bk)
  delta = jnp.einsum("BLHK,BLHK->BHL", out.astype(jnp.float32), dout.astype(jnp.float32))
  scale = kd ** -0.5
  params = _compiler_params(blocks)
  row = lambda bi, hi, i: (bi, hi, 0)  # noqa: E731  [B, H, L] statistics, whole rows
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, bk=bk),
      grid=(b, h, l // bq),
      in_specs=[
          pl.BlockSpec((None, None, 4), lambda bi, hi, qi: (bi, qi, 0)),
          pl.BlockSpec((None, bq, None, kd), lambda bi, hi, qi: (bi, qi, hi, 0)),
          pl.BlockSpec((None, s, None, kd), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, s, None, kd), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, bq, s), lambda bi, hi, qi: (bi, qi, 0)),
          pl.BlockSpec((None, bq, None, kd), lambda bi, hi, qi: (bi, qi, hi, 0)),
          pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
          pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, kd), lambda bi, hi, qi: (bi, qi, hi, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=_interpret(), name="flash_attention_dq",
  )(q_ranges, q, k, v, mask_i8, dout, lse, delta)
  # dK, dV per query head (float32 when heads share a kv head, summed over the group below).
  kv_dtype = k.dtype if g == 1 else jnp.float32
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, bq=bq),
      grid=(b, h, s // bk),
      in_specs=[
          pl.BlockSpec((None, None, 4), lambda bi, hi, ki: (bi, ki, 0)),
          pl.BlockSpec((None, l, None, kd), lambda bi, hi, ki: (bi, 0, hi, 0)),
          pl.BlockSpec((None, bk, None, kd), lambda bi, hi, ki: (bi, ki, hi // g, 0)),
          pl.BlockSpec((None, bk, None, kd), lambda bi, hi, ki: (bi, ki, hi // g, 0)),
          pl.BlockSpec((None, l, bk), lambda bi, hi, ki: (bi, 0, ki)),
          pl.BlockSpec((None, l, None, kd), lambda bi, hi, ki: (bi, 0, hi, 0)),
          pl.BlockSpec((None, None, l), row),
          pl.BlockSpec((None, None, l), row),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, kd), lambda bi, hi, ki: (bi, ki, hi, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, s, h, kd), kv_dtype)] * 2,
      compiler_params=params, interpret=_interpret(), name="flash_attention_dkv",
  )(k_ranges, q, k, v, mask_i8, dout, lse, delta)
  if g > 1:
    dk_h = dk_h.reshape(b, s, n, g, kd).sum(axis=3).astype(k.dtype)
    dv_h = dv_h.reshape(b, s, n, g, kd).sum(axis=3).astype(v.dtype)
  return dq, dk_h, dv_h


_backward_sharded = batch_partition.batch_partitioned(_backward, num_arrays=7, num_static=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask_i8, blocks):
  out, _ = _fwd_res(q, k, v, mask_i8, blocks)
  return out


def _fwd_res(q, k, v, mask_i8, blocks):
  bq = _fit(blocks.fwd_q, q.shape[1], "query")
  bk = _fit(blocks.fwd_k, k.shape[1], "key")
  q_ranges, _ = _tile_ranges(mask_i8 != 0, bq, bk)
  out, lse = _forward_sharded(q, k, v, mask_i8, q_ranges, blocks)
  # Named so that the "dots" remat policy keeps them instead of re-running the forward kernel.
  out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
  return out, (q, k, v, mask_i8, out, lse)


def _bwd(blocks, res, dout):
  q, k, v, mask_i8, out, lse = res
  dq, dk, dv = _backward_sharded(q, k, v, mask_i8, out, lse, dout, blocks)
  return dq, dk, dv, None


_flash.defvjp(_fwd_res, _bwd)


def flash_attention(q_BLHK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array,
                    mask_BLS: jax.Array, blocks: Blocks = Blocks()) -> jax.Array:
  """Masked softmax attention, differentiable in q, k, v; see the module docstring."""
  b, l, h, kd = q_BLHK.shape
  if k_BSNK.shape != v_BSNK.shape or k_BSNK.shape[0] != b or k_BSNK.shape[3] != kd:
    raise ValueError(f"flash_attention: q {q_BLHK.shape}, k {k_BSNK.shape} and v "
                     f"{v_BSNK.shape} disagree (expected [B,L,H,K], [B,S,N,K], [B,S,N,K])")
  if h % k_BSNK.shape[2]:
    raise ValueError(f"flash_attention: {h} query heads not divisible by {k_BSNK.shape[2]} "
                     "kv heads")
  if mask_BLS.shape != (b, l, k_BSNK.shape[1]):
    raise ValueError(f"flash_attention: mask {mask_BLS.shape}; expected {(b, l, k_BSNK.shape[1])}")
  return _flash(q_BLHK, k_BSNK, v_BSNK, mask_BLS.astype(jnp.int8), blocks)
