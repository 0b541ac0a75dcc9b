"""seqio Tasks: the embedded stdlib code corpus, local text/JSONL files, TFDS c4 / the_stack.

Each corpus gives two tasks, "<corpus>_ul2" (UL2 denoisers, features inputs + targets) and
"<corpus>_lm" (plain causal LM, targets only). Sequence-length convention for our tasks:
sequence_length["targets"] is the packed decoder length L, and every example's
inputs + targets fit in L. Registration is idempotent: re-registering replaces the task.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from openmoe_jax.data import corpus as corpus_lib
from openmoe_jax.data import ul2 as ul2_lib
from openmoe_jax.data import vocab as vocab_lib

STDLIB = "stdlib_code"
TEXT_FILES = "text_files"
# TFDS name and text field per dataset. the_stack is not in the TFDS catalog: build it into
# data_dir yourself (e.g. with a tfds builder over the HF parquet files) under this name.
TFDS_DATASETS: dict[str, tuple[str, str]] = {
    "c4": ("c4/en:3.1.0", "text"),
    "the_stack": ("the_stack_dedup:1.0.0", "content"),
}
SHUFFLE_BUFFER = 1024
# Host h of a run with data seed s hands seqio the seed s + h * HOST_SEED_STRIDE, so every host
# draws its own shuffles, windows and denoisers (with one seed, example k of every host got the
# same denoiser, window and mask). The in-memory sources permute their documents by
# s = seed % HOST_SEED_STRIDE, the same on every host, so the hosts' shards stay disjoint.
HOST_SEED_STRIDE = 1 << 24


def host_seed(seed: int, shard_index: int) -> int:
  """The seed seqio gets on host `shard_index` for data seed `seed` (0 <= seed < stride)."""
  if not 0 <= seed < HOST_SEED_STRIDE:
    raise ValueError(f"DataConfig.seed={seed}; expected 0 <= seed < {HOST_SEED_STRIDE}")
  return seed + shard_index * HOST_SEED_STRIDE


def task_name(corpus: str, ul2: bool) -> str:
  return f"{corpus}_{'ul2' if ul2 else 'lm'}"


@functools.lru_cache(maxsize=8)
def _tokenized(source_key: tuple[str, ...], vocab_path: str | None,
               split: str) -> tuple[np.ndarray, np.ndarray]:
  """(flat token ids int32[T], row_splits int64[D+1]) of one split's documents, memoised."""
  if source_key == (STDLIB,):
    docs = corpus_lib.stdlib_documents()
  else:
    docs = corpus_lib.read_text_documents(source_key)
  docs = corpus_lib.documents_for_split(docs, split)
  sp = vocab_lib.load_vocabulary(vocab_path).tokenizer
  ids = sp.encode([d.text for d in docs])  # batched C++ encoding
  lengths = np.array([len(x) for x in ids], np.int64)
  flat = np.fromiter((t for x in ids for t in x), np.int32, count=int(lengths.sum()))
  return flat, np.concatenate([[0], np.cumsum(lengths)])


def num_documents(source_key: tuple[str, ...], vocab_path: str | None, split: str) -> int:
  return len(_tokenized(source_key, vocab_path, split)[1]) - 1


def _in_memory_dataset_fn(source_key: tuple[str, ...], vocab_path: str | None):
  """A FunctionDataSource dataset_fn over pre-tokenised documents ({"targets": int32[n]})."""

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    flat, row_splits = _tokenized(source_key, vocab_path, split)
    order = np.arange(len(row_splits) - 1)
    if shuffle_files:  # the same permutation on every host, so host shards are disjoint
      order = np.random.default_rng(0 if seed is None else seed % HOST_SEED_STRIDE
                                    ).permutation(order)
    ragged = tf.RaggedTensor.from_row_splits(flat, row_splits, validate=False)
    ragged = tf.gather(ragged, order)
    return tf.data.Dataset.from_tensor_slices({"targets": ragged})

  return dataset_fn


def _output_features(vocab: seqio.Vocabulary, ul2: bool) -> dict[str, seqio.Feature]:
  feats = {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}
  if ul2:
    feats["inputs"] = seqio.Feature(vocab, add_eos=False, dtype=tf.int32)
  return feats


def _preprocessors(ul2: bool, tokenize_field: str | None) -> list:
  pre = []
  if tokenize_field is not None:  # raw-text sources (TFDS)
    pre += [functools.partial(seqio.preprocessors.rekey, key_map={"targets": tokenize_field}),
            seqio.preprocessors.tokenize]
  if ul2:
    pre += [ul2_lib.split_tokens, ul2_lib.ul2_denoise, seqio.preprocessors.append_eos_after_trim]
  else:
    # EOS closes each document, then documents are cut into decoder-length chunks.
    pre += [seqio.preprocessors.append_eos, ul2_lib.split_tokens]
  return pre


def _add(task: seqio.Task) -> seqio.Task:
  seqio.TaskRegistry.remove(task.name)  # idempotent re-registration
  seqio.TaskRegistry.add_provider(task.name, task)
  return task


def register_in_memory(corpus: str, source_key: tuple[str, ...],
                       vocab_path: str | None) -> list[str]:
  """Register "<corpus>_ul2" and "<corpus>_lm" over pre-tokenised in-memory documents."""
  vocab = vocab_lib.load_vocabulary(vocab_path)
  names = []
  for ul2 in (True, False):
    source = seqio.FunctionDataSource(_in_memory_dataset_fn(source_key, vocab_path),
                                      splits=corpus_lib.SPLITS)
    names.append(_add(seqio.Task(
        task_name(corpus, ul2), source, _output_features(vocab, ul2),
        preprocessors=_preprocessors(ul2, None), shuffle_buffer_size=SHUFFLE_BUFFER)).name)
  return names


def register_stdlib(vocab_path: str | None = None) -> list[str]:
  return register_in_memory(STDLIB, (STDLIB,), vocab_path)


def register_text_files(paths: Sequence[str], vocab_path: str | None = None) -> list[str]:
  """Tasks over local .txt/.jsonl files; reads (and validates) them now, failing early."""
  key = tuple(str(p) for p in paths)
  _tokenized(key, vocab_path, "train")  # clear errors (missing file, bad UTF-8) at once
  return register_in_memory(TEXT_FILES, key, vocab_path)


def register_tfds(data_dir: str, vocab_path: str | None = None) -> list[str]:
  """Register c4 / the_stack tasks reading TFDS data already prepared in `data_dir`.

  Nothing is read or downloaded here; a missing dataset fails when a dataset is built.
  """
  if not data_dir:
    raise ValueError("register_tfds needs a data_dir (TFDS data is never downloaded).")
  vocab = vocab_lib.load_vocabulary(vocab_path)
  names = []
  for corpus, (tfds_name, field) in TFDS_DATASETS.items():
    for ul2 in (True, False):
      source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir)
      names.append(_add(seqio.Task(
          task_name(corpus, ul2), source, _output_features(vocab, ul2),
          preprocessors=_preprocessors(ul2, field), shuffle_buffer_size=SHUFFLE_BUFFER)).name)
  return names
