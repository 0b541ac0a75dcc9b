"""Orbax checkpoints of {train state, data iterator state}, keep-last-K, sharded restore.

The train state is saved as a flat {"path/to/leaf": array} dict, so restoring needs only the
abstract state (shapes, dtypes, shardings) of the new run: any mesh or host count works, and
no custom pytree node has to round-trip through orbax.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


def _key(path: tuple[Any, ...]) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """{"a/b/c": leaf} for every leaf of `tree` (nnx Variables flatten to their values)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {_key(path): leaf for path, leaf in leaves}
  if len(out) != len(leaves):
    raise ValueError("two leaves of the train state map to one checkpoint key")
  return out


def unflatten(flat: dict[str, Any], like: Any) -> Any:
  """Inverse of `flatten` given a tree of the same structure."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  keys = [_key(p) for p, _ in paths]
  missing = [k for k in keys if k not in flat]
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} entries, e.g. {missing[:3]}")
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


class Checkpointer:
  """Saves every N steps and keeps the last K; restores the latest into given shardings."""

  def __init__(self, directory: str, keep: int, every: int):
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> bool:
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(flatten(state)),
                                 DATA: ocp.args.JsonSave(data_state)})
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, shardings: Any,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores `step` (default: latest) as arrays placed with `shardings`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(flatten(target)), DATA: ocp.args.JsonRestore()}))
    return unflatten(restored[STATE], abstract_state), restored[DATA]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params: Any, shardings: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores only the parameters of a saved train state: (params, step)."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE, DATA))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.abspath(directory)}")
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, shardings)
  flat = {f"params/{k}": v for k, v in flatten(target).items()}
  # restore_args carry the target shardings: without them orbax falls back to the saved
  # ones, which need not exist on this mesh (an evaluation on other devices than training's).
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(item=flat, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        flat))}))
  manager.close()
  params = {k[len("params/"):]: v for k, v in restored[STATE].items() if k.startswith("params/")}
  return unflatten(params, abstract_params), int(step)
