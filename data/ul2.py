"""UL2 mixture of denoisers as seqio preprocessors (pure TF, stateless-seeded, deterministic).

Denoisers (Tay et al. 2022, "UL2", Sec. 3.1.2; OpenMoE's pre-training objective):
  S  prefix LM: split uniformly at k in [1, n-1]; inputs = [S2S] + x[:k], targets = x[k:].
  R  regular span corruption, [NLU]: (mean span 3, noise 0.15), (mean span 8, noise 0.15).
  X  extreme span corruption, [NLG]: (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5).
Rates: OpenMoE trains with 50% prefix LM (S); the remaining 50% is split evenly over the six
span-corruption configurations (1/12 each, so R = 1/6 and X = 1/3 of all examples), as the
UL2 reference `ul2_objective` does when no per-denoiser rates are given.

Span corruption follows T5: the noise mask alternates non-noise / noise spans, starting with
non-noise; each noise span is replaced by one sentinel in the inputs, and the targets are
"sentinel, span tokens" per noise span. Sentinel k = vocab_size - 1 - k (seqio extra ids).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from openmoe_jax.data import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser. mean_span == 0 means prefix LM (S-denoiser)."""
  name: str            # "S", "R" or "X" (for logs)
  mode: str            # the mode token prepended to the inputs
  mean_span: float     # mean noise-span length in tokens; 0 for prefix LM
  noise_density: float  # fraction of tokens corrupted; unused for prefix LM
  rate: float          # relative sampling weight

  def __post_init__(self):
    if self.mode not in vocab_lib.MODE_TOKENS:
      raise ValueError(f"mode={self.mode!r}; expected one of {vocab_lib.MODE_TOKENS}.")
    if self.mean_span < 0 or not 0 <= self.noise_density < 1 or self.rate < 0:
      raise ValueError(f"bad denoiser {self}: need mean_span >= 0, 0 <= noise_density < 1, "
                       "rate >= 0.")
    if self.mean_span > 0 and self.noise_density <= 0:
      raise ValueError(f"span corruption needs noise_density > 0, got {self}.")


_X_RATE = _R_RATE = 0.5 / 6
DEFAULT_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("S", "[S2S]", 0.0, 0.0, 0.5),
    Denoiser("R", "[NLU]", 3.0, 0.15, _R_RATE),
    Denoiser("R", "[NLU]", 8.0, 0.15, _R_RATE),
    Denoiser("X", "[NLG]", 3.0, 0.5, _X_RATE),
    Denoiser("X", "[NLG]", 8.0, 0.5, _X_RATE),
    Denoiser("X", "[NLG]", 64.0, 0.15, _X_RATE),
    Denoiser("X", "[NLG]", 64.0, 0.5, _X_RATE),
)


def noise_counts(length: int, noise_density: float, mean_span: float,
                 max_spans: int) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a sequence of `length` tokens (T5's rounding)."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise, max_spans)


def raw_length(d: Denoiser, budget: int, mode_len: int, max_spans: int) -> int:
  """Longest raw chunk n whose denoised inputs + targets fit in `budget` tokens."""
  n = budget - mode_len
  while n > 2:
    extra = 0 if d.mean_span == 0 else 2 * noise_counts(n, d.noise_density, d.mean_span,
                                                         max_spans)[1]
    if mode_len + n + extra <= budget:
      return n
    n -= 1
  raise ValueError(f"sequence budget {budget} is too short for denoiser {d}.")


def capped_spans(denoisers: Sequence[Denoiser], lengths: Sequence[int],
                 max_spans: int) -> list[str]:
  """One line per span-corruption denoiser whose window of lengths[i] tokens needs more noise
  spans than the vocabulary has sentinels: its spans are capped at `max_spans`, so they get
  longer than its mean span (at seq_len 2048 with 100 sentinels, X(3, 0.5) and X(8, 0.5)
  both end up near 9-10 tokens)."""
  out = []
  for d, n in zip(denoisers, lengths):
    if d.mean_span == 0:
      continue
    num_noise, _ = noise_counts(n, d.noise_density, d.mean_span, max_spans)
    wanted = max(int(round(num_noise / d.mean_span)), 1)
    if wanted > max_spans:
      out.append(f"{d.name}(mean span {d.mean_span:g}, noise {d.noise_density:g}) on "
                 f"{n}-token windows wants {wanted} spans, the vocabulary has {max_spans} "
                 f"sentinels: mean span {num_noise / max_spans:.1f} instead")
  return out


def _counts_tf(length, noise_density: float, mean_span: float, max_spans: int):
  """`noise_counts` in TF, for lengths known only in the graph. Float64 as Python's floats:
  in float32, 0.15 rounds up, so at lengths such as 30, 190 or 350 one more noise token and
  one more span came out than `raw_length` budgeted for, and the packer cut the example's end
  (its EOS) off."""
  lf = tf.cast(length, tf.float64)
  num_noise = tf.clip_by_value(tf.cast(tf.round(lf * noise_density), tf.int32), 1, length - 1)
  num_spans = tf.maximum(tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_span),
                                 tf.int32), 1)
  num_spans = tf.minimum(tf.minimum(num_spans, num_noise),
                         tf.minimum(length - num_noise, max_spans))
  return num_noise, num_spans


def _random_segmentation(num_items, num_segments, seed) -> tf.Tensor:
  """Lengths of a uniformly random split of num_items into num_segments positive parts."""
  # Choose num_segments - 1 distinct cut points among 1..num_items-1.
  scores = tf.random.stateless_uniform([num_items - 1], seed=seed)
  cuts = tf.sort(tf.argsort(scores)[:num_segments - 1] + 1)
  bounds = tf.concat([[0], tf.cast(cuts, tf.int32), [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, noise_density: float, mean_span: float, seed,
                            max_spans: int = 100) -> tf.Tensor:
  """bool[length] noise mask: alternating non-noise/noise spans, starting with non-noise."""
  length = tf.convert_to_tensor(length, tf.int32)
  num_noise, num_spans = _counts_tf(length, noise_density, mean_span, max_spans)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  noise_lens = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lens = _random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lens = tf.reshape(tf.stack([nonnoise_lens, noise_lens], axis=1), [-1])
  is_noise = tf.tile([False, True], [num_spans])
  return tf.repeat(is_noise, span_lens)


def span_corruption(tokens, noise_mask, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets): noise spans -> one sentinel each in inputs; targets list them."""
  prev = tf.concat([[False], noise_mask[:-1]], axis=0)
  first = tf.logical_and(noise_mask, tf.logical_not(prev))
  span_idx = tf.cumsum(tf.cast(first, tf.int32)) - 1
  sentinels = tf.cast(vocab_size - 1 - span_idx, tokens.dtype)
  # Per position, the pair (sentinel, token); keep flags select the members that survive.
  pairs = tf.reshape(tf.stack([sentinels, tokens], axis=1), [-1])
  keep_in = tf.reshape(tf.stack([first, tf.logical_not(noise_mask)], axis=1), [-1])
  keep_tg = tf.reshape(tf.stack([first, noise_mask], axis=1), [-1])
  return tf.boolean_mask(pairs, keep_in), tf.boolean_mask(pairs, keep_tg)


def denoise_example(tokens, seed, denoisers: Sequence[Denoiser], vocab_size: int,
                    mode_ids: Mapping[str, Sequence[int]], lengths: Sequence[int],
                    max_spans: int) -> dict[str, tf.Tensor]:
  """Apply one denoiser, drawn by rate, to `tokens` (int32[n], n >= 2).

  A random window of lengths[i] tokens is kept so inputs + targets fit the budget.
  Returns {"inputs", "targets", "denoiser"} (denoiser = index into `denoisers`).
  """
  tokens = tf.cast(tokens, tf.int32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  rates = np.array([d.rate for d in denoisers], np.float64)
  logits = np.log(np.maximum(rates / rates.sum(), 1e-30)).astype(np.float32)
  choice = tf.random.stateless_categorical(logits[None], 1, seed=seeds[0], dtype=tf.int32)[0, 0]

  def branch(i: int):
    d = denoisers[i]

    def fn():
      n_total = tf.size(tokens)
      n = tf.minimum(n_total, lengths[i])
      start = tf.random.stateless_uniform([], seeds[1], 0, n_total - n + 1, dtype=tf.int32)
      x = tokens[start:start + n]
      mode = tf.constant(mode_ids[d.mode], tf.int32)
      if d.mean_span == 0:
        k = tf.random.stateless_uniform([], seeds[2], 1, n, dtype=tf.int32)
        inputs, targets = x[:k], x[k:]
      else:
        mask = random_spans_noise_mask(n, d.noise_density, d.mean_span, seeds[3], max_spans)
        inputs, targets = span_corruption(x, mask, vocab_size)
      return tf.concat([mode, inputs], 0), targets

    return fn

  inputs, targets = tf.switch_case(choice, [branch(i) for i in range(len(denoisers))])
  return {"inputs": tf.ensure_shape(inputs, [None]), "targets": tf.ensure_shape(targets, [None]),
          "denoiser": choice}


def ul2_denoise(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                output_features: Mapping[str, seqio.Feature],
                denoisers: Sequence[Denoiser] = DEFAULT_DENOISERS) -> tf.data.Dataset:
  """seqio preprocessor: "targets" token chunks -> UL2 {"inputs", "targets"} examples.

  The packed decoder length is sequence_length["targets"]; inputs + targets + 1 (the EOS that
  `append_eos_after_trim` adds to targets) fit in it. Chunks shorter than 2 tokens are dropped.
  """
  vocab = output_features["targets"].vocabulary
  budget = int(sequence_length["targets"]) - 1
  max_spans = int(vocab.extra_ids)
  if max_spans < 1:
    raise ValueError("UL2 span corruption needs a vocabulary with extra_ids (sentinels).")
  mode_ids = {m: vocab_lib.mode_token_ids(vocab, m) for m in {d.mode for d in denoisers}}
  lengths = [raw_length(d, budget, len(mode_ids[d.mode]), max_spans) for d in denoisers]
  for line in capped_spans(denoisers, lengths, max_spans):
    logging.getLogger(__name__).warning("UL2: %s", line)
  vocab_size = int(vocab.vocab_size)

  @seqio.map_over_dataset(num_seeds=1)
  def fn(x, seed):
    out = denoise_example(x["targets"], seed, denoisers, vocab_size, mode_ids, lengths,
                          max_spans)
    return {k: v for k, v in out.items() if k != "denoiser"}

  return fn(dataset.filter(lambda x: tf.size(x["targets"]) >= 2))


def split_tokens(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                 feature_key: str = "targets") -> tf.data.Dataset:
  """seqio preprocessor: split each example's tokens into chunks of <= sequence_length tokens."""
  max_tokens = int(sequence_length[feature_key])

  def chunks(x):
    t = x[feature_key]
    n = tf.size(t, out_type=tf.int64)
    splits = tf.concat([tf.range(0, n, max_tokens, dtype=tf.int64), [n]], 0)
    ragged = tf.RaggedTensor.from_row_splits(t, splits, validate=False)
    return tf.data.Dataset.from_tensor_slices({feature_key: ragged})

  return dataset.flat_map(chunks)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab: seqio.Vocabulary,
                mode_len: int = 1) -> np.ndarray:
  """The original token window from a denoised (inputs, targets) pair (EOS/pad stripped).

  Span corruption: each sentinel in inputs is replaced by the tokens following the same
  sentinel in targets. Prefix LM (no sentinels): inputs + targets.
  """
  inputs = np.asarray(inputs).tolist()[mode_len:]
  targets = [t for t in np.asarray(targets).tolist() if t != vocab_lib.PAD_ID]
  if targets and targets[-1] == vocab.eos_id:
    targets = targets[:-1]
  is_sent = lambda t: t >= vocab.vocab_size - vocab.extra_ids
  if not any(is_sent(t) for t in inputs):
    return np.array(inputs + targets, np.int32)
  spans: dict[int, list[int]] = {}
  current = None
  for t in targets:
    if is_sent(t):
      if t in spans:
        raise ValueError(f"sentinel {t} appears twice in targets.")
      current = spans.setdefault(t, [])
    elif current is None:
      raise ValueError("targets do not start with a sentinel.")
    else:
      current.append(t)
  out = []
  for t in inputs:
    if is_sent(t):
      if t not in spans:
        raise ValueError(f"sentinel {t} in inputs has no span in targets.")
      out.extend(spans.pop(t))
    else:
      out.append(t)
  if spans:
    raise ValueError(f"targets have spans for sentinels {sorted(spans)} absent from inputs.")
  return np.array(out, np.int32)
