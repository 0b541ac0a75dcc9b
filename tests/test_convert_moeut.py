"""MoEUT state dict import: a synthetic MoEUTLM state dict (safetensors, the official names and
torch layouts) is converted into a workdir, and the loaded model's logits match an independent
float64 numpy implementation of the official MoEUTLM forward written here from the raw arrays.
Mismatches are refused by name and leave no output."""
import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from openmoe_jax import inference, presets
from openmoe_jax.convert import moeut

V, D, H, K, F, E, FF_K, ATT_K, G, N_LAYERS = 40, 16, 2, 10, 8, 6, 2, 2, 2, 4
SMALL = dict(v=V, d=D, h=H, k=K, f=F, e=E, g=G)


def _cfg(att_experts: int):
  base = presets.get("moeut-tiny")
  return dataclasses.replace(
      base, vocab_size=0, d_model=D, n_layers=N_LAYERS, n_heads=H, head_dim=K, dtype="float32",
      max_seq_len=32, n_shared_groups=G,
      moe=dataclasses.replace(base.moe, num_experts=E, top_k=FF_K, d_expert=F,
                              router_dtype="float32"),
      switchhead=dataclasses.replace(base.switchhead, num_experts=att_experts, top_k=min(ATT_K, att_experts),
                                     selection_dtype="float32"))


def official_state(att_experts: int, seed: int = 0, v=V, d=D, h=H, k=K, f=F, e=E, g=G
                   ) -> dict[str, np.ndarray]:
  """Random MoEUTLM parameters with the official names and torch shapes."""
  V, D, H, K, F, E, G = v, d, h, k, f, e, g  # pylint: disable=invalid-name
  rng = np.random.default_rng(seed)
  w = lambda *shape, fan_in: rng.normal(size=shape) / np.sqrt(fan_in)
  s = {"embedding.weight": rng.normal(size=(V, D)), "lm_head.weight": w(V, D, fan_in=D),
       "lm_head.bias": 0.3 * rng.normal(size=V), "out_norm.weight": 1 + 0.2 * rng.normal(size=D),
       "out_norm.bias": 0.2 * rng.normal(size=D)}
  for g in range(G):
    p = f"transformer.layers.{g}."
    for ln in ("ln1", "ln2"):
      s[p + ln + ".weight"] = 1 + 0.2 * rng.normal(size=D)
      s[p + ln + ".bias"] = 0.2 * rng.normal(size=D)
    s[p + "attention.q.weight"] = w(H * K, D, fan_in=D)
    s[p + "attention.k.weight"] = w(H * K, D, fan_in=D)
    if att_experts > 1:
      s[p + "attention.v"] = w(H * att_experts, D, K, fan_in=D)
      s[p + "attention.o"] = w(H * att_experts, K, D, fan_in=K)
      s[p + "attention.sel_v"] = w(H * att_experts, D, fan_in=D)
      s[p + "attention.sel_o"] = w(H * att_experts, D, fan_in=D)
    else:
      s[p + "attention.v"] = w(H * K, D, fan_in=D)
      s[p + "attention.o"] = w(D, H * K, fan_in=H * K)
      s[p + "attention.sel_o"] = w(H, D, fan_in=D)
    s[p + "ffn.keys"] = w(E, D, F, fan_in=D)
    s[p + "ffn.values"] = w(E, F, D, fan_in=F)
    s[p + "ffn.expert_sel"] = w(E, D, fan_in=D)
  return {k: np.asarray(v, np.float32) for k, v in s.items()}


def _layer_norm(x, weight, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * weight + bias


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _top(scores, k):
  return np.argsort(-scores, axis=-1)[..., :k]


def _rope(x_TK, n_rot):
  """RoPE of the first n_rot channels (rotate-half pairs i, i + n_rot/2), positions 0..T-1."""
  inv = 1.0 / 10000 ** (np.arange(0, n_rot, 2) / n_rot)
  ang = np.arange(x_TK.shape[0])[:, None] * inv[None]
  ang = np.concatenate([ang, ang], axis=-1)
  r = x_TK[:, :n_rot]
  half = np.concatenate([-r[:, n_rot // 2:], r[:, :n_rot // 2]], axis=-1)
  return np.concatenate([r * np.cos(ang) + half * np.sin(ang), x_TK[:, n_rot:]], axis=-1)


def official_logits(s: dict[str, np.ndarray], tokens_BT: np.ndarray, att_experts: int):
  """MoEUTLM.forward (moeut/moeut.py) in float64, one sequence position loop at a time."""
  s = {k: v.astype(np.float64) for k, v in s.items()}
  n_rot = int(0.5 * K) - int(0.5 * K) % 2
  out = []
  for tokens in tokens_BT:
    x = s["embedding.weight"][tokens]  # [T, D]
    t = x.shape[0]
    for _ in range(N_LAYERS // G):
      for g in range(G):
        p = lambda n, g=g: s[f"transformer.layers.{g}.{n}"]
        xn = _layer_norm(x, p("ln1.weight"), p("ln1.bias"))
        q = (xn @ p("attention.q.weight").T * K ** -0.25).reshape(t, H, K)
        k = (xn @ p("attention.k.weight").T * K ** -0.25).reshape(t, H, K)
        if att_experts > 1:
          sel_v = _sigmoid(xn @ p("attention.sel_v").T).reshape(t, H, att_experts)
          sel_o = _sigmoid(xn @ p("attention.sel_o").T).reshape(t, H, att_experts)
          v = np.zeros((t, H, K))
          for i in range(t):
            for h in range(H):
              for e in _top(sel_v[i, h], ATT_K):
                v[i, h] += sel_v[i, h, e] * x[i] @ p("attention.v")[h * att_experts + e]
        else:
          v = (x @ p("attention.v").T).reshape(t, H, K)
          gate = _sigmoid(xn @ p("attention.sel_o").T)  # [T, H]
        att = np.zeros((t, H, K))
        for h in range(H):
          qh, kh = _rope(q[:, h], n_rot), _rope(k[:, h], n_rot)
          scores = qh @ kh.T + np.triu(np.full((t, t), -np.inf), 1)
          probs = np.exp(scores - scores.max(-1, keepdims=True))
          att[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, h]
        if att_experts > 1:
          y = np.zeros((t, D))
          for i in range(t):
            for h in range(H):
              for e in _top(sel_o[i, h], ATT_K):
                y[i] += sel_o[i, h, e] * att[i, h] @ p("attention.o")[h * att_experts + e]
        else:
          y = (att * gate[..., None]).reshape(t, H * K) @ p("attention.o").T
        x = x + y
        sel = _sigmoid(_layer_norm(x, p("ln2.weight"), p("ln2.bias")) @ p("ffn.expert_sel").T)
        upd = np.zeros((t, D))
        for i in range(t):
          for e in _top(sel[i], FF_K):
            upd[i] += sel[i, e] * np.maximum(x[i] @ p("ffn.keys")[e], 0) @ p("ffn.values")[e]
        x = x + upd
    x = _layer_norm(x, s["out_norm.weight"], s["out_norm.bias"])
    out.append(x @ s["lm_head.weight"].T + s["lm_head.bias"])
  return np.stack(out)


def _write(tmp_path, state, name="moeut.safetensors"):
  path = str(tmp_path / name)
  save_file(state, path)
  return path


@pytest.mark.parametrize("att_experts", [3, 1])
def test_converted_logits_match_official_moeut_forward(tmp_path, att_experts):
  state = official_state(att_experts)
  out, cfg = moeut.convert(_write(tmp_path, state), str(tmp_path / "work"), _cfg(att_experts),
                           data_state={})
  assert (cfg.vocab_size, cfg.norm_type, cfg.norm_eps, cfg.head_bias) == (V, "layer", 1e-5, True)
  tokens = np.random.default_rng(1).integers(0, V, size=(2, 11)).astype(np.int32)
  ours, _, _ = inference.load(out).model(tokens)
  want = official_logits(state, tokens, att_experts)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The comparison sees the LayerNorm biases and the head bias: without them it fails.
  unbiased = {k: (np.zeros_like(v) if k.endswith(".bias") else v) for k, v in state.items()}
  assert not np.allclose(official_logits(unbiased, tokens, att_experts), want, atol=1e-2)


def test_missing_parameter_fails_and_writes_nothing(tmp_path):
  state = official_state(3)
  del state["transformer.layers.1.attention.sel_v"]
  with pytest.raises(ValueError, match=r"lacks parameter 'transformer.layers.1.attention.sel_v'"):
    moeut.convert(_write(tmp_path, state), str(tmp_path / "work"), _cfg(3), data_state={})
  assert not os.path.exists(tmp_path / "work")


def test_shape_mismatch_and_unused_parameters_are_refused(tmp_path):
  path = _write(tmp_path, official_state(3))
  wrong = _cfg(3)
  wrong = dataclasses.replace(wrong, moe=dataclasses.replace(wrong.moe, num_experts=E + 1))
  with pytest.raises(ValueError, match=r"ffn.keys' has shape \(6, 16, 8\).*needs \(7, 16, 8\)"):
    moeut.convert(path, str(tmp_path / "work"), wrong, data_state={})
  extra = {**official_state(3), "transformer.layers.0.ffn.bias": np.zeros(D, np.float32)}
  with pytest.raises(ValueError, match=r"no place in the model.*ffn.bias"):
    moeut.convert(_write(tmp_path, extra, "extra.safetensors"), str(tmp_path / "work"), _cfg(3),
                  data_state={})
  with pytest.raises(ValueError, match="2 shared layers"):
    moeut.convert(path, str(tmp_path / "work"), dataclasses.replace(_cfg(3), n_shared_groups=4),
                  data_state={})
  assert not os.path.exists(tmp_path / "work")


def test_command_line_converts_with_a_preset(tmp_path):
  """launch/convert_checkpoint.py moeut SRC DST --preset moeut-tiny writes the same parameters
  as the API (whose function is checked above), in a workdir `inference.load` samples from."""
  spec = importlib.util.spec_from_file_location(
      "convert_checkpoint", os.path.join(os.path.dirname(__file__), "..", "launch",
                                         "convert_checkpoint.py"))
  convert_checkpoint = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_checkpoint)
  cfg = presets.get("moeut-tiny")
  state = official_state(cfg.switchhead.num_experts, v=64, d=cfg.d_model, h=cfg.n_heads,
                         k=cfg.resolved_head_dim, f=cfg.moe.d_expert, e=cfg.moe.num_experts,
                         g=cfg.n_shared_groups)
  path = _write(tmp_path, state)
  assert convert_checkpoint.main(["moeut", path, str(tmp_path / "cli"), "--preset",
                                  "moeut-tiny"]) == 0
  api, _ = moeut.convert(path, str(tmp_path / "api"), cfg, data_state={})
  cli_session, api_session = inference.load(str(tmp_path / "cli")), inference.load(api)
  # MoEUT trains causal LMs: both workdirs say so, and sampling reads prompts causally.
  assert not cli_session.data.ul2 and not api_session.data.ul2
  for x, y in zip(jax.tree.leaves(cli_session.params), jax.tree.leaves(api_session.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  logits, _, _ = cli_session.model(tokens)
  assert logits.shape == (1, 8, 64) and np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("change, message", [
    (dict(norm_scheme="pre"), "peri-LN"),
    (dict(rope_fraction=1.0), "rotates 0.5"),
    (dict(attention="dense", switchhead=None), "SwitchHead"),
])
def test_a_preset_that_is_not_moeut_is_refused(tmp_path, change, message):
  path = _write(tmp_path, official_state(3))
  with pytest.raises(NotImplementedError, match=message):
    moeut.convert(path, str(tmp_path / "work"), dataclasses.replace(_cfg(3), **change),
                  data_state={})
  assert not os.path.exists(tmp_path / "work")
