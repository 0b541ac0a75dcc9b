"""Read a T5X checkpoint directory (`checkpoint_N/`) with msgpack + tensorstore only, no t5x import.

On-disk layout (t5x/checkpoints.py, checkpoint format VERSION 3):
  checkpoint_N/checkpoint       msgpack of {"version": 3, "optimizer": {"target": params,
                                "state": {"step": .., "param_states": Adafactor v_row/v_col/v/m}}}
  checkpoint_N/target.decoder.layers_0.self_attention.query.kernel/   a zarr array (".zarray" +
                                chunk files "0.0", gzip or no compression) for every partitioned leaf
Leaves of the msgpack tree are either inline arrays (flax's msgpack ndarray extension) or a
tensorstore spec dict whose kvstore path ("target.decoder...") is relative to the checkpoint
directory; a "PLACEHOLDER://<relative path>" string is accepted as well.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterator

import msgpack
import numpy as np

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3  # flax.serialization._MsgpackExtType
PLACEHOLDER = "PLACEHOLDER://"


def _dtype(name: bytes | str) -> np.dtype:
  name = name.decode() if isinstance(name, bytes) else name
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _ndarray(data: bytes) -> np.ndarray:
  shape, dtype, buffer = msgpack.unpackb(data, raw=True)
  return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
  if code == _EXT_NDARRAY:
    return _ndarray(data)
  if code == _EXT_NPSCALAR:
    return _ndarray(data)[()]
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  raise ValueError(f"unknown msgpack extension type {code} in T5X checkpoint")


def _is_spec(node: Any) -> bool:
  return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  if isinstance(tree, dict) and not _is_spec(tree):
    if tree.get("__msgpack_chunked_array__"):
      raise NotImplementedError(f"{prefix}: flax chunked msgpack arrays (>1 GiB inline leaves) "
                                "are not supported")
    for key, value in tree.items():
      yield from _flatten(value, f"{prefix}/{key}" if prefix else str(key))
  else:
    yield prefix, tree


def _check_chunks(name: str, path: str) -> None:
  """Every chunk file must exist: zarr reads a missing chunk as fill values (silent zeros)."""
  with open(os.path.join(path, ".zarray"), encoding="utf-8") as f:
    meta = json.load(f)
  sep = meta.get("dimension_separator", ".")
  grid = [range(-(-n // c)) for n, c in zip(meta["shape"], meta["chunks"])]
  for index in itertools.product(*grid):
    key = sep.join(str(i) for i in index) if index else "0"
    if not os.path.isfile(os.path.join(path, key)):
      raise FileNotFoundError(f"parameter {name!r}: chunk {key!r} of {path} is missing "
                              "(incomplete download?)")


class T5xCheckpoint:
  """One T5X checkpoint directory: parameter names, shapes and lazily read arrays."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, "checkpoint")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: expected a T5X checkpoint directory "
                              "(checkpoint_N/ holding a msgpack file named 'checkpoint')")
    with open(path, "rb") as f:
      try:
        tree = msgpack.unpackb(f.read(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
      except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"{path} is not a readable T5X msgpack checkpoint: {e}") from e
    if not isinstance(tree, dict) or "optimizer" not in tree:
      raise ValueError(f"{path}: expected a msgpack map with an 'optimizer' entry "
                       f"(T5X format); got keys {sorted(tree) if isinstance(tree, dict) else tree}")
    self.version = tree.get("version")
    optimizer = tree["optimizer"]
    if "target" not in optimizer:
      raise ValueError(f"{path}: 'optimizer' has no 'target' (parameter tree)")
    self.leaves = dict(_flatten(optimizer["target"]))  # "decoder/layers_0/..." -> leaf
    self.state_leaves = dict(_flatten(optimizer.get("state", {})))
    step = self.state_leaves.get("step")
    self.step = int(self._read_leaf("state/step", step)) if step is not None else None

  def names(self) -> list[str]:
    """Parameter names, "/"-joined, without the "target/" prefix."""
    return sorted(self.leaves)

  def shape(self, name: str) -> tuple[int, ...]:
    leaf = self._leaf(name)
    if _is_spec(leaf) or isinstance(leaf, str):
      return tuple(self._open(name, leaf).shape)
    return tuple(np.shape(leaf))

  def read(self, name: str) -> np.ndarray:
    """The full array of parameter `name` (in its stored dtype)."""
    return self._read_leaf(name, self._leaf(name))

  def _leaf(self, name: str) -> Any:
    if name not in self.leaves:
      raise KeyError(f"T5X checkpoint {self.directory} has no parameter {name!r}")
    return self.leaves[name]

  def _array_dir(self, name: str, leaf: Any) -> str:
    if isinstance(leaf, str):
      if not leaf.startswith(PLACEHOLDER):
        raise ValueError(f"parameter {name!r}: unexpected string leaf {leaf[:80]!r}")
      rel = leaf[len(PLACEHOLDER):]
    else:
      rel = leaf["kvstore"].get("path") or leaf.get("path")
      if not rel:
        raise ValueError(f"parameter {name!r}: tensorstore spec without a path: {leaf}")
    return os.path.join(self.directory, rel)

  def _open(self, name: str, leaf: Any) -> Any:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    path = self._array_dir(name, leaf)
    if not os.path.isfile(os.path.join(path, ".zarray")):
      raise FileNotFoundError(f"parameter {name!r}: zarr array {path} is missing "
                              "(no .zarray); was the download complete?")
    _check_chunks(name, path)
    try:
      return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}},
                     open=True, read=True).result()
    except ValueError as e:
      raise ValueError(f"parameter {name!r}: cannot open zarr array {path}: {e}") from e

  def _read_leaf(self, name: str, leaf: Any) -> np.ndarray:
    if _is_spec(leaf) or isinstance(leaf, str):
      store = self._open(name, leaf)
      try:
        return np.asarray(store.read().result())
      except ValueError as e:  # corrupt / truncated chunk, failed decompression
        raise ValueError(f"parameter {name!r}: reading {self._array_dir(name, leaf)} failed "
                         f"(corrupted or incomplete array?): {e}") from e
    return np.asarray(leaf)
