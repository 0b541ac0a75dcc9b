"""Copy a checkpoint directory (gs:// or any fsspec path) to a local or another GCS directory.

Parallel (one thread per file, `jobs` at a time), resumable (a local file in progress is kept as
`<name>.partial` and continued with ranged reads after an interruption; finished files are
skipped after re-verification), verified (size, and the MD5 of GCS object metadata when the
source provides one), with a byte progress bar. `params_only` fetches the msgpack `checkpoint`
file and the `target.*` parameter arrays and skips the optimizer state (`state.param_states.*`).
`gs://` uses gcsfs's plain JSON-API filesystem, which honours STORAGE_EMULATOR_HOST (tests).
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from typing import Any, Callable

import fsspec
from tqdm import tqdm

# Released OpenMoE T5X checkpoints (github.com/XueFuzhao/OpenMoE README, "Model Weights" table).
# params: the README's "#Param" / ours from presets.count_params. The README publishes no download
# sizes: est_gb is ours, float32 parameters (T5X's default save dtype) before zarr gzip, without
# the optimizer state; the real total is printed from the bucket listing before anything copies.
RELEASED: dict[str, dict[str, Any]] = {
    "openmoe-base": {"path": "gs://openmoe/openmoe-base/checkpoint_500000",
                     "params": "637M (README) / 800M (ours)", "est_gb": 3.2},
    "openllama-base": {"path": "gs://openmoe/openllama-base/checkpoint_500000",
                       "params": "310M (README) / 498M (ours)", "est_gb": 2.0},
    "openmoe-8b": {"path": "gs://openmoe/openmoe-8b/checkpoint_100000",
                   "params": "8B (README) / 11.9B (ours)", "est_gb": 47.4},
}
MANIFEST = "download_manifest.json"
PARTIAL = ".partial"


class DownloadError(RuntimeError):
  """A file could not be fetched or failed verification."""


class Interrupted(RuntimeError):
  """The copy was stopped before completion; run again to resume."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  rel: str  # path relative to the checkpoint directory, "/"-separated
  size: int  # bytes
  md5: str | None  # base64 MD5 from object metadata (GCS), None if the source has none


def filesystem(path: str, token: Any = None, project: str | None = None,
               requester_pays: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
  """(filesystem, root path inside it) for a gs:// URL or any fsspec path."""
  if path.startswith("gs://"):
    from gcsfs.core import GCSFileSystem  # pylint: disable=import-outside-toplevel
    fs = GCSFileSystem(token=token, project=project, requester_pays=requester_pays,
                       skip_instance_cache=True)
    return fs, path[len("gs://"):].rstrip("/")
  fs, root = fsspec.core.url_to_fs(path)
  return fs, root.rstrip("/")


def is_param_file(rel: str) -> bool:
  """True for the msgpack tree and parameter arrays; False for optimizer state and the rest."""
  return rel == "checkpoint" or rel.split("/")[0].startswith("target.")


def list_files(fs: fsspec.AbstractFileSystem, root: str, params_only: bool) -> list[RemoteFile]:
  entries = fs.find(root, detail=True)
  if not entries:
    raise FileNotFoundError(f"no files under {root!r}")
  files = []
  for name, info in sorted(entries.items()):
    rel = name[len(root):].lstrip("/")
    if params_only and not is_param_file(rel):
      continue
    files.append(RemoteFile(rel, int(info["size"]), info.get("md5Hash")))
  if not any(f.rel == "checkpoint" for f in files):
    raise FileNotFoundError(f"{root!r} has no 'checkpoint' file: not a T5X checkpoint_N dir")
  return files


def _md5(fs: fsspec.AbstractFileSystem, path: str) -> str:
  digest = hashlib.md5()
  with fs.open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return base64.b64encode(digest.digest()).decode()


def _verified(fs: fsspec.AbstractFileSystem, path: str, remote: RemoteFile) -> bool:
  return (fs.exists(path) and fs.size(path) == remote.size
          and (remote.md5 is None or _md5(fs, path) == remote.md5))


def download(src: str, dst: str, *, jobs: int = 8, params_only: bool = False,
             chunk_bytes: int = 8 << 20, progress: bool = True, token: Any = None,
             project: str | None = None, requester_pays: bool = False,
             on_chunk: Callable[[str, int], None] | None = None) -> dict[str, Any]:
  """Copies checkpoint directory `src` to `dst`; returns {"fetched_bytes", "skipped", "resumed"}.

  `on_chunk(rel, n_bytes)` is called after every written chunk; an exception from it stops all
  workers as an interruption would (tests use it to cut a download half-way).
  """
  if jobs < 1 or chunk_bytes < 1:
    raise ValueError(f"jobs={jobs}, chunk_bytes={chunk_bytes}; expected positive values")
  src_fs, src_root = filesystem(src, token, project, requester_pays)
  dst_fs, dst_root = filesystem(dst, token, project, requester_pays)
  local = "file" in (dst_fs.protocol if isinstance(dst_fs.protocol, tuple) else (dst_fs.protocol,))
  files = list_files(src_fs, src_root, params_only)
  total = sum(f.size for f in files)
  dst_fs.makedirs(dst_root, exist_ok=True)
  with dst_fs.open(f"{dst_root}/{MANIFEST}", "w") as f:
    json.dump({"source": src, "params_only": params_only, "total_bytes": total,
               "files": [dataclasses.asdict(x) for x in files]}, f, indent=1)
  stop, lock = threading.Event(), threading.Lock()
  stats: dict[str, Any] = {"fetched_bytes": 0, "skipped": [], "resumed": {}, "total_bytes": total}
  bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="download")

  def fetch(remote: RemoteFile) -> None:
    final = f"{dst_root}/{remote.rel}"
    part = final + PARTIAL
    if _verified(dst_fs, final, remote):
      with lock:
        stats["skipped"].append(remote.rel)
      bar.update(remote.size)
      return
    dst_fs.makedirs(os.path.dirname(final), exist_ok=True)
    offset = dst_fs.size(part) if local and dst_fs.exists(part) else 0
    if offset > remote.size:
      offset = 0
    if offset:
      with lock:
        stats["resumed"][remote.rel] = offset
    bar.update(offset)
    with dst_fs.open(part, "ab" if offset else "wb") as out:
      while offset < remote.size:
        if stop.is_set():
          raise Interrupted(f"stopped while copying {remote.rel}")
        end = min(offset + chunk_bytes, remote.size)
        data = src_fs.cat_file(f"{src_root}/{remote.rel}", start=offset, end=end)
        if len(data) != end - offset:
          raise DownloadError(f"{remote.rel}: asked bytes {offset}..{end}, got {len(data)}")
        out.write(data)
        out.flush()
        offset = end
        with lock:
          stats["fetched_bytes"] += len(data)
        bar.update(len(data))
        if on_chunk is not None:
          on_chunk(remote.rel, len(data))
    if not _verified(dst_fs, part, remote):
      dst_fs.rm(part)
      raise DownloadError(f"{remote.rel}: verification failed (expected {remote.size} bytes, "
                          f"md5 {remote.md5}); the partial copy was removed, run again")
    dst_fs.mv(part, final)

  def guarded(remote: RemoteFile) -> None:
    try:
      fetch(remote)
    except BaseException:
      stop.set()
      raise

  errors = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    for fut in [pool.submit(guarded, f) for f in files]:
      if fut.exception() is not None:
        errors.append(fut.exception())
  bar.close()
  if errors:  # report the root cause, not the Interrupted of the workers it stopped
    raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
  return stats
