"""Gin registration: the config dataclasses and the entry functions, under plain names.

Gin binds only dataclass fields of `openmoe_jax.config` and the arguments of entry functions
(`train.run`); nothing else in the library is gin-configurable.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import gin

from openmoe_jax import config

_CONFIGS = (config.ModelConfig, config.MoeConfig, config.DataConfig, config.OptimConfig,
            config.MeshConfig, config.TrainConfig, config.SwitchHeadConfig, config.UmoeConfig)
_registered = False
CONFIGURED: dict[str, object] = {}  # name -> the gin-wrapped callable (applies the bindings)

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def _guard_resource_reader() -> None:
  """gin's package-resource reader raises TypeError when an include's folder is importable as a
  namespace package (e.g. `include 'runs/x.gin'` with a `runs/` folder, as the main job writes,
  in the working directory): make its existence check answer "not here" instead."""
  from gin import config as gin_config  # pylint: disable=import-outside-toplevel
  readers = getattr(gin_config, "_FILE_READERS", None)
  if not isinstance(readers, list):
    return
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "_openmoe_guarded", False) or exists is os.path.isfile:
      continue

    def guarded(path: str, _exists=exists) -> bool:
      try:
        return bool(_exists(path))
      except TypeError:
        return False
    guarded._openmoe_guarded = True  # type: ignore[attr-defined]
    readers[i] = (reader, guarded)


def register() -> None:
  """Registers configurables once per process (idempotent)."""
  global _registered
  if _registered:
    return
  _guard_resource_reader()
  for cls in _CONFIGS:
    CONFIGURED[cls.__name__] = gin.external_configurable(cls, cls.__name__)
  from openmoe_jax import train  # pylint: disable=import-outside-toplevel
  CONFIGURED["run"] = gin.external_configurable(train.run, "run")
  _registered = True


def configured(name: str):
  """The gin-configured version of a registered callable ("run", "ModelConfig", ...)."""
  register()
  return CONFIGURED[name]


def parse(files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> None:
  """Parses gin files and bindings, then finalizes; a bad binding raises one clear error."""
  register()
  for path in (*search_paths, REPO_GIN_DIR, os.getcwd()):
    gin.add_config_file_search_path(path)
  for f in files:
    if not os.path.exists(f) and not any(
        os.path.exists(os.path.join(p, f)) for p in (*search_paths, REPO_GIN_DIR)):
      raise FileNotFoundError(f"gin file not found: {f}")
  # gin logs an ERROR for every search-path miss before it finds an include; hide those.
  root = logging.getLogger()
  quiet = _DropGinPathMisses()
  root.addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=True)
  except (ValueError, KeyError, SyntaxError) as e:  # gin reports unknown names this way
    raise ValueError(f"bad gin configuration: {e}") from e
  finally:
    root.removeFilter(quiet)


class _DropGinPathMisses(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith("Path not found:")


def operative_config() -> str:
  return gin.operative_config_str()


def clear() -> None:
  """Forgets parsed bindings (tests parse several files in one process)."""
  gin.clear_config(clear_constants=True)
