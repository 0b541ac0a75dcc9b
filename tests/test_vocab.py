"""Vocabulary: the cached stdlib SentencePiece model, special ids, errors on bad files."""
import pathlib

import numpy as np
import pytest

from openmoe_jax.data import spm
from openmoe_jax.data import vocab as vocab_lib


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.load_vocabulary()


def test_special_ids_and_size(vocab):
  assert vocab.vocab_size == spm.SPM_VOCAB_SIZE + vocab_lib.DEFAULT_EXTRA_IDS == 2048
  assert vocab_lib.PAD_ID == vocab.pad_id == 0 and vocab_lib.eos_id(vocab) == 1
  sentinels = vocab_lib.sentinel_ids(vocab)
  assert sentinels[0] == 2047 == vocab_lib.sentinel_id(vocab, 0)
  assert sentinels[-1] == spm.SPM_VOCAB_SIZE and len(set(sentinels.tolist())) == 100
  assert vocab_lib.is_sentinel(vocab, sentinels).all()
  assert not vocab_lib.is_sentinel(vocab, np.arange(spm.SPM_VOCAB_SIZE)).any()
  with pytest.raises(ValueError, match="out of range"):
    vocab_lib.sentinel_id(vocab, 100)


def test_mode_tokens_are_single_distinct_pieces(vocab):
  ids = [vocab_lib.mode_token_ids(vocab, m) for m in vocab_lib.MODE_TOKENS]
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 3
  for m, (i,) in zip(vocab_lib.MODE_TOKENS, ids):
    assert vocab.encode(m) == [i]  # text containing the mode token encodes to that piece
  with pytest.raises(ValueError, match="mode"):
    vocab_lib.mode_token_ids(vocab, "[FOO]")


def test_code_round_trips_exactly(vocab):
  text = "def f(x):\n\treturn x  # café ☃ 日本\n\n    if  a:\tpass\r\n"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert max(ids) < spm.SPM_VOCAB_SIZE  # sentinels never come out of the tokenizer
  # decode helper: stops at EOS, drops pad, spells sentinels
  s0 = vocab_lib.sentinel_id(vocab, 0)
  assert vocab_lib.decode(vocab, [0] + ids + [1, 99]) == text
  assert vocab_lib.decode(vocab, vocab.encode("a") + [s0]) == "a<extra_id_0>"


def test_missing_and_corrupt_files(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    vocab_lib.load_vocabulary(str(missing))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a sentencepiece model")
  with pytest.raises(ValueError, match="bad.model"):
    vocab_lib.load_vocabulary(str(bad))


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
  path = pathlib.Path(spm.stdlib_spm_path())
  assert path.exists() and path.parent == spm.cache_dir()
  mtime = path.stat().st_mtime_ns
  assert spm.stdlib_spm_path() == str(path) and path.stat().st_mtime_ns == mtime  # no retrain
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  assert spm.cache_dir() == tmp_path / "spm"


def test_foreign_model_without_mode_pieces(tmp_path):
  """A model lacking [NLU]... (like umT5's) still works: mode tokens are their encoding."""
  import sentencepiece as sp_lib
  lines = [f"line {i} of some text with words alpha beta gamma" for i in range(200)]
  sp_lib.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"),
                                    vocab_size=300, hard_vocab_limit=False, minloglevel=2, pad_id=0, eos_id=1, unk_id=2,
                                    bos_id=-1, byte_fallback=True)
  v = vocab_lib.load_vocabulary(str(tmp_path / "m.model"))
  assert v.extra_ids == 100 and v.vocab_size > 256
  ids = vocab_lib.mode_token_ids(v, "[NLU]")
  assert len(ids) > 1 and v.decode(list(ids)) == "[NLU]"
