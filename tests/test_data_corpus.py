"""Corpus, registration and gin presets of data/."""
import dataclasses
import importlib
import pathlib

import pytest
import seqio

from openmoe_jax.config import DataConfig
from openmoe_jax.data import corpus
from openmoe_jax.data import mixtures
from openmoe_jax.data import tasks

_GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin" / "data"


def test_stdlib_corpus_is_deterministic_capped_and_split():
  docs = corpus.stdlib_documents()
  again = corpus.stdlib_documents()
  assert [d.name for d in docs] == [d.name for d in again] == sorted(d.name for d in docs)
  assert corpus.fingerprint(docs) == corpus.fingerprint(again)
  assert sum(len(d.text.encode()) for d in docs) <= corpus.DEFAULT_MAX_BYTES
  assert not any(part in ("test", "tests") for d in docs for part in d.name.split("/")[:-1])
  train = {d.name for d in corpus.documents_for_split(docs, "train")}
  val = {d.name for d in corpus.documents_for_split(docs, "validation")}
  assert train and val and not train & val and train | val == {d.name for d in docs}
  small = corpus.stdlib_documents(max_bytes=200_000)
  assert 0 < sum(len(d.text.encode()) for d in small) <= 200_000


def test_user_text_errors(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    corpus.read_text_documents([])
  with pytest.raises(FileNotFoundError, match="nofile"):
    corpus.read_text_documents([str(tmp_path / "nofile.txt")])
  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1.jsonl:2: line is not valid UTF-8"):
    corpus.read_text_documents([str(bad)])
  nojson = tmp_path / "x.jsonl"
  nojson.write_text('{"body": "no text field"}\n')
  with pytest.raises(ValueError, match="x.jsonl:1: expected a JSON object with a 'text'"):
    corpus.read_text_documents([str(nojson)])
  with pytest.raises(ValueError, match="split="):
    corpus.documents_for_split([], "test")


def test_registration_is_idempotent(tmp_path):
  first = mixtures.register()
  assert {"stdlib_ul2", "stdlib_lm"} <= set(first)
  importlib.reload(tasks)
  importlib.reload(mixtures)  # importing again must not crash
  assert mixtures.register() == first and mixtures.register() == first
  tasks.register_stdlib()  # re-registering a task directly replaces it
  assert seqio.get_mixture_or_task("stdlib_code_ul2").name == "stdlib_code_ul2"
  # TFDS tasks register without touching the (empty) data_dir; nothing is downloaded.
  names = mixtures.register(data_dir=str(tmp_path))
  assert {"c4_ul2", "the_stack_lm", "c4_the_stack_ul2"} <= set(names)
  assert list(tmp_path.iterdir()) == []
  mixture = seqio.get_mixture_or_task("c4_the_stack_ul2")
  assert sorted(t.name for t in mixture.tasks) == ["c4_ul2", "the_stack_ul2"]


def _gin_bindings(path: pathlib.Path) -> dict[str, str]:
  out = {}
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      key, value = (s.strip() for s in line.split("=", 1))
      out[key] = value
  return out


@pytest.mark.parametrize("name,ul2", [("stdlib_ul2", True), ("stdlib_lm", False)])
def test_gin_presets_bind_only_data_config_fields(name, ul2):
  import ast
  bindings = _gin_bindings(_GIN_DIR / f"{name}.gin")
  fields = {f.name for f in dataclasses.fields(DataConfig)}
  values = {}
  for key, value in bindings.items():
    cls, field = key.split(".")
    assert cls == "DataConfig" and field in fields, key
    values[field] = ast.literal_eval(value)
  cfg = DataConfig(**values)
  assert cfg.mixture == name and cfg.ul2 is ul2
