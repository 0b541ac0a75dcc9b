"""Batches from data/pipeline.py: the CONTRACTS.md format, packing, determinism, resume, shards."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import attention
from openmoe_jax.config import DataConfig
from openmoe_jax.data import pipeline
from openmoe_jax.data import ul2
from openmoe_jax.data import vocab as vocab_lib

B, L = 4, 128
UL2 = DataConfig(mixture="stdlib_ul2", ul2=True, pack=True, seed=0)
LM = DataConfig(mixture="stdlib_lm", ul2=False, pack=True, seed=0)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(xs, ys):
  return len(xs) == len(ys) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


def _segments(batch):
  """Per row, per segment: dict of that segment's slices (independent of the packer's code)."""
  out = []
  for r in range(batch["decoder_segment_ids"].shape[0]):
    seg = batch["decoder_segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      out.append({k: v[r, idx] for k, v in batch.items()} | {"_idx": idx, "_row": r})
  return out


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.load_vocabulary()


@pytest.fixture(scope="module")
def ul2_batches():
  return _take(pipeline.make_iterator(UL2, "train", B, L, seed=0), 4)


def test_contract_keys_dtypes_shapes(ul2_batches):
  expected = {"decoder_input_tokens": np.int32, "decoder_target_tokens": np.int32,
              "decoder_loss_weights": np.float32, "decoder_segment_ids": np.int32,
              "decoder_positions": np.int32, "decoder_causal_attention": np.int32}
  for b in ul2_batches:
    assert {k: v.dtype.type for k, v in b.items()} == expected
    assert all(v.shape == (B, L) for v in b.values())


@pytest.fixture(scope="module")
def short_docs_config(tmp_path_factory):
  """A corpus of short documents (3-15 words), so that many examples share a row."""
  path = tmp_path_factory.mktemp("corpus") / "short.jsonl"
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "x", "1", "\n"]
  path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 16)))})
                            for _ in range(400)))
  return dataclasses.replace(UL2, mixture="text_files", text_files=(str(path),))


def test_packing_invariants_ul2(ul2_batches, short_docs_config, vocab):
  _check_packing_invariants(ul2_batches, vocab)
  short = _take(pipeline.make_iterator(short_docs_config, "train", B, L, seed=0), 3)
  n_segments = _check_packing_invariants(short, vocab)
  assert n_segments > 3 * B * 3  # several examples per row


def _check_packing_invariants(batches, vocab) -> int:
  modes = {vocab_lib.mode_token_ids(vocab, m)[0] for m in vocab_lib.MODE_TOKENS}
  n_segments = 0
  for b in batches:
    seg = b["decoder_segment_ids"]
    for r in range(B):
      real = seg[r] > 0
      # Segments are numbered 1, 2, ... left to right; padding only as a suffix.
      assert not np.any(real[1:] & ~real[:-1])
      ids = seg[r][real]
      assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
      pad = ~real
      for k in b:
        assert np.all(b[k][r][pad] == 0), k  # padding carries nothing, not even loss weight
    for s in _segments(b):
      n_segments += 1
      n = len(s["_idx"])
      assert np.array_equal(np.diff(s["_idx"]), np.ones(n - 1))  # contiguous
      np.testing.assert_array_equal(s["decoder_positions"], np.arange(n))
      tgt, inp = s["decoder_target_tokens"], s["decoder_input_tokens"]
      assert inp[0] == 0 and np.array_equal(inp[1:], tgt[:-1])  # shift within the segment
      assert tgt[0] in modes and tgt[-1] == vocab.eos_id and np.all(tgt > 0)
      # Prefix = inputs + first target position; loss exactly on the targets part.
      prefix, loss = s["decoder_causal_attention"], s["decoder_loss_weights"]
      n_prefix = int(prefix.sum())
      assert np.array_equal(prefix, (np.arange(n) < n_prefix).astype(np.int32))
      assert np.array_equal(loss, (np.arange(n) >= n_prefix - 1).astype(np.float32))
      assert 2 <= n_prefix <= n
      # The (inputs, targets) pair still reconstructs a contiguous, sentinel-free text window.
      rec = ul2.reconstruct(tgt[:n_prefix - 1], tgt[n_prefix - 1:], vocab)
      assert not vocab_lib.is_sentinel(vocab, rec).any() and len(rec) >= n - 1 - 2 * 100
  assert n_segments >= B * len(batches)
  return n_segments


def test_model_mask_on_pipeline_batches_leaks_no_target(ul2_batches):
  """The model's attention mask (`attention.sequence_mask`) over the pipeline's UL2 batches: no
  query sees another segment, and a query q that sees a later key k (a bidirectional prefix)
  never sees the target of a loss-bearing position: positions q .. k-1 carry no loss weight,
  since input k is the target of position k - 1."""
  saw_prefix = False
  for b in ul2_batches:
    seg, pre = b["decoder_segment_ids"], b["decoder_causal_attention"]
    mask_BLS = np.asarray(attention.sequence_mask(jnp.asarray(seg), jnp.asarray(pre)))
    cum_w = np.concatenate([np.zeros((B, 1)), np.cumsum(b["decoder_loss_weights"], 1)], 1)
    q, k = np.arange(L)[:, None], np.arange(L)[None, :]
    later = mask_BLS & (k > q)
    saw_prefix |= bool(later.any())
    assert not np.any(mask_BLS & (seg[:, :, None] != seg[:, None, :]))
    assert not np.any(mask_BLS & (seg[:, :, None] == 0))
    weight_between = cum_w[:, None, :L] - cum_w[:, :L, None]  # [B, q, k]: weights of q .. k-1
    assert not np.any(later & (weight_between > 0))
  assert saw_prefix  # the batches do hold bidirectional prefixes


def test_packed_equals_unpacked_content(short_docs_config):
  """Packing only moves examples around: the same example stream, row by row."""
  packed = _take(pipeline.make_iterator(short_docs_config, "train", B, L, seed=5), 2)
  unpacked_cfg = dataclasses.replace(short_docs_config, pack=False)
  unpacked = _take(pipeline.make_iterator(unpacked_cfg, "train", B, L, seed=5), 12)
  seq = lambda bs: [tuple(s["decoder_target_tokens"]) + tuple(s["decoder_causal_attention"])
                    for b in bs for s in _segments(b)]
  p, u = seq(packed), seq(unpacked)
  for b in unpacked:
    assert b["decoder_segment_ids"].max() == 1  # one example per row
  n = min(len(p), len(u))
  assert len(p) > 2 * B * 2 and n >= 24 and p[:n] == u[:n]


def test_plain_lm_batches(vocab):
  b = next(pipeline.make_iterator(LM, "train", B, L, seed=0))
  real = b["decoder_segment_ids"] > 0
  np.testing.assert_array_equal(b["decoder_loss_weights"], real.astype(np.float32))
  assert not b["decoder_causal_attention"].any()
  assert real.mean() > 0.9  # chunks of whole documents pack densely
  text = pipeline.decode(LM, b["decoder_target_tokens"][0])
  assert len(text) > 50 and "<extra_id" not in text


def test_determinism_and_seed_dependence():
  a = _take(pipeline.make_iterator(UL2, "train", B, L, seed=1), 3)
  b = _take(pipeline.make_iterator(UL2, "train", B, L, seed=1), 3)
  c = _take(pipeline.make_iterator(UL2, "train", B, L, seed=2), 3)
  assert _same(a, b) and not _same(a, c)


def test_checkpoint_restore_continues_identically():
  it = pipeline.make_iterator(UL2, "train", B, L, seed=3)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  expected = _take(it, 4)
  fresh = pipeline.make_iterator(UL2, "train", B, L, seed=3)
  fresh.set_state(state)
  assert _same(_take(fresh, 4), expected)
  it.set_state(state)  # restoring the same iterator works too
  assert _same(_take(it, 4), expected)
  other = pipeline.make_iterator(UL2, "train", B, L, seed=4)
  with pytest.raises(ValueError, match="different data configuration"):
    other.set_state(state)


def _chunks(cfg, split, shard, num_shards):
  ds = pipeline.get_dataset(cfg, split, L, seed=0, shard_index=shard, num_shards=num_shards,
                            num_epochs=1)
  return [tuple(x["targets"].tolist()) for x in ds.as_numpy_iterator()]


def test_host_shards_are_disjoint_and_cover_the_split():
  full = _chunks(LM, "validation", 0, 1)
  s0, s1 = _chunks(LM, "validation", 0, 2), _chunks(LM, "validation", 1, 2)
  assert s0 and s1 and not set(s0) & set(s1)
  assert sorted(s0 + s1) == sorted(full)
  # Training shards too, although each host shuffles with its own seed: the documents are
  # permuted the same way on every host before seqio shards them.
  # (As multisets: short chunks such as a lone EOS recur across documents.)
  t0, t1 = _chunks(LM, "train", 0, 2), _chunks(LM, "train", 1, 2)
  assert t0 and t1 and sorted(t0 + t1) == sorted(_chunks(LM, "train", 0, 1))


def test_each_host_draws_its_own_denoisers():
  """Example k of host 0 and of host 1 come from different documents, and each host draws its
  own denoiser, window and mask for it: with one seed for all hosts, every host drew the same
  denoiser at the same index (the global batch held copies of one host's draws)."""
  vocab = pipeline.get_vocabulary(UL2)
  modes = {vocab_lib.mode_token_ids(vocab, m)[0]: m for m in vocab_lib.MODE_TOKENS}

  def draws(shard, n=120):
    ds = pipeline.get_dataset(UL2, "train", L, seed=0, shard_index=shard, num_shards=2)
    return [(modes[int(x["inputs"][0])], len(x["inputs"]))
            for x in ds.take(n).as_numpy_iterator()]

  a, b = draws(0), draws(1)
  same_mode = sum(x[0] == y[0] for x, y in zip(a, b)) / len(a)
  # Independent draws at rates S 1/2, R 1/6, X 1/3 agree with probability 7/18 ~ 0.39.
  assert 0.2 < same_mode < 0.6, same_mode
  assert sum(x == y for x, y in zip(a, b)) < len(a) / 2
  with pytest.raises(ValueError, match="DataConfig.seed"):
    pipeline.get_dataset(UL2, "train", L, seed=1 << 24)


def test_validation_split_is_finite_padded_and_disjoint_from_train():
  it = pipeline.make_iterator(LM, "validation", 8, L, seed=0, num_epochs=1)
  batches = list(it)
  endless = _take(pipeline.make_iterator(LM, "validation", 8, L, seed=0), len(batches) + 2)
  assert _same(endless[:len(batches) - 1], batches[:-1])  # default: repeats, same order
  assert batches and all(b["decoder_target_tokens"].shape == (8, L) for b in batches)
  assert it.get_state()["exhausted"]
  val = {tuple(s["decoder_target_tokens"]) for b in batches for s in _segments(b)}
  train = set(_chunks(LM, "train", 0, 1))
  assert len(val) > 10 and not val & train


def test_vocab_size_matches_tokens():
  assert pipeline.vocab_size(UL2) == 2048


def test_text_files_and_bad_inputs(tmp_path):
  good = tmp_path / "a.jsonl"
  good.write_text("\n".join(json.dumps({"text": f"hello world number {i} " * 20})
                            for i in range(30)))
  cfg = dataclasses.replace(UL2, mixture="text_files", text_files=(str(good),))
  b = next(pipeline.make_iterator(cfg, "train", 2, 64, seed=0))
  assert b["decoder_loss_weights"].sum() > 0
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nbroken \xff\xfe line\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: .*UTF-8"):
    pipeline.make_iterator(dataclasses.replace(cfg, text_files=(str(bad),)), "train", 2, 64, 0)
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    pipeline.make_iterator(dataclasses.replace(cfg, text_files=(str(empty),)), "train", 2, 64, 0)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    pipeline.make_iterator(dataclasses.replace(UL2, vocab_path=str(tmp_path / "missing.model")),
                           "train", 2, 64, 0)
  with pytest.raises(ValueError, match="Unknown data mixture"):
    pipeline.make_iterator(dataclasses.replace(UL2, mixture="nope"), "train", 2, 64, 0)
  # The text-file mixtures registered above stay in seqio's registry for this process; a
  # config without files (or without a data_dir for c4) still fails instead of reading them.
  for mixture, field in (("text_files", "DataConfig.text_files"), ("c4", "DataConfig.data_dir")):
    with pytest.raises(ValueError, match=field):
      pipeline.make_iterator(dataclasses.replace(UL2, mixture=mixture), "train", 2, 64, 0)
  with pytest.raises(ValueError, match="disagrees"):
    pipeline.make_iterator(dataclasses.replace(UL2, ul2=False), "train", 2, 64, 0)
  with pytest.raises(ValueError, match="split"):
    pipeline.make_iterator(UL2, "test", 2, 64, 0)
