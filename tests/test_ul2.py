"""UL2 denoisers: noise statistics, denoiser mixture rates, prefix-LM splits, round trips."""
import collections

import numpy as np
import pytest
import seqio
import tensorflow as tf

from openmoe_jax.data import ul2
from openmoe_jax.data import vocab as vocab_lib


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.load_vocabulary()


def _seeds(n, base=0):
  return [tf.constant([base, i], tf.int64) for i in range(n)]


def _runs(mask):
  """Lengths of consecutive runs of True/False: [(value, length), ...] (independent reference)."""
  out = []
  for m in mask:
    if out and out[-1][0] == m:
      out[-1][1] += 1
    else:
      out.append([m, 1])
  return out


@pytest.mark.parametrize("density,mean_span", [(0.15, 3), (0.15, 8), (0.5, 3), (0.5, 8),
                                               (0.15, 64), (0.5, 64)])
def test_noise_mask_statistics(density, mean_span):
  # Long enough for several spans even at mean span 64 (shorter windows get fewer, longer ones).
  length, n = max(229, 20 * mean_span), 150
  fn = tf.function(lambda s: ul2.random_spans_noise_mask(length, density, mean_span, s))
  noise, spans, span_lens = 0, 0, []
  for seed in _seeds(n):
    mask = fn(seed).numpy()
    assert mask.shape == (length,)
    runs = _runs(mask.tolist())
    assert runs[0][0] is False and runs[-1][0] is True  # T5 layout: non-noise first
    noise += mask.sum()
    span_lens += [l for v, l in runs if v]
    spans += sum(1 for v, _ in runs if v)
  # Exact counts follow T5's rounding: round(L * density) noise tokens, round(noise / mu) spans.
  exp_noise = round(length * density)
  exp_spans = max(1, round(exp_noise / mean_span))
  assert noise == n * exp_noise
  assert spans == n * exp_spans
  assert abs(noise / (n * length) - density) < 0.01
  assert np.mean(span_lens) == exp_noise / exp_spans
  assert abs(np.mean(span_lens) - mean_span) / mean_span < 0.12  # rounding of span counts
  if exp_spans > 1:
    assert np.std(span_lens) > 0  # spans really are random, not all equal


def test_span_corruption_hand_example():
  tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17], tf.int32)
  mask = tf.constant([0, 1, 1, 0, 0, 1, 0, 1]) > 0
  inputs, targets = ul2.span_corruption(tokens, mask, vocab_size=100)
  assert inputs.numpy().tolist() == [10, 99, 13, 14, 98, 16, 97]
  assert targets.numpy().tolist() == [99, 11, 12, 98, 15, 97, 17]


def _denoise_many(vocab, n, total_len=256, tokens_len=300, base=0):
  budget = total_len - 1
  mode_ids = {m: vocab_lib.mode_token_ids(vocab, m) for m in vocab_lib.MODE_TOKENS}
  lengths = [ul2.raw_length(d, budget, 1, vocab.extra_ids) for d in ul2.DEFAULT_DENOISERS]
  tokens = tf.range(10, 10 + tokens_len, dtype=tf.int32)
  fn = tf.function(lambda s: ul2.denoise_example(tokens, s, ul2.DEFAULT_DENOISERS,
                                                 vocab.vocab_size, mode_ids, lengths,
                                                 vocab.extra_ids))
  return [{k: v.numpy() for k, v in fn(s).items()} for s in _seeds(n, base)], lengths, mode_ids


def test_mixture_rates_modes_round_trip_and_budget(vocab):
  n = 1500
  outs, lengths, mode_ids = _denoise_many(vocab, n)
  denoisers = ul2.DEFAULT_DENOISERS
  counts = collections.Counter(int(o["denoiser"]) for o in outs)
  for i, d in enumerate(denoisers):
    expected = d.rate / sum(x.rate for x in denoisers)
    assert abs(counts[i] / n - expected) < 0.04, (d, counts[i] / n)
  noise_frac = collections.defaultdict(list)
  for o in outs:
    d = denoisers[int(o["denoiser"])]
    inputs, targets = o["inputs"], o["targets"]
    assert tuple(inputs[:1]) == mode_ids[d.mode]  # the mode token opens the inputs
    assert len(inputs) + len(targets) <= 255
    rec = ul2.reconstruct(inputs, targets, vocab)
    # The original tokens were 10, 11, ...: the reconstruction must be a contiguous window of
    # exactly the denoiser's raw length.
    assert len(rec) == lengths[int(o["denoiser"])]
    np.testing.assert_array_equal(rec, np.arange(rec[0], rec[0] + len(rec)))
    assert 10 <= rec[0] and rec[-1] < 310
    if d.mean_span:
      n_sent = int(vocab_lib.is_sentinel(vocab, targets).sum())
      noise_frac[(d.mean_span, d.noise_density)].append((len(targets) - n_sent) / len(rec))
    else:
      assert not vocab_lib.is_sentinel(vocab, targets).any()
  for (mu, density), fracs in noise_frac.items():
    assert abs(np.mean(fracs) - density) < 0.01, (mu, density, np.mean(fracs))


def test_prefix_lm_split_is_uniform(vocab):
  outs, lengths, _ = _denoise_many(vocab, 1200, base=7)
  n_s = lengths[0]
  fracs = [(len(o["inputs"]) - 1) / n_s for o in outs if o["denoiser"] == 0]
  assert len(fracs) > 450
  assert min(fracs) * n_s >= 1 and max(fracs) * n_s <= n_s - 1
  hist = np.histogram(fracs, bins=4, range=(0, 1))[0] / len(fracs)
  np.testing.assert_allclose(hist, 0.25, atol=0.06)


def test_raw_length_is_the_longest_that_fits():
  for d in ul2.DEFAULT_DENOISERS:
    for budget in (63, 255, 1023):
      n = ul2.raw_length(d, budget, 1, 100)

      def total(m):
        spans = 0 if d.mean_span == 0 else ul2.noise_counts(m, d.noise_density, d.mean_span,
                                                            100)[1]
        return 1 + m + 2 * spans

      assert total(n) <= budget and total(n + 1) > budget


def test_graph_noise_counts_equal_the_budgeted_ones():
  """The noise the graph applies is the noise `raw_length` budgets for, at every length: a
  float32 graph gave one more span than budgeted at lengths such as 30, 190 and 350 (0.15 is
  above 0.15 in float32), and the example overflowed the sequence."""
  lengths = np.arange(3, 4097, dtype=np.int32)
  graph_counts = ul2._counts_tf  # pylint: disable=protected-access
  for d in ul2.DEFAULT_DENOISERS:
    if d.mean_span == 0:
      continue
    noise, spans = graph_counts(tf.constant(lengths), d.noise_density, d.mean_span, 100)
    want = np.array([ul2.noise_counts(int(n), d.noise_density, d.mean_span, 100)
                     for n in lengths])
    np.testing.assert_array_equal(np.stack([noise.numpy(), spans.numpy()], 1), want, str(d))


def test_span_counts_capped_by_the_sentinels_are_reported():
  """100 sentinels cap the span count: at seq_len 2048 X(3, 0.5) and X(8, 0.5) would want 308
  and 115 spans; the pipeline says so (they become one denoiser of ~9-token spans)."""
  lengths = {b: [ul2.raw_length(d, b, 1, 100) for d in ul2.DEFAULT_DENOISERS]
             for b in (255, 2047)}
  assert ul2.capped_spans(ul2.DEFAULT_DENOISERS, lengths[255], 100) == []
  capped = ul2.capped_spans(ul2.DEFAULT_DENOISERS, lengths[2047], 100)
  assert len(capped) == 2 and all(line.startswith("X(mean span ") for line in capped)
  for line, d in zip(capped, ul2.DEFAULT_DENOISERS[3:5]):
    n = lengths[2047][ul2.DEFAULT_DENOISERS.index(d)]
    noise, spans = ul2.noise_counts(n, d.noise_density, d.mean_span, 100)
    assert spans == 100 and f"mean span {noise / 100:.1f} instead" in line
    assert f"wants {round(noise / d.mean_span)} spans" in line


def test_denoising_is_deterministic_per_seed(vocab):
  a, _, _ = _denoise_many(vocab, 20, base=3)
  b, _, _ = _denoise_many(vocab, 20, base=3)
  c, _, _ = _denoise_many(vocab, 20, base=4)
  same = lambda x, y: all(np.array_equal(p[k], q[k]) for p, q in zip(x, y) for k in p)
  assert same(a, b) and not same(a, c)


def test_split_tokens_chunks_cover_the_document():
  ds = tf.data.Dataset.from_tensor_slices(
      {"targets": tf.ragged.constant([list(range(1, 24)), [5, 6], list(range(100, 110))])})
  chunks = [x["targets"].tolist() for x in ul2.split_tokens(ds, {"targets": 8})
            .as_numpy_iterator()]
  assert all(0 < len(c) <= 8 for c in chunks)
  assert sum(chunks, []) == list(range(1, 24)) + [5, 6] + list(range(100, 110))


def test_ul2_preprocessor_is_seqio_compatible(vocab):
  """Runs under seqio's seed manager: same seed, same examples."""
  ds = tf.data.Dataset.from_tensors({"targets": tf.range(10, 400, dtype=tf.int32)}).repeat(8)
  feats = {"targets": seqio.Feature(vocab), "inputs": seqio.Feature(vocab)}

  def run(seed):
    with seqio.utils.map_seed_manager(seed):
      out = ul2.ul2_denoise(ds, {"inputs": 128, "targets": 128}, feats)
    return [(x["inputs"].tolist(), x["targets"].tolist()) for x in out.as_numpy_iterator()]

  assert run(1) == run(1) and run(1) != run(2)


def test_reconstruct_rejects_malformed_pairs(vocab):
  s0, s1 = vocab_lib.sentinel_id(vocab, 0), vocab_lib.sentinel_id(vocab, 1)
  with pytest.raises(ValueError, match="no span"):
    ul2.reconstruct([3, 10, s0, 11, s1], [s0, 12], vocab)
  with pytest.raises(ValueError, match="start with a sentinel"):
    ul2.reconstruct([3, 10, s0], [12, s0, 13], vocab)


def test_bad_denoiser_config():
  with pytest.raises(ValueError, match="mode"):
    ul2.Denoiser("R", "[XYZ]", 3.0, 0.15, 1.0)
  with pytest.raises(ValueError, match="noise_density"):
    ul2.Denoiser("R", "[NLU]", 3.0, 1.5, 1.0)
