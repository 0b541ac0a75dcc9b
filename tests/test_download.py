"""gs:// download against a real GCS emulator on loopback: the synthetic OpenMoE T5X checkpoint is
uploaded, fetched (parameters only), converted, loaded and fine-tuned; an interrupted download
resumes fetching only what is missing; a corrupted local copy is detected and fetched again."""
import base64
import hashlib
import os
import socket

import numpy as np
import pytest

from openmoe_jax import download, train
from openmoe_jax.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from openmoe_jax.convert import openmoe
from test_convert_openmoe import (MODEL, STEP, assert_model_matches_reference, raw_params,
                                  write_t5x_checkpoint)

BUCKET = "openmoe-test"
SRC = f"gs://{BUCKET}/openmoe-base/checkpoint_{STEP}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A gcp-storage-emulator on 127.0.0.1 holding the synthetic checkpoint; yields its params."""
  from gcp_storage_emulator.server import create_server
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  try:
    params = raw_params()
    local = write_t5x_checkpoint(str(tmp_path_factory.mktemp("upload")), params)
    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)
    for root, _, names in os.walk(local):
      for name in names:
        rel = os.path.relpath(os.path.join(root, name), local)
        bucket.blob(f"openmoe-base/checkpoint_{STEP}/{rel}").upload_from_filename(
            os.path.join(root, name))
    yield params, local
  finally:
    server.stop()
    if old is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old


def _md5(path):
  return base64.b64encode(hashlib.md5(open(path, "rb").read()).digest()).decode()


def _tree(directory, skip=(download.MANIFEST,)):
  return {os.path.relpath(os.path.join(r, n), directory): _md5(os.path.join(r, n))
          for r, _, ns in os.walk(directory) for n in ns if n not in skip}


def test_download_params_only_convert_load_and_finetune(gcs, tmp_path):
  params, local = gcs
  dst = str(tmp_path / "ckpt")
  stats = download.download(SRC, dst, jobs=4, params_only=True, progress=False, token="anon")
  got, source = _tree(dst), _tree(local)
  assert got == {k: v for k, v in source.items() if download.is_param_file(k.replace(os.sep, "/"))}
  assert not any(k.startswith("state.") for k in got) and any(k.startswith("state.") for k in source)
  assert stats["fetched_bytes"] == stats["total_bytes"] == sum(
      os.path.getsize(os.path.join(dst, k)) for k in got)

  train_cfg = TrainConfig(steps=1, batch_size=8, seq_len=16, eval_every=0, eval_batches=1,
                          checkpoint_every=0, sample_tokens=0)
  optim, data = OptimConfig(learning_rate=1e-4, warmup_steps=0), DataConfig()
  work, cfg = openmoe.convert(dst, str(tmp_path / "work"), MODEL, optim=optim, data=data,
                              train=train_cfg)
  assert_model_matches_reference(work, params)
  result = train.run(work, model=cfg, data=data, optim=optim, train=train_cfg,
                     mesh=MeshConfig(num_devices=2), progress=False)
  assert result["step"] == 1 and np.isfinite(result["train"]["loss"])
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["0", "1"]


def test_interrupted_download_resumes_only_missing_bytes(gcs, tmp_path):
  _, local = gcs
  dst = str(tmp_path / "ckpt")
  chunks = []

  def cut(rel, n):
    chunks.append(n)
    if len(chunks) == 12:
      raise KeyboardInterrupt("simulated kill")

  with pytest.raises(KeyboardInterrupt):
    download.download(SRC, dst, jobs=2, chunk_bytes=4096, progress=False, token="anon",
                      on_chunk=cut)
  done = {k for k in _tree(dst) if not k.endswith(download.PARTIAL)}
  partial = {k[:-len(download.PARTIAL)]: os.path.getsize(os.path.join(dst, k))
             for k in _tree(dst) if k.endswith(download.PARTIAL)}
  assert partial and len(done) < len(_tree(local))
  stats = download.download(SRC, dst, jobs=2, chunk_bytes=4096, progress=False, token="anon")
  assert _tree(dst) == _tree(local)
  assert set(stats["skipped"]) == {k.replace(os.sep, "/") for k in done}
  assert stats["resumed"] == {k.replace(os.sep, "/"): v for k, v in partial.items() if v}
  assert stats["fetched_bytes"] == stats["total_bytes"] - sum(
      os.path.getsize(os.path.join(local, k)) for k in done) - sum(partial.values())


def test_corrupted_local_copy_is_detected_and_fetched_again(gcs, tmp_path):
  _, local = gcs
  dst = str(tmp_path / "ckpt")
  download.download(SRC, dst, params_only=True, progress=False, token="anon")
  victim = os.path.join(dst, "target.decoder.layers_1.mlp.expert.wi_0.kernel", "0.0.0")
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.write(b"\0" * 16)  # same size, different bytes: only the checksum can tell
  assert os.path.getsize(victim) == size
  stats = download.download(SRC, dst, params_only=True, progress=False, token="anon")
  rel = os.path.relpath(victim, dst).replace(os.sep, "/")
  assert rel not in stats["skipped"] and stats["fetched_bytes"] == size
  assert _md5(victim) == _md5(os.path.join(local, rel))
