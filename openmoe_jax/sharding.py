"""Device meshes and logical-axis rules: the only module that names mesh axes.

Parameters and activations carry logical axis names (`openmoe_jax.axes`); a rule table maps each
logical name to a mesh axis (or a tuple of them, or None = replicated). Rule presets are short;
`gin/sharding/<preset>.gin` picks one together with the mesh sizes.

Start-up validation (`validate_rules`, `state_shardings(strict=True)`) reports every problem at
once with a clear ValueError: an uncovered logical name, an unknown mesh axis, one mesh axis used
twice in one PartitionSpec, or a parameter dimension the mesh axes do not divide.
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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openmoe_jax import axes as ax
from openmoe_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_MESH_AXES = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis
DCN_AXES = ("data", "fsdp")  # axes that may span slices / hosts (slow links), in order of choice

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


def rules_for(name: str) -> Rules:
  """The rule preset `name` (MeshConfig.rules), with a clear error for an unknown one."""
  if name not in RULES:
    raise ValueError(f"MeshConfig.rules={name!r}; expected one of {sorted(RULES)}")
  return RULES[name]


def mesh_sizes(cfg: MeshConfig, num_devices: int) -> list[int]:
  """[data, fsdp, expert, tensor] with the -1 entry resolved to fill `num_devices`."""
  sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"MeshConfig sizes {dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
                       f"not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"MeshConfig sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} "
                     f"devices; {num_devices} available")
  return sizes


def _granule(d: jax.Device) -> int:
  """Slice index on multi-slice TPU, else the process: devices joined by slow (DCN) links."""
  slice_index = getattr(d, "slice_index", None)
  return d.process_index if slice_index is None else int(slice_index)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with axes MESH_AXES from `cfg`; a -1 size takes the remaining devices.

  Multi-slice / multi-host: when the devices span several slices (TPU) or processes (GPU), the
  first of DCN_AXES that the number of granules divides is split across them, so only data /
  fsdp traffic crosses the slow links; expert and tensor collectives stay inside a granule.
  Devices of one granule are contiguous along the batch axes, so each host's batch rows are a
  contiguous block (what `jax.make_array_from_process_local_data` expects).
  """
  devices = list(jax.devices() if devices is None else devices)
  if cfg.num_devices:
    if jax.process_count() > 1:
      raise ValueError(f"MeshConfig.num_devices={cfg.num_devices} needs a single-process run; "
                       f"this one has {jax.process_count()} processes (every process's devices "
                       "must be in the mesh)")
    if cfg.num_devices > len(devices):
      raise ValueError(f"MeshConfig.num_devices={cfg.num_devices}; only {len(devices)} "
                       "devices are available")
    devices = devices[:cfg.num_devices]
  sizes = mesh_sizes(cfg, len(devices))
  granules = sorted({_granule(d) for d in devices})
  if len(granules) > 1 and devices[0].platform != "cpu":
    dcn = [1] * len(sizes)
    for name in DCN_AXES:
      i = MESH_AXES.index(name)
      if sizes[i] % len(granules) == 0:
        dcn[i] = len(granules)
        break
    else:
      raise ValueError(f"{len(granules)} slices/hosts must divide one of {DCN_AXES} in mesh "
                       f"{dict(zip(MESH_AXES, sizes))}")
    ici = [s // g for s, g in zip(sizes, dcn)]
    arr = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=getattr(devices[0], "slice_index", None) is None)
  elif devices[0].platform in ("tpu", "gpu", "cuda") and len(devices) == jax.device_count():
    arr = mesh_utils.create_device_mesh(sizes, devices)  # topology-aware order on one granule
  else:
    devices.sort(key=lambda d: (_granule(d), d.id))
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def spec(logical: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec through `rules`; no mesh axis may repeat."""
  table = dict(rules)
  out, used = [], {}
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    for mesh_axis in _mesh_axes_of(table[name]):
      if mesh_axis in used:
        raise ValueError(f"logical axes {tuple(logical)}: mesh axis {mesh_axis!r} is used by "
                         f"both {used[mesh_axis]!r} and {name!r} in one PartitionSpec")
      used[mesh_axis] = name
    out.append(table[name])
  return P(*out)


def validate_rules(rules: Rules, mesh: Mesh,
                   required: Sequence[str] = ax.PARAM_AXES + ax.ACTIVATION_AXES) -> None:
  """Every `required` logical name is covered exactly once, and only mesh axes are named."""
  names = [n for n, _ in rules]
  problems = []
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    problems.append(f"logical axes with more than one rule: {dup}")
  missing = [n for n in required if n not in names]
  if missing:
    problems.append(f"logical axes without a rule: {missing}")
  for name, target in rules:
    axes_ = _mesh_axes_of(target)
    for mesh_axis in axes_:
      if mesh_axis not in mesh.axis_names:
        problems.append(f"rule {name!r} -> {mesh_axis!r}: not a mesh axis of {mesh.axis_names}")
    if len(set(axes_)) != len(axes_):
      problems.append(f"rule {name!r} -> {target!r} names a mesh axis twice")
  if problems:
    raise ValueError("invalid sharding rules: " + "; ".join(problems))


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


def active_rules() -> Rules | None:
  ctx = _ACTIVE.get()
  return None if ctx is None else ctx.rules


def mesh_axes_for(logical: str) -> tuple[str, ...]:
  """The mesh axes the active rules map `logical` to; () outside `activate`."""
  ctx = _ACTIVE.get()
  return () if ctx is None else _mesh_axes_of(dict(ctx.rules).get(logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside `activate`."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec(logical, ctx.rules)))


def _axis_size(mesh: Mesh, entry: Any) -> int:
  return math.prod(mesh.shape[n] for n in _mesh_axes_of(entry))


def _fit_spec(pspec: P, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[str]]:
  """(spec with non-dividing mesh axes dropped, one message per such dimension)."""
  out, problems = [], []
  for i, (dim, entry) in enumerate(zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)))):
    size = _axis_size(mesh, entry)
    if dim % size:
      problems.append(f"dim {i} of size {dim} over mesh axes {_mesh_axes_of(entry)} "
                      f"(size {size})")
      out.append(None)
    else:
      out.append(entry)
  return P(*out), problems


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules, strict: bool = True) -> Any:
  """NamedShardings for an (abstract) nnx.State or pytree of Variables, from their axis names.

  strict: a parameter dimension that its mesh axes do not divide is an error listing every
  such parameter (choose sizes that divide, or another preset); strict=False replicates it.
  """
  problems: list[str] = []

  def one(path, leaf):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    shape = tuple(getattr(value, "shape", ()))
    if not names or len(names) != len(shape):
      pspec = P()
    else:
      pspec, bad = _fit_spec(spec(names, rules), shape, mesh)
      problems.extend(f"{jax.tree_util.keystr(path)} {shape} {tuple(names)}: {b}" for b in bad)
    sharding = NamedSharding(mesh, pspec)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  out = jax.tree_util.tree_map_with_path(one, abstract_state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  if strict and problems:
    shown = "\n  ".join(problems[:12]) + (f"\n  ... {len(problems) - 12} more"
                                          if len(problems) > 12 else "")
    raise ValueError(f"{len(problems)} parameter dimensions are not divisible by their mesh "
                     f"axes (mesh {dict(mesh.shape)}):\n  {shown}")
  return out


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (product of the batch mesh axes)."""
  return _axis_size(mesh, BATCH_MESH_AXES)


def check_batch(batch_size: int, mesh: Mesh, num_processes: int = 1) -> None:
  """The global batch must split evenly over the batch mesh axes and the hosts."""
  n = math.lcm(batch_shards(mesh), num_processes)
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {batch_shards(mesh)} "
                     f"batch shards of mesh {dict(mesh.shape)} and {num_processes} hosts "
                     f"(need a multiple of {n})")


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch array: B over every batch mesh axis."""
  return NamedSharding(mesh, P(BATCH_MESH_AXES, *([None] * (rank - 1))))
