"""The training-step benchmark: FLOP formula, synthetic batches, and an end-to-end CPU run."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from openmoe_jax import attention
from openmoe_jax.bench import train_step as bench
from openmoe_jax.config import ModelConfig, MoeConfig


def _dense_params_by_hand(cfg: ModelConfig) -> int:
  d, h, n, k, f, v = (cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim,
                      cfg.d_ff, cfg.vocab_size)
  per_layer = d * h * k * 2 + d * n * k * 2 + 3 * d * f  # q, o, k, v, gated MLP
  return cfg.n_layers * per_layer + d * v  # + untied head; embedding lookup not counted


def test_flops_dense_matches_hand_count():
  cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=80)
  total, dense, attn = bench.model_flops_per_token(cfg, seq=50)
  assert dense == 6 * _dense_params_by_hand(cfg)
  assert attn == 6 * 3 * 4 * 8 * 50
  assert total == dense + attn


def test_flops_tied_head_counts_embedding_once():
  cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                    tie_embeddings=True)
  n = bench.active_params_per_token(cfg)
  assert n == _dense_params_by_hand(cfg)  # tied table plays the head, counted once


def test_flops_shared_layers_count_every_repeat():
  """Universal-Transformer sharing: 2 distinct layers applied 6 times cost 6 layers."""
  shared = ModelConfig(vocab_size=96, d_model=32, n_layers=6, n_heads=4, d_ff=64,
                       n_shared_groups=2)
  plain = dataclasses.replace(shared, n_shared_groups=0)
  assert bench.active_params_per_token(shared) == bench.active_params_per_token(plain)


def test_flops_experts_count_top_k_of_e():
  pytest.importorskip("openmoe_jax.moe")
  moe = MoeConfig(num_experts=8, top_k=2, d_expert=48, layer_period=2, layer_offset=1)
  cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=4, d_ff=64, moe=moe)
  dense_cfg = dataclasses.replace(cfg, moe=None)
  n_moe, n_dense = bench.active_params_per_token(cfg), bench.active_params_per_token(dense_cfg)
  d = cfg.d_model
  # Two of four layers swap a dense gated MLP (3*D*F) for k gated experts (3*D*d_expert each)
  # plus a router [D, E], which counts fully.
  expected = n_dense + 2 * (2 * 3 * d * 48 + d * 8 - 3 * d * 64)
  assert n_moe == pytest.approx(expected, rel=0.02)  # small extras (e.g. router bias) allowed


def test_flops_switchhead_experts_count_top_k_of_e():
  """SwitchHead's V/O experts [H, E, D, K] keep their expert axis replicated (no `expert`
  logical name): the shape suffix still marks it, so only att_k of E count per token."""
  from openmoe_jax.config import SwitchHeadConfig  # pylint: disable=import-outside-toplevel
  d, h, k, e, top_k, v = 32, 4, 8, 6, 2, 96
  cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=2, n_heads=h, head_dim=k, d_ff=64,
                    attention="switchhead",
                    switchhead=SwitchHeadConfig(num_experts=e, top_k=top_k))
  per_layer = (2 * d * h * k          # dense Q and K
               + 2 * h * top_k * d * k  # k of E value and output experts per head
               + 2 * d * h * e          # V and O selection logits
               + 3 * d * 64)            # gated MLP
  assert bench.active_params_per_token(cfg) == 2 * per_layer + d * v


@pytest.mark.parametrize("mask", bench.MASKS)
def test_synthetic_batch_follows_contract(mask):
  b = bench.synthetic_batch(3, 64, 50, seed=2, mask=mask)
  assert set(b) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                    "decoder_segment_ids", "decoder_positions", "decoder_causal_attention"}
  for key, value in b.items():
    assert value.shape == (3, 64), key
  seg, pos, tgt, inp = (b["decoder_segment_ids"], b["decoder_positions"],
                        b["decoder_target_tokens"], b["decoder_input_tokens"])
  assert b["decoder_loss_weights"].dtype == np.float32 and seg.dtype == np.int32
  for r in range(3):
    for t in range(64):
      if seg[r, t] == 0:
        assert tgt[r, t] == 0 and b["decoder_loss_weights"][r, t] == 0
        continue
      start = t == 0 or seg[r, t - 1] != seg[r, t]
      assert pos[r, t] == (0 if start else pos[r, t - 1] + 1)
      assert inp[r, t] == (0 if start else tgt[r, t - 1])  # targets shifted right
  if mask == "causal":
    assert (seg == 1).all() and (b["decoder_causal_attention"] == 0).all()
  else:
    assert seg.max() > 1 and b["decoder_causal_attention"].any()
    # The mask rule holds and some prefix query sees a later key.
    m = np.asarray(attention.sequence_mask(seg, b["decoder_causal_attention"]))
    assert np.triu(m, 1).any()


def test_time_steps_needs_ten_steps_and_threads_state():
  with pytest.raises(ValueError, match="at least 10"):
    bench.time_steps(lambda s, b: (s, {}), 0, [None], 1, 9)
  seen = []

  def step(state, batch):
    seen.append(batch)
    return state + 1, {"loss": state}

  times, state, _ = bench.time_steps(step, jax.numpy.zeros(()), ["a", "b"], 2, 10)
  assert len(times) == 10 and int(state) == 12 and seen[:4] == ["a", "b", "a", "b"]


def test_scan_layers_flag_reaches_the_config():
  cfg = bench.resolve_preset("bench-tiny-moe")
  assert bench.apply_overrides(cfg, seq=32, scan_layers=False).scan_layers is False
  assert bench.apply_overrides(cfg, seq=32).scan_layers == cfg.scan_layers
  assert bench.parse_args(["--preset", "x", "--scan_layers", "false"]).scan_layers == "false"
  with pytest.raises(SystemExit):
    bench.parse_args(["--preset", "x", "--scan_layers", "no"])


def test_attention_mask_flag_reaches_the_config_and_the_table():
  cfg = bench.resolve_preset("bench-tiny-moe")
  assert bench.apply_overrides(cfg, seq=32, attention_mask="causal").attention_mask == "causal"
  assert bench.apply_overrides(cfg, seq=32).attention_mask == cfg.attention_mask
  assert bench.parse_args(["--preset", "x", "--attention_mask", "causal"]).attention_mask == \
      "causal"
  with pytest.raises(ValueError, match="--attention_mask causal ignores the segments"):
    bench.run("bench-tiny-moe", 2, 32, attention_mask="causal", mask="prefix_packed")


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="bench-tiny-dense"):
    bench.resolve_preset("no-such-preset")


def test_end_to_end_cpu_run(tmp_path, capsys):
  """The real jitted train_step of a MoE model on packed prefix-LM batches runs, trains (loss
  falls on repeated batches) and reports."""
  out = tmp_path / "r.jsonl"
  r = bench.main(["--preset", "bench-tiny-moe", "--batch", "4", "--seq", "32", "--steps", "10",
                  "--warmup", "2", "--remat", "dots", "--mask", "prefix_packed",
                  "--dispatch", "einsum", "--json", str(out),
                  "--profile_dir", str(tmp_path / "trace")])
  assert r.steps_done == 2 + 10 + 3  # warm-up + timed + profiled steps, state donated through
  assert r.loss_last < r.loss_first
  assert r.remat == "dots" and r.attention_impl == "xla" and r.dispatch == "einsum"
  assert r.active_params < r.total_params
  assert r.step_s_min <= r.step_s <= r.step_s_max
  assert r.tokens_per_s == pytest.approx(4 * 32 / r.step_s)
  assert r.mfu == pytest.approx(r.model_flops_per_token * r.tokens_per_s / r.peak_flops)
  assert 0 < r.mfu < 1
  line = json.loads(out.read_text().splitlines()[-1])
  assert line["preset"] == "bench-tiny-moe" and line["batch"] == 4
  text = capsys.readouterr().out
  assert "tokens/s" in text and "MFU" in text and bench.TABLE_HEADER in text
  assert any(p.is_file() for p in (tmp_path / "trace").rglob("*"))
