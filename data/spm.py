"""Train the stdlib SentencePiece model once and cache it (atomically) on local disk.

The model is a pure function of the corpus and the training options below, and its cache key
hashes both, so every host that trains it gets the same file. Training uses a deterministic
line sample so it takes seconds on 2 cores.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import tempfile

import sentencepiece as spm_lib

from openmoe_jax.data import corpus as corpus_lib
from openmoe_jax.data import vocab as vocab_lib

# 1948 SentencePiece pieces + 100 seqio extra ids = 2048 ids in all (a multiple of 128).
SPM_VOCAB_SIZE = 1948
_MAX_TRAIN_LINES = 60_000
_TRAIN_OPTIONS = dict(
    model_type="unigram",
    vocab_size=SPM_VOCAB_SIZE,
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # the T5/seqio convention
    byte_fallback=True,  # any byte (tabs, newlines, non-ASCII) round-trips exactly
    character_coverage=0.9995,
    user_defined_symbols=",".join(vocab_lib.MODE_TOKENS),
    # Code: keep whitespace exactly (indentation is meaningful) and decode losslessly.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentence_length=8192,
    input_sentence_size=0,  # we sample lines ourselves, deterministically
    num_threads=2,
)


def cache_dir() -> pathlib.Path:
  """$OPENMOE_JAX_CACHE/spm, else ~/.cache/openmoe_jax/spm."""
  root = os.environ.get("OPENMOE_JAX_CACHE")
  base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "openmoe_jax"
  return base / "spm"


def _training_lines(docs: list[corpus_lib.Document]) -> list[str]:
  """Every k-th non-blank line of the training documents, at most _MAX_TRAIN_LINES."""
  lines = [l for d in corpus_lib.documents_for_split(docs, "train")
           for l in d.text.split("\n") if l.strip()]
  stride = max(1, len(lines) // _MAX_TRAIN_LINES)
  return lines[::stride][:_MAX_TRAIN_LINES]


def train_spm(docs: list[corpus_lib.Document], out_path: pathlib.Path) -> pathlib.Path:
  """Train on `docs` and write `out_path` atomically (temp file + rename)."""
  out_path.parent.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()
  spm_lib.SentencePieceTrainer.train(
      sentence_iterator=iter(_training_lines(docs)), model_writer=model,
      minloglevel=2, **_TRAIN_OPTIONS)
  fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)  # atomic: concurrent trainers write identical bytes
  return out_path


def stdlib_spm_path() -> str:
  """Path of the cached stdlib model, training it first if it is not cached yet."""
  docs = corpus_lib.stdlib_documents()
  key = hashlib.sha256((corpus_lib.fingerprint(docs) + repr(sorted(_TRAIN_OPTIONS.items()))
                        + str(_MAX_TRAIN_LINES)).encode()).hexdigest()[:16]
  path = cache_dir() / f"stdlib_{key}.model"
  if not path.exists():
    train_spm(docs, path)
  return str(path)
