"""Basic layers: parameters with logical axes, RMSNorm / LayerNorm, embeddings, RoPE and the
gated MLP."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from openmoe_jax import axes as ax
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], logical: Sequence[str],
          dtype: str = "float32") -> nnx.Param:
  """A parameter with logical axis names (used by sharding.state_shardings)."""
  if len(shape) != len(logical):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical)} differ in rank")
  with nnx.use_eager_sharding(False):
    return nnx.Param(init(rngs.params(), tuple(shape), dtype_of(dtype)),
                     out_sharding=tuple(logical))


def lowp_einsum(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """float32 einsum("a,b->c") of x and w rounded to `dtype`, whose backward also runs in `dtype`.

  A plain einsum with preferred_element_type=float32 gets a float32 cotangent, so both of its
  backward matmuls run in float32 (on an H100, MoEUT's [65536, 1024] x [1024, 448] router took
  ~12 ms per step that way). Here the cotangent is rounded to `dtype` first and the products
  accumulate in float32: dx = einsum("c,b->a"), dw = einsum("a,c->b"), each cast to its
  operand's dtype. Every index of one operand must appear in the other or in the output.
  With dtype float32 this is a plain einsum."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  _lowp_specs(spec)
  return _lowp_einsum(spec, dtype, x, w)


def _lowp_specs(spec: str) -> tuple[str, str]:
  ins, out = spec.replace(" ", "").split("->")
  a, b = ins.split(",")
  if set(a) - set(b + out) or set(b) - set(a + out):
    raise ValueError(f"lowp_einsum({spec!r}): an index summed over in one operand only")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lowp_einsum(spec: str, dtype, x, w):
  return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _lowp_fwd(spec, dtype, x, w):
  return _lowp_einsum(spec, dtype, x, w), (x, w)


def _lowp_bwd(spec, dtype, res, ct):
  x, w = res
  dx_spec, dw_spec = _lowp_specs(spec)
  ct, xl, wl = ct.astype(dtype), x.astype(dtype), w.astype(dtype)
  dx = jnp.einsum(dx_spec, ct, wl, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum(dw_spec, xl, ct, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_lowp_einsum.defvjp(_lowp_fwd, _lowp_bwd)


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


def symmetric_uniform(bound: float) -> Initializer:
  """U(-bound, bound): torch's nn.Linear default with bound = 1 / sqrt(fan_in)."""
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def renormed_normal(std: float, axis: int) -> Initializer:
  """normal(std), then every vector along `axis` scaled to one norm, the tensor's std kept
  (MoEUT's renorm_keep_std of the sigma-MoE's expert selection vectors)."""
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    w = jax.random.normal(key, shape, jnp.float32) * std
    unit = w / jnp.linalg.norm(w, axis=axis, keepdims=True)
    return (unit * (jnp.std(w) / jnp.std(unit))).astype(dtype)
  return init


def ones() -> Initializer:
  return jax.nn.initializers.ones


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale; statistics in float32."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, param_dtype: str = "float32"):
    self.eps = eps
    self.scale = param(rngs, ones(), (dim,), (ax.NORM,), param_dtype)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x32 = x_BLD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred layer norm with a learned scale and bias (torch.nn.LayerNorm); float32
  statistics, biased variance."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, param_dtype: str = "float32"):
    self.eps = eps
    self.scale = param(rngs, ones(), (dim,), (ax.NORM,), param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), (ax.NORM,), param_dtype)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x32 = x_BLD.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x_BLD.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
  """The norm `cfg.norm_type` names, over d_model."""
  norm = LayerNorm if cfg.norm_type == "layer" else RMSNorm
  return norm(cfg.d_model, cfg.norm_eps, rngs, cfg.param_dtype)


def norm_params(cfg: ModelConfig) -> int:
  """Parameters of one `make_norm(cfg)`."""
  return cfg.d_model * (2 if cfg.norm_type == "layer" else 1)


class Embed(nnx.Module):
  """Token embedding [V, D] (tied output logits: `transformer.head_logits`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, std: float = 1.0):
    self.dtype = dtype_of(cfg.dtype)
    self.embedding_VD = param(rngs, normal(std), (cfg.vocab_size, cfg.d_model),
                              (ax.VOCAB, ax.EMBED), cfg.param_dtype)

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    return jnp.take(self.embedding_VD[...], tokens_BL, axis=0).astype(self.dtype)


def rope_frequencies(head_dim: int, fraction: float, theta: float) -> jax.Array:
  """Inverse frequencies for the rotated part of a head: [R/2] with R = rotated dims (even).

  MoEUT rotates only a fraction of each head. RoPE rotates dimension *pairs*, so an odd rotated
  width (MoEUT-44M: int(0.5 * 82) = 41, which crashes the original code) is rounded down to an
  even one (40), as MoEUT's later fix does; the remaining dims pass through unrotated.
  """
  rotated = int(head_dim * fraction) // 2 * 2
  if rotated == 0:
    raise ValueError(f"rope_fraction={fraction} rotates no dimension of head_dim={head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, rotated, 2, dtype=jnp.float32) / rotated))


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates the first 2*len(inv_freq) dims of each head by position (half-split convention)."""
  rotated = 2 * inv_freq.shape[0]
  angles_BLR = positions_BL[..., None].astype(jnp.float32) * inv_freq  # R = rotated/2
  sin = jnp.sin(angles_BLR)[:, :, None, :]
  cos = jnp.cos(angles_BLR)[:, :, None, :]
  x_rot = x_BLHK[..., :rotated].astype(jnp.float32)
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHK.dtype)
  if rotated == x_BLHK.shape[-1]:
    return out
  return jnp.concatenate([out, x_BLHK[..., rotated:]], axis=-1)


def activate(name: str, gate: jax.Array, up: jax.Array | None) -> jax.Array:
  """FFN non-linearity: gated (swiglu, geglu, openmoe_swiglu) uses `up`; plain (relu, gelu)
  ignores it. openmoe_swiglu is OpenMoE's: its gate is twice as wide ([.., 2F], `gate_width`)
  and its first half is gated by SiLU of the second, (g1 * silu(g2)) * up (the flaxformer fork
  and ColossalAI's OpenMoE both compute it so)."""
  if name == "swiglu":
    return jax.nn.silu(gate) * up
  if name == "openmoe_swiglu":
    g1, g2 = jnp.split(gate, 2, axis=-1)
    return g1 * jax.nn.silu(g2) * up
  if name == "geglu":
    return jax.nn.gelu(gate) * up
  if name == "relu":
    return jax.nn.relu(gate)
  if name == "gelu":
    return jax.nn.gelu(gate)
  raise ValueError(f"activation={name!r}; expected swiglu, geglu, openmoe_swiglu, relu or gelu")


def is_gated(name: str) -> bool:
  return name in ("swiglu", "geglu", "openmoe_swiglu")


def gate_width(name: str, f: int) -> int:
  """Width of the gate projection of an FFN of hidden width f."""
  return 2 * f if name == "openmoe_swiglu" else f


class MLP(nnx.Module):
  """Dense FFN: D -> F (gated or plain) -> D."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, d_ff: int | None = None,
               out_std_scale: float = 1.0):
    d_ff = d_ff or cfg.d_ff
    self.activation = cfg.activation
    self.dtype = dtype_of(cfg.dtype)
    std_in = cfg.init_std
    self.w_gate_DF = param(rngs, normal(std_in), (cfg.d_model, gate_width(cfg.activation, d_ff)),
                           (ax.EMBED, ax.MLP), cfg.param_dtype)
    self.w_up_DF = (param(rngs, normal(std_in), (cfg.d_model, d_ff), (ax.EMBED, ax.MLP),
                          cfg.param_dtype) if is_gated(cfg.activation) else None)
    self.w_out_FD = param(rngs, normal(cfg.init_std * out_std_scale), (d_ff, cfg.d_model),
                          (ax.MLP, ax.EMBED), cfg.param_dtype)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD.astype(self.dtype)
    gate_BLF = jnp.einsum("BLD,DF->BLF", x_BLD, self.w_gate_DF[...].astype(self.dtype))
    up_BLF = (jnp.einsum("BLD,DF->BLF", x_BLD, self.w_up_DF[...].astype(self.dtype))
              if self.w_up_DF is not None else None)
    h_BLF = sharding.constrain(activate(self.activation, gate_BLF, up_BLF),
                               (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    return jnp.einsum("BLF,FD->BLD", h_BLF, self.w_out_FD[...].astype(self.dtype))
