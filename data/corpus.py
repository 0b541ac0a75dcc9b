"""The embedded default corpus: Python standard-library sources, present on every machine.

Documents are whole files. Selection, order and the train/validation split are deterministic
functions of the files' relative paths, so every host (and every rerun) sees the same corpus.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
from typing import Iterable, Sequence

# Directories that are large, test-only or not representative Python source.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"})
# pydoc_data/topics.py and the like are huge string literals, not code.
_MAX_FILE_BYTES = 150_000
DEFAULT_MAX_BYTES = 4_000_000
# 1 in _VALIDATION_MODULUS documents (by path hash) form the validation split.
_VALIDATION_MODULUS = 20
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Document:
  """One corpus document: a stable name (relative path) and its text."""
  name: str
  text: str


def _path_hash(name: str) -> int:
  return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")


def split_of(name: str) -> str:
  """Deterministic split assignment of a document by the hash of its name."""
  return "validation" if _path_hash(name) % _VALIDATION_MODULUS == 0 else "train"


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
  """Stdlib *.py files (no tests), a hash-ordered sample capped at `max_bytes`, sorted by path.

  Undecodable files are skipped (the stdlib is ours to curate, unlike a user corpus).
  """
  # Memoised: the SentencePiece cache key and the tokeniser both need the corpus.
  return list(_stdlib_documents(max_bytes))


@functools.lru_cache(maxsize=4)
def _stdlib_documents(max_bytes: int) -> tuple[Document, ...]:
  root = stdlib_root()
  candidates = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if _SKIP_DIRS.intersection(rel.parts[:-1]):
      continue
    size = path.stat().st_size
    if 0 < size <= _MAX_FILE_BYTES:
      candidates.append((rel.as_posix(), path, size))
  # Sample by path hash (not alphabetically) so the cap does not keep only a-c modules.
  candidates.sort(key=lambda c: (_path_hash(c[0]), c[0]))
  docs, total = [], 0
  for name, path, size in candidates:
    if total + size > max_bytes:
      continue
    try:
      text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    docs.append(Document(name, text))
    total += size
  docs.sort(key=lambda d: d.name)
  if not docs:
    raise ValueError(f"No stdlib *.py files found under {root}; the embedded corpus is empty.")
  return tuple(docs)


def read_text_documents(paths: Sequence[str]) -> list[Document]:
  """User text corpora: *.jsonl (one {"text": ...} per line) or plain text (one document per file).

  Raises ValueError naming the file and line on non-UTF-8 bytes, and on an empty corpus.
  """
  import json  # local: only user corpora need it

  if not paths:
    raise ValueError("text_files is empty: give at least one .txt or .jsonl path.")
  docs = []
  for path_str in paths:
    path = pathlib.Path(path_str)
    if not path.is_file():
      raise FileNotFoundError(f"Text corpus file not found: {path_str!r}")
    lines = path.read_bytes().split(b"\n")
    decoded = []
    for line_no, raw in enumerate(lines, start=1):
      try:
        decoded.append(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(
            f"{path_str}:{line_no}: line is not valid UTF-8 ({e.reason} at byte {e.start}); "
            "re-encode the file as UTF-8.") from None
    if path.suffix == ".jsonl":
      for line_no, line in enumerate(decoded, start=1):
        if not line.strip():
          continue
        try:
          text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path_str}:{line_no}: expected a JSON object with a 'text' "
                           f"field ({e!r}).") from None
        if text:
          docs.append(Document(f"{path.as_posix()}:{line_no}", text))
    else:
      text = "\n".join(decoded)
      if text.strip():
        docs.append(Document(path.as_posix(), text))
  if not docs:
    raise ValueError(f"Text corpus {list(paths)} contains no non-empty documents.")
  return docs


def documents_for_split(docs: Iterable[Document], split: str) -> list[Document]:
  """The documents of `split` ("train" | "validation"); all documents when only one exists."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
  docs = list(docs)
  chosen = [d for d in docs if split_of(d.name) == split]
  if not chosen and len(docs) < _VALIDATION_MODULUS:
    # A tiny user corpus has no validation document by hash: evaluate on the training data.
    chosen = docs
  if not chosen:
    raise ValueError(f"Split {split!r} of the corpus is empty ({len(docs)} documents in all).")
  return chosen


def fingerprint(docs: Sequence[Document]) -> str:
  """A content hash of the corpus (names and texts), used as a cache key."""
  h = hashlib.sha256()
  for d in docs:
    h.update(d.name.encode())
    h.update(b"\0")
    h.update(hashlib.sha256(d.text.encode()).digest())
  return h.hexdigest()[:16]
