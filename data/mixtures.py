"""seqio Mixtures over the tasks of tasks.py, and the one entry that (re)registers everything.

Mixture names: "stdlib_ul2" / "stdlib_lm" (default, embedded corpus), "text_files_ul2/_lm",
"c4_ul2/_lm", "the_stack_ul2/_lm", and "c4_the_stack_ul2/_lm" (OpenMoE mixed web text and
code; we mix them 50/50 by examples).
"""
from __future__ import annotations

from typing import Sequence

import seqio

from openmoe_jax.data import tasks as tasks_lib

_registered: dict[str, tuple] = {}  # last registration arguments per source group


def _add_mixture(name: str, tasks_and_rates: list[tuple[str, float]]) -> str:
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add_provider(name, seqio.Mixture(name, tasks_and_rates))
  return name


def register(vocab_path: str | None = None, data_dir: str | None = None,
             text_files: Sequence[str] = ()) -> list[str]:
  """(Re)register the tasks and mixtures for these sources; a repeated call is a no-op.

  Returns the registered mixture names.
  """
  groups = {"stdlib": (vocab_path,)}
  if text_files:
    groups["text_files"] = (vocab_path, tuple(text_files))
  if data_dir:
    groups["tfds"] = (vocab_path, data_dir)
  names = []
  for group, key in groups.items():
    if _registered.get(group) != key:
      if group == "stdlib":
        tasks_lib.register_stdlib(vocab_path)
      elif group == "text_files":
        tasks_lib.register_text_files(text_files, vocab_path)
      else:
        tasks_lib.register_tfds(data_dir, vocab_path)
      corpora = {"stdlib": [("stdlib", tasks_lib.STDLIB)],
                 "text_files": [("text_files", tasks_lib.TEXT_FILES)],
                 "tfds": [(c, c) for c in tasks_lib.TFDS_DATASETS]}[group]
      for ul2 in (True, False):
        suffix = "ul2" if ul2 else "lm"
        for mixture, corpus in corpora:
          _add_mixture(f"{mixture}_{suffix}", [(tasks_lib.task_name(corpus, ul2), 1.0)])
        if group == "tfds":
          _add_mixture(f"c4_the_stack_{suffix}",
                       [(tasks_lib.task_name(c, ul2), 0.5) for c in tasks_lib.TFDS_DATASETS])
      _registered[group] = key
    names += [n for n in seqio.MixtureRegistry.names()
              if n.startswith({"stdlib": "stdlib_", "text_files": "text_files_",
                               "tfds": ("c4_", "the_stack_")}[group])]
  return sorted(set(names))
