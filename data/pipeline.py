"""Task/mixture -> fixed-length decoder-only numpy batches (docs/CONTRACTS.md), resumable.

Examples come from seqio (deterministic given the seed: seeded shuffles and stateless
denoisers), and are packed here, in numpy, greedily in stream order: an example goes into the
current row if it fits, else the row is closed. The packed stream is therefore a pure function
of the example stream, so the iterator state is just the number of examples consumed; restoring
rebuilds the pipeline and skips that many examples inside tf.data (no Python per example).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import seqio
import tensorflow as tf

from openmoe_jax.data import mixtures as mixtures_lib
from openmoe_jax.data import tasks as tasks_lib
from openmoe_jax.data import vocab as vocab_lib

BATCH_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions", "decoder_causal_attention")
_STATE_VERSION = 1


class DataConfigLike(Protocol):
  mixture: str
  vocab_path: str | None
  data_dir: str | None
  text_files: tuple[str, ...]
  pack: bool
  ul2: bool
  seed: int


def resolve_mixture(mixture: str, ul2: bool) -> str:
  """"stdlib" + ul2 -> "stdlib_ul2"; a name with a suffix must agree with the ul2 flag."""
  for suffix, is_ul2 in (("_ul2", True), ("_lm", False)):
    if mixture.endswith(suffix):
      if is_ul2 != ul2:
        raise ValueError(f"DataConfig.mixture={mixture!r} disagrees with DataConfig.ul2={ul2}; "
                         f"use the {'_ul2' if ul2 else '_lm'} variant or flip ul2.")
      return mixture
  return f"{mixture}_{'ul2' if ul2 else 'lm'}"


class Packer:
  """Greedy in-order packing of (inputs, targets) examples into rows of length L."""

  def __init__(self, seq_len: int, pack: bool):
    self.seq_len, self.pack = seq_len, pack
    self._new_row()

  def _new_row(self) -> None:
    L = self.seq_len
    self.row = {k: np.zeros(L, np.float32 if k == "decoder_loss_weights" else np.int32)
                for k in BATCH_KEYS}
    self.used, self.segments = 0, 0

  def fits(self, n: int) -> bool:
    return self.used == 0 or (self.pack and self.used + n <= self.seq_len)

  def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
    tokens = np.concatenate([inputs, targets])[:self.seq_len]
    n, n_in = len(tokens), min(len(inputs), self.seq_len)
    s, r = slice(self.used, self.used + n), self.row
    self.segments += 1
    r["decoder_target_tokens"][s] = tokens
    r["decoder_input_tokens"][self.used + 1:self.used + n] = tokens[:-1]  # BOS = 0 at start
    r["decoder_segment_ids"][s] = self.segments
    r["decoder_positions"][s] = np.arange(n)
    # Loss on the targets part only (all tokens for plain LM, whose inputs are empty).
    r["decoder_loss_weights"][self.used + n_in:self.used + n] = 1.0
    if n_in:  # seqio PrefixLM convention: the inputs plus the first target position
      r["decoder_causal_attention"][self.used:self.used + min(n_in + 1, n)] = 1
    self.used += n

  def pop_row(self) -> dict[str, np.ndarray]:
    row = self.row
    self._new_row()
    return row


class BatchIterator:
  """Iterator of numpy batches {key: [B, L]} with get_state()/set_state() for resumption."""

  def __init__(self, make_dataset: Callable[[], tf.data.Dataset], batch_size: int,
               seq_len: int, pack: bool, finite: bool, fingerprint: str):
    # A factory, not a dataset: seeded tf.data shuffles reshuffle on every new iterator of the
    # same dataset object, but a freshly built dataset replays the same order.
    self._make_dataset, self._finite, self._fingerprint = make_dataset, finite, fingerprint
    self.batch_size, self.seq_len, self.pack = batch_size, seq_len, pack
    self._reset(0)

  def _reset(self, consumed: int) -> None:
    self._consumed = consumed  # examples pulled from the dataset, incl. the pending one
    self._pending: tuple[np.ndarray, np.ndarray] | None = None
    self._exhausted = False
    ds = self._make_dataset()
    ds = ds.skip(consumed) if consumed else ds
    self._it = iter(ds.as_numpy_iterator())

  def _next_example(self) -> tuple[np.ndarray, np.ndarray] | None:
    if self._pending is not None:
      ex, self._pending = self._pending, None
      return ex
    try:
      ex = next(self._it)
    except StopIteration:
      return None
    self._consumed += 1
    inputs = ex.get("inputs", np.zeros(0, np.int32)).astype(np.int32)
    return inputs, ex["targets"].astype(np.int32)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    packer, rows = Packer(self.seq_len, self.pack), []
    while len(rows) < self.batch_size:
      ex = self._next_example()
      if ex is None:
        self._exhausted = True
        if packer.used:
          rows.append(packer.pop_row())
        break
      n = min(len(ex[0]) + len(ex[1]), self.seq_len)
      if not packer.fits(n):
        rows.append(packer.pop_row())
        if len(rows) == self.batch_size:
          self._pending = ex  # belongs to the next batch
          break
      packer.add(*ex)
    if not rows:
      if not self._finite:
        raise RuntimeError("The training stream ended: this shard of the data is empty "
                           "(more shards than documents?).")
      raise StopIteration
    while len(rows) < self.batch_size:  # the last eval batch: pad with empty rows
      rows.append(Packer(self.seq_len, self.pack).pop_row())
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next batch starts after this many examples."""
    consumed = self._consumed - (self._pending is not None)
    return {"version": _STATE_VERSION, "examples_consumed": int(consumed),
            "exhausted": self._exhausted, "fingerprint": self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resume so that the next batches equal those after get_state() returned `state`."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"iterator state version {state.get('version')!r}; "
                       f"expected {_STATE_VERSION}.")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError("iterator state was saved for a different data configuration "
                       f"({state.get('fingerprint')} != {self._fingerprint}).")
    self._reset(int(state["examples_consumed"]))
    self._exhausted = bool(state.get("exhausted", False))


def get_vocabulary(config: DataConfigLike) -> seqio.SentencePieceVocabulary:
  return vocab_lib.load_vocabulary(config.vocab_path)


def vocab_size(config: DataConfigLike) -> int:
  """Size of the vocabulary actually used (SentencePiece pieces + extra ids)."""
  return int(get_vocabulary(config).vocab_size)


def decode(config: DataConfigLike, ids: Sequence[int] | np.ndarray) -> str:
  return vocab_lib.decode(get_vocabulary(config), ids)


def get_dataset(config: DataConfigLike, split: str, seq_len: int, seed: int,
                shard_index: int = 0, num_shards: int = 1,
                num_epochs: int | None = None) -> tf.data.Dataset:
  """The seqio example stream ({"inputs"?, "targets"}) of the configured task or mixture."""
  mixtures_lib.register(config.vocab_path, config.data_dir, tuple(config.text_files))
  name = resolve_mixture(config.mixture, config.ul2)
  # seqio's registry lives as long as the process: a mixture registered for an earlier config
  # (other text files, another data_dir) must not stand in for this config's missing source.
  if name.startswith("text_files_") and not config.text_files:
    raise ValueError(f"DataConfig.mixture={config.mixture!r} reads DataConfig.text_files, "
                     "which is empty: give at least one .txt or .jsonl path.")
  if name.startswith(("c4_", "the_stack_")) and not config.data_dir:
    raise ValueError(f"DataConfig.mixture={config.mixture!r} reads TFDS datasets from "
                     "DataConfig.data_dir, which is not set.")
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
    raise ValueError(f"Unknown data mixture {name!r}; registered: {known}. c4/the_stack "
                     "need DataConfig.data_dir, text_files_* need DataConfig.text_files.") \
        from None
  train = split == "train"
  return provider.get_dataset(
      sequence_length={"inputs": seq_len, "targets": seq_len}, split=split,
      use_cached=False, shuffle=train, seed=tasks_lib.host_seed(seed, shard_index),
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
      trim_output_features=True)


def make_iterator(config: DataConfigLike, split: str, batch_size: int, seq_len: int,
                  seed: int, shard_index: int = 0, num_shards: int = 1,
                  num_epochs: int | None = None) -> BatchIterator:
  """Batches of this host's shard: dict of [batch_size, seq_len] numpy arrays.

  split: "train" (shuffled) or "validation" (unshuffled, same order every time). Both repeat
  forever unless num_epochs is given; with num_epochs the stream ends (StopIteration) and the
  last batch is padded with empty rows. `seed` (0 <= seed < 2**24) drives shuffling and the
  denoisers, each host's own draws (tasks.host_seed).
  shard_index/num_shards: jax.process_index()/process_count().
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}; expected 'train' or 'validation'.")
  if batch_size < 1 or seq_len < 8:
    raise ValueError(f"batch_size={batch_size} (>= 1), seq_len={seq_len} (>= 8) required.")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} not in [0, num_shards={num_shards}).")
  make = lambda: get_dataset(config, split, seq_len, seed, shard_index, num_shards, num_epochs)
  key = dict(mixture=resolve_mixture(config.mixture, config.ul2), vocab=config.vocab_path,
             data_dir=config.data_dir, text_files=list(config.text_files), pack=config.pack,
             split=split, batch=batch_size, seq_len=seq_len, seed=seed, shard=shard_index,
             num_shards=num_shards, num_epochs=num_epochs)
  fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return BatchIterator(make, batch_size, seq_len, config.pack, num_epochs is not None, fp)
