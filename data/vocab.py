"""SentencePiece vocabulary helpers on top of `seqio.SentencePieceVocabulary`.

Conventions (T5 / seqio): pad = 0, eos = 1, unk = 2, no BOS; the last `extra_ids` ids of the
vocabulary are sentinels, sentinel k = vocab_size - 1 - k. UL2 mode tokens are single pieces
when the model defines them (our stdlib model does) and their encoded pieces otherwise (umT5).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

PAD_ID = 0
DEFAULT_EXTRA_IDS = 100
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")


def load_vocabulary(path: str | None = None,
                    extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """A seqio vocabulary from a SentencePiece .model file; None means the cached stdlib model.

  Raises FileNotFoundError naming the path when the file does not exist.
  """
  if path is None:
    from openmoe_jax.data import spm  # local: training pulls in the corpus module
    path = spm.stdlib_spm_path()
  return _load(str(path), int(extra_ids))


@functools.lru_cache(maxsize=16)
def _load(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"SentencePiece model not found: {path!r}. Give DataConfig.vocab_path an existing "
        ".model file, or None for the built-in stdlib vocabulary.")
  if extra_ids < 0:
    raise ValueError(f"extra_ids={extra_ids}; expected >= 0.")
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  try:
    vocab.tokenizer  # force the load so that a corrupt file fails here, with its name
  except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
    raise ValueError(f"{path!r} is not a valid SentencePiece model: {e}") from e
  return vocab


def eos_id(vocab: seqio.Vocabulary) -> int:
  return int(vocab.eos_id)


def sentinel_id(vocab: seqio.Vocabulary, k: int) -> int:
  """Id of the k-th sentinel (<extra_id_k>), counted down from the top of the vocabulary."""
  n = vocab.extra_ids
  if not 0 <= k < n:
    raise ValueError(f"sentinel index {k} out of range [0, {n}) for this vocabulary.")
  return int(vocab.vocab_size) - 1 - k


def sentinel_ids(vocab: seqio.Vocabulary) -> np.ndarray:
  """All sentinel ids, sentinel 0 first: int32[extra_ids]."""
  return np.arange(vocab.vocab_size - 1, vocab.vocab_size - 1 - vocab.extra_ids, -1,
                   dtype=np.int32)


def is_sentinel(vocab: seqio.Vocabulary, ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids)
  return ids >= vocab.vocab_size - vocab.extra_ids


def mode_token_ids(vocab: seqio.SentencePieceVocabulary, mode: str) -> tuple[int, ...]:
  """Ids for a UL2 mode token: one id if the model has it as a piece, else its encoding."""
  if mode not in MODE_TOKENS:
    raise ValueError(f"mode={mode!r}; expected one of {MODE_TOKENS}.")
  sp = vocab.tokenizer
  piece = sp.piece_to_id(mode)
  if piece != sp.unk_id():
    return (int(piece),)
  return tuple(int(i) for i in vocab.encode(mode))


def decode(vocab: seqio.Vocabulary, ids: Sequence[int] | np.ndarray) -> str:
  """Text of `ids`, stopping at the first EOS; pad (0) is dropped, sentinels are kept."""
  out = []
  for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
    if i == vocab.eos_id:
      break
    if i != PAD_ID:
      out.append(i)
  # seqio's decode maps ids >= the SentencePiece size to unk; spell sentinels out instead.
  pieces, run = [], []
  base = vocab.vocab_size - vocab.extra_ids
  for i in out:
    if i >= base:
      if run:
        pieces.append(vocab.tokenizer.decode(run))
        run = []
      pieces.append(f"<extra_id_{vocab.vocab_size - 1 - i}>")
    else:
      run.append(i)
  if run:
    pieces.append(vocab.tokenizer.decode(run))
  return "".join(pieces)
