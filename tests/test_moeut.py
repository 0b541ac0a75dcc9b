"""MoEUT / UMoE presets: parameter counts against the official profiles and the papers, the
MoEUT-44M profile (odd RoPE half-dimension) runs, and each family trains from its gin file."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import gin_setup, metrics, params, presets, transformer

# github.com/RobertCsordas/moeut profiles.py (727M with the paper's d_model 1280), vocab 8000.
PROFILES = {
    "moeut-44m": (412, 16, 4, 155, 8, 82, 12, 2, 44e6),
    "moeut-126m": (768, 18, 4, 254, 10, 96, 12, 2, 126e6),
    "moeut-244m": (1024, 18, 4, 387, 10, 128, 16, 2, 244e6),
    "moeut-318m": (1024, 24, 4, 338, 10, 128, 16, 3, 318e6),
    "moeut-727m": (1280, 36, 5, 467, 13, 128, 20, 4, 727e6),
    "moeut-1b": (1536, 36, 6, 565, 12, 128, 24, 4, 1040e6),
}


def _official_count(d, n_layers, h, ff_e, att_e, d_head, ff_k, g, vocab=8000, f=128):
  """MoEUTLM's parameters: per shared layer SwitchHead q, k, v, o, sel_v, sel_o, sigma-MoE
  keys, values, expert_sel and two LayerNorms (weight + bias); embedding, lm_head (+ bias),
  out_norm. `n_layers` and `ff_k` change compute, not the count."""
  del n_layers, ff_k
  att = 2 * d * h * d_head + 2 * h * att_e * d * d_head + 2 * h * att_e * d
  ffn = 2 * ff_e * d * f + ff_e * d
  return g * (att + ffn + 2 * 2 * d) + vocab * d + vocab * d + vocab + 2 * d


def test_moeut_counts_match_official_profiles_and_paper(capsys):
  rows = []
  for name, (*shape, paper) in PROFILES.items():
    cfg = presets.get(name)
    ours = params.count_params(cfg)
    official = _official_count(*shape)
    g, d, v = shape[7], shape[0], 8000
    # Ours uses RMSNorm (no LayerNorm biases) and an lm_head without bias: nothing else differs.
    assert official - ours["total"] == g * 2 * d + d + v, name
    # As converted from the official code (convert/moeut.py): LayerNorms and a head bias.
    exact = dataclasses.replace(cfg, norm_type="layer", head_bias=True)
    assert params.count_params(exact)["total"] == official, name
    assert abs(ours["total"] / paper - 1) < 0.01, name  # paper sizes are rounded names
    rows.append(f"{name:11s} ours {ours['total'] / 1e6:8.2f}M  official code {official / 1e6:8.2f}M"
                f"  paper {paper / 1e6:6.0f}M  active {ours['active'] / 1e6:7.2f}M")
  umoe_counts = params.count_params(presets.get("umoe-1b"))
  rows.append(f"umoe-1b     ours {umoe_counts['total'] / 1e6:8.2f}M total, "
              f"{umoe_counts['active'] / 1e6:7.2f}M active")
  with capsys.disabled():
    print("\n" + "\n".join(rows))


def test_moeut_44m_forward_runs_and_is_sane():
  """The profile's rotary half-dimension is odd (41; early official code crashed on it): ours
  rotates 40 dims, as the official code now does, and runs."""
  cfg = dataclasses.replace(presets.get("moeut-44m"), dtype="float32", max_seq_len=16)
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 8000, (1, 12)))
  logits, aux, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert logits.shape == (1, 12, 8000) and bool(jnp.all(jnp.isfinite(logits)))
  # MoEUT's init keeps the initial prediction near uniform: loss close to log(V).
  nll = -jax.nn.log_softmax(logits[0, :-1])[jnp.arange(11), tokens[0, 1:]]
  assert abs(float(jnp.mean(nll)) - np.log(8000)) < 1.0
  assert float(transformer.total_aux_loss(aux)) > 0.0


def test_umoe_trains_from_its_gin_file(tmp_path):
  """(MoEUT's gin file is trained by tests/test_notebook.py, whose notebook then loads it.)"""
  gin_setup.clear()
  gin_setup.parse(["experiments/tiny_umoe.gin"], [
      "TrainConfig.steps = 6", "TrainConfig.batch_size = 8", "TrainConfig.seq_len = 64",
      "TrainConfig.eval_every = 0", "TrainConfig.eval_batches = 1",
      "TrainConfig.checkpoint_every = 0", "TrainConfig.log_every = 1",
      "TrainConfig.sample_tokens = 0", "OptimConfig.warmup_steps = 2",
      "MeshConfig.num_devices = 2"])
  try:
    gin_setup.configured("run")(workdir=str(tmp_path), progress=False)
  finally:
    gin_setup.clear()
  losses = [r["train/loss"] for r in metrics.read_jsonl(str(tmp_path)) if "train/loss" in r]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses


def _tiny(**kw):
  return dataclasses.replace(presets.get("moeut-tiny"), vocab_size=64, **kw)


def test_scan_equals_unrolled_and_program_size_does_not_grow_with_depth():
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 9)))
  scanned = transformer.Transformer(_tiny(), nnx.Rngs(0))
  unrolled = transformer.Transformer(_tiny(scan_layers=False), nnx.Rngs(0))
  forward = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_allclose(np.asarray(forward(scanned, tokens)),
                             np.asarray(forward(unrolled, tokens)), atol=1e-5, rtol=1e-5)

  def n_eqns(cfg):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)
    return len(jaxpr.jaxpr.eqns)
  assert n_eqns(_tiny()) == n_eqns(_tiny(n_layers=12))  # 2 shared layers x 2 vs x 6
