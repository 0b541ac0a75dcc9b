"""Device meshes and logical-axis rules: the only module that names mesh axes.

Parameters and activations carry logical axis names (`openmoe_jax.axes`); a rule table maps each
logical name to a mesh axis (or a tuple of them, or None = replicated). Rule presets are short.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openmoe_jax import axes as ax
from openmoe_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_MESH_AXES = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis

Rules = tuple[tuple[str, Any], ...]

_COMMON: Rules = (
    (ax.BATCH, BATCH_MESH_AXES),
    (ax.LENGTH, None),
    (ax.NORM, None),
    (ax.LAYERS, None),
    (ax.HEAD_DIM, None),
    (ax.ACT_EXPERT, "expert"),
    # Expert buffers [E, G, C, D]: E over "expert", so groups only over the other batch axes.
    (ax.ACT_EXPERT_GROUP, ("data", "fsdp")),
)

RULES: dict[str, Rules] = {
    # Pure data parallelism: every parameter replicated.
    "data_parallel": _COMMON + (
        (ax.VOCAB, None), (ax.EMBED, None), (ax.MLP, None), (ax.HEADS, None),
        (ax.KV_HEADS, None), (ax.EXPERT, None), (ax.EXPERT_MLP, None),
        (ax.ACT_EMBED, None), (ax.ACT_HEADS, None), (ax.ACT_MLP, None), (ax.ACT_VOCAB, None)),
    # FSDP: parameters sharded on their embed dimension over the fsdp axis.
    "fsdp": _COMMON + (
        (ax.VOCAB, None), (ax.EMBED, "fsdp"), (ax.MLP, None), (ax.HEADS, None),
        (ax.KV_HEADS, None), (ax.EXPERT, None), (ax.EXPERT_MLP, None),
        (ax.ACT_EMBED, None), (ax.ACT_HEADS, None), (ax.ACT_MLP, None), (ax.ACT_VOCAB, None)),
    # FSDP + expert parallelism: experts split over the expert axis.
    "fsdp_expert": _COMMON + (
        (ax.VOCAB, None), (ax.EMBED, "fsdp"), (ax.MLP, None), (ax.HEADS, None),
        (ax.KV_HEADS, None), (ax.EXPERT, "expert"), (ax.EXPERT_MLP, None),
        (ax.ACT_EMBED, None), (ax.ACT_HEADS, None), (ax.ACT_MLP, None), (ax.ACT_VOCAB, None)),
    # FSDP + expert + tensor parallelism (Megatron-style heads / hidden split).
    "fsdp_expert_tensor": _COMMON + (
        (ax.VOCAB, "tensor"), (ax.EMBED, "fsdp"), (ax.MLP, "tensor"), (ax.HEADS, "tensor"),
        (ax.KV_HEADS, "tensor"), (ax.EXPERT, "expert"), (ax.EXPERT_MLP, "tensor"),
        (ax.ACT_EMBED, None), (ax.ACT_HEADS, "tensor"), (ax.ACT_MLP, "tensor"),
        (ax.ACT_VOCAB, "tensor")),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with axes MESH_AXES from `cfg`; a -1 size takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"MeshConfig {sizes}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"MeshConfig sizes {sizes} need {math.prod(sizes)} devices; "
                     f"{len(devices)} available")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec(logical: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec through `rules`."""
  table = dict(rules)
  out = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    out.append(table[name])
  return P(*out)


def validate_rules(rules: Rules, mesh: Mesh) -> None:
  """Every rule names existing mesh axes, and no logical name is mapped twice."""
  names = [n for n, _ in rules]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise ValueError(f"logical axes with more than one rule: {sorted(dup)}")
  for name, target in rules:
    for mesh_axis in (target if isinstance(target, tuple) else (target,)):
      if mesh_axis is not None and mesh_axis not in mesh.axis_names:
        raise ValueError(f"rule {name!r} -> {mesh_axis!r}: not a mesh axis of {mesh.axis_names}")


@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules


_ACTIVE: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("openmoe_mesh",
                                                                         default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `constrain` apply activation shardings for `mesh` / `rules` inside the block."""
  validate_rules(rules, mesh)
  token = _ACTIVE.set(_Context(mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  ctx = _ACTIVE.get()
  return None if ctx is None else ctx.mesh


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside `activate`."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec(logical, ctx.rules)))


def _fit_spec(pspec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension (e.g. tiny vocab on a big tensor axis)."""
  out = []
  for dim, entry in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec))):
    names = entry if isinstance(entry, tuple) else (entry,)
    size = math.prod(mesh.shape[n] for n in names if n is not None)
    out.append(entry if size > 0 and dim % size == 0 else None)
  return P(*out)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an (abstract) nnx.State or pytree of Variables, from their axis names."""

  def one(leaf):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    shape = tuple(getattr(value, "shape", ()))
    if not names or len(names) != len(shape):
      pspec = P()
    else:
      pspec = _fit_spec(spec(names, rules), shape, mesh)
    sharding = NamedSharding(mesh, pspec)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch array: B over every batch mesh axis."""
  return NamedSharding(mesh, P(BATCH_MESH_AXES, *([None] * (rank - 1))))
