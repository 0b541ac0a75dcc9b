"""Run a Pallas kernel per device slice of a leading batch dimension under a sharded `jax.jit`.

XLA's partitioner cannot look inside a Pallas call, so when the operands of one are sharded
it gathers them onto every device and runs the whole call everywhere. `batch_partitioned`
wraps a function whose operands and results all lead with the same independent dimension
(rows of a top-k, sequences of attention) in `custom_partitioning`: that dimension keeps the
first operand's sharding, the others are replicated, and each device calls the function on
its own slice. On one device the function runs as it is.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def _rank(t) -> int:
  return len(t.shape)


def _batch_axes(arg_shapes) -> Any:
  spec = getattr(arg_shapes[0].sharding, "spec", None)
  return spec[0] if spec else None


def _sharded(mesh, axes, shapes):
  """NamedShardings splitting dim 0 over `axes`, the rest replicated, for a pytree of shapes."""
  return jax.tree.map(lambda s: NamedSharding(mesh, P(axes, *([None] * (_rank(s) - 1)))),
                      shapes)


def _rule(*params):
  """Shardy rule: a shared factor b for every dim 0, every other dim replicated."""
  operand_types, result_types = params[-2:]
  others: list[str] = []

  def mapping(prefix: str, i: int, t) -> str:
    dims = [f"{prefix}{i}d{j}" for j in range(1, _rank(t))]
    others.extend(dims)
    return " ".join(["b", *dims])

  lhs = ", ".join(mapping("x", i, t) for i, t in enumerate(operand_types))
  rhs = ", ".join(mapping("y", i, t) for i, t in enumerate(result_types))
  return f"{lhs} -> {rhs}", {"need_replication_factors": tuple(others)}


def batch_partitioned(fn: Callable, num_arrays: int, num_static: int = 0) -> Callable:
  """`fn(*arrays, *statics)`: `num_arrays` array operands, then `num_static` hashable static
  arguments; returns a callable with the same signature (see module doc)."""

  def partition(*params):
    statics, (mesh, arg_shapes, result_shape) = params[:-3], params[-3:]
    axes = _batch_axes(arg_shapes)
    return (mesh, lambda *xs: fn(*xs, *statics), _sharded(mesh, axes, result_shape),
            tuple(_sharded(mesh, axes, list(arg_shapes))))

  def infer(*params):
    mesh, arg_shapes, result_shape = params[-3:]
    return _sharded(mesh, _batch_axes(arg_shapes), result_shape)

  wrapped = custom_partitioning(
      fn, static_argnums=tuple(range(num_arrays, num_arrays + num_static)))
  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=_rule)
  return wrapped
