"""T5X OpenMoE -> openmoe_jax: a synthetic checkpoint in the real on-disk layout (msgpack tree +
tensorstore zarr arrays, Adafactor state) converts into a workdir whose model reproduces an
independent numpy implementation of OpenMoE's forward; bad checkpoints fail cleanly."""
import os

import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from openmoe_jax import inference
from openmoe_jax.config import ModelConfig, MoeConfig
from openmoe_jax.convert import openmoe, t5x_reader

V, D, H, K, F, E, LAYERS, INTERVAL, STEP = 2048, 32, 4, 8, 64, 4, 4, 2, 1000
# OpenMoE-shaped config as the presets give it (extra MLP as one shared expert); dropless eval
# routing so the reference below needs no capacity.
MODEL = ModelConfig(vocab_size=0, d_model=D, n_layers=LAYERS, n_heads=H, head_dim=K, d_ff=F,
                    dtype="float32", max_seq_len=64, activation="openmoe_swiglu",
                    moe=MoeConfig(num_experts=E, top_k=2, d_expert=F, layer_period=INTERVAL,
                                  layer_offset=INTERVAL - 1, capacity_factor_eval=0.0,
                                  num_shared_experts=1, activation="openmoe_swiglu"))


def raw_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Random OpenMoE parameters under their T5X names, T5X layouts (heads joined)."""
  rng = np.random.default_rng(seed)
  def n(*shape: int) -> np.ndarray:  # fan-in scaled normal
    return (rng.normal(size=shape) / np.sqrt(shape[-2])).astype(np.float32)
  scale = lambda: (1.0 + 0.2 * rng.normal(size=(D,))).astype(np.float32)  # noqa: E731
  p = {"token_embedder/embedding": rng.normal(size=(V, D)).astype(np.float32),
       "decoder/decoder_norm/scale": scale(), "decoder/logits_dense/kernel": n(D, V)}
  for i in range(LAYERS):
    pre = f"decoder/layers_{i}/"
    p[pre + "pre_self_attention_layer_norm/scale"] = scale()
    p[pre + "pre_mlp_layer_norm/scale"] = scale()
    for w in ("query", "key", "value"):
      p[pre + f"self_attention/{w}/kernel"] = n(D, H * K)
    p[pre + "self_attention/out/kernel"] = n(H * K, D)
    if (i + 1) % INTERVAL == 0:
      p[pre + "mlp/router/router_weights/w/kernel"] = (3.0 * n(D, E)).astype(np.float32)
      p[pre + "mlp/expert/wi_0/kernel"] = n(E, D, 2 * F)  # OpenMoE's SwiGLU: a 2F gate
      p[pre + "mlp/expert/wi_1/kernel"] = n(E, D, F)
      p[pre + "mlp/expert/wo/kernel"] = n(E, F, D)
      p[pre + "pre_extra_mlp_layer_norm/scale"] = scale()
      mlp = "extra_mlp"
    else:
      mlp = "mlp"
    p[pre + f"{mlp}/wi_0/kernel"] = n(D, 2 * F)
    p[pre + f"{mlp}/wi_1/kernel"] = n(D, F)
    p[pre + f"{mlp}/wo/kernel"] = n(F, D)
  return p


def _nest(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for name, leaf in flat.items():
    *dirs, last = name.split("/")
    node = tree
    for d in dirs:
      node = node.setdefault(d, {})
    node[last] = leaf
  return tree


def _zarr(directory: str, rel: str, arr: np.ndarray) -> dict:
  """Writes arr as t5x does (zarr, gzip, chunked); returns the spec t5x puts in the msgpack."""
  chunks = [max(1, s // 2) for s in arr.shape]  # several chunks per array
  metadata = {"compressor": {"id": "gzip"}, "shape": list(arr.shape), "chunks": chunks}
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                 "path": os.path.join(directory, rel)},
                   "metadata": {**metadata, "dtype": "<f4"}}, create=True).result()
  store.write(arr).result()
  return {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": rel},
          "metadata": metadata}


def write_t5x_checkpoint(root: str, params: dict[str, np.ndarray],
                         drop: tuple[str, ...] = ()) -> str:
  """checkpoint_<STEP>/ with the msgpack tree, zarr arrays for matrices (inline vectors) and
  Adafactor factored second moments under state/param_states."""
  directory = os.path.join(root, f"checkpoint_{STEP}")
  os.makedirs(directory)
  target, states = {}, {}
  for name, arr in params.items():
    if name in drop:
      continue
    target[name] = (_zarr(directory, "target." + name.replace("/", "."), arr)
                    if arr.ndim >= 2 else arr)
    if arr.ndim >= 2:
      rel = "state.param_states." + name.replace("/", ".")
      states[name + "/v_row"] = _zarr(directory, rel + ".v_row", np.abs(arr).mean(-1).astype(np.float32))
      states[name + "/v_col"] = np.abs(arr).mean(tuple(range(arr.ndim - 1))).astype(np.float32)
    else:
      states[name + "/v"] = arr * arr
  tree = {"version": 3, "optimizer": {
      "target": _nest(target), "state": {"step": np.int32(STEP), "param_states": _nest(states)}}}
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  return directory


def reference_logits(p: dict[str, np.ndarray], tokens_BL: np.ndarray) -> np.ndarray:
  """OpenMoE's forward (ColossalAI modeling_openmoe.py semantics) in float64 numpy."""
  p = {k: v.astype(np.float64) for k, v in p.items()}
  b, l = tokens_BL.shape
  rms = lambda x, s: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * s  # noqa: E731
  silu = lambda x: x / (1.0 + np.exp(-x))  # noqa: E731

  def ffn(x, w0, w1, wo):  # OpenMoeMLP: SwiGLU(x1, x2) = x1 * silu(x2) on gate_proj's halves
    g = x @ w0
    return (g[..., :F] * silu(g[..., F:]) * (x @ w1)) @ wo

  freq = 1.0 / 10000.0 ** (np.arange(0, K, 2) / K)
  angle = np.arange(l)[:, None] * freq[None, :]
  angle = np.concatenate([angle, angle], -1)[None, :, None, :]  # [1, L, 1, K]

  def rope(t):
    rotated = np.concatenate([-t[..., K // 2:], t[..., :K // 2]], -1)
    return t * np.cos(angle) + rotated * np.sin(angle)

  causal = np.tril(np.ones((l, l), bool))
  x = p["token_embedder/embedding"][tokens_BL]
  for i in range(LAYERS):
    g = lambda name: p[f"decoder/layers_{i}/{name}"]  # noqa: E731
    h = rms(x, g("pre_self_attention_layer_norm/scale"))
    q, k, v = (h @ g(f"self_attention/{w}/kernel") for w in ("query", "key", "value"))
    q, k, v = (t.reshape(b, l, H, K) for t in (q, k, v))
    s = np.einsum("blhk,bmhk->bhlm", rope(q), rope(k))  # no 1/sqrt(K) in OpenMoE
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("bhlm,bmhk->blhk", a, v).reshape(b, l, H * K) @ g("self_attention/out/kernel")
    h = rms(x, g("pre_mlp_layer_norm/scale"))
    if (i + 1) % INTERVAL:
      x = x + ffn(h, g("mlp/wi_0/kernel"), g("mlp/wi_1/kernel"), g("mlp/wo/kernel"))
      continue
    logits = h @ g("mlp/router/router_weights/w/kernel")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, -1)[..., :2]
    y = np.zeros_like(x)
    for bi in range(b):
      for t in range(l):
        for e in top2[bi, t]:
          y[bi, t] += probs[bi, t, e] * ffn(h[bi, t], g("mlp/expert/wi_0/kernel")[e],
                                            g("mlp/expert/wi_1/kernel")[e],
                                            g("mlp/expert/wo/kernel")[e])
    x = x + y
    x = x + ffn(rms(x, g("pre_extra_mlp_layer_norm/scale")), g("extra_mlp/wi_0/kernel"),
                g("extra_mlp/wi_1/kernel"), g("extra_mlp/wo/kernel"))
  return rms(x, p["decoder/decoder_norm/scale"]) @ p["decoder/logits_dense/kernel"]


def assert_model_matches_reference(workdir: str, params: dict[str, np.ndarray]) -> None:
  session = inference.load(workdir)
  tokens = np.random.default_rng(1).integers(0, V, size=(2, 12)).astype(np.int32)
  ours, _, _ = session.model(tokens)
  want = reference_logits(params, tokens)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  params = raw_params()
  return params, write_t5x_checkpoint(str(tmp_path_factory.mktemp("t5x")), params)


def test_reader_sees_tree_step_and_arrays(synthetic):
  params, directory = synthetic
  ckpt = t5x_reader.T5xCheckpoint(directory)
  assert ckpt.step == STEP and ckpt.names() == sorted(params)
  for name in ("decoder/layers_1/mlp/expert/wi_0/kernel", "decoder/decoder_norm/scale"):
    np.testing.assert_array_equal(ckpt.read(name), params[name])


def test_converted_logits_match_independent_openmoe_forward(synthetic, tmp_path):
  params, directory = synthetic
  out, cfg = openmoe.convert(directory, str(tmp_path / "work"), MODEL, data_state={})
  assert cfg.vocab_size == V and cfg.moe.num_shared_experts == 0
  assert cfg.option("moe_extra_mlp") == "sequential"
  assert_model_matches_reference(out, params)
  # Logit check is sensitive to each rewrite: without the sqrt(K) query rescale it fails.
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  unscaled = {k: v / np.sqrt(K) for k, v in params.items() if k.endswith("query/kernel")}
  assert not np.allclose(reference_logits({**params, **unscaled}, tokens),
                         reference_logits(params, tokens), atol=1e-2)
  # ... and to which half of wi_0 the SiLU gates: with the halves swapped it fails too.
  swapped = {k: np.concatenate([v[..., F:], v[..., :F]], -1) for k, v in params.items()
             if k.endswith("wi_0/kernel")}
  assert not np.allclose(reference_logits({**params, **swapped}, tokens),
                         reference_logits(params, tokens), atol=1e-2)


def test_missing_parameter_fails_and_writes_nothing(tmp_path):
  gone = "decoder/layers_3/mlp/expert/wo/kernel"
  directory = write_t5x_checkpoint(str(tmp_path / "t5x"), raw_params(), drop=(gone,))
  with pytest.raises(ValueError, match=gone):
    openmoe.convert(directory, str(tmp_path / "work"), MODEL, data_state={})
  assert sorted(os.listdir(tmp_path)) == ["t5x"]


def test_corrupted_or_incomplete_array_fails_and_writes_nothing(tmp_path):
  directory = write_t5x_checkpoint(str(tmp_path / "t5x"), raw_params())
  name = "decoder/layers_2/self_attention/key/kernel"
  array_dir = os.path.join(directory, "target." + name.replace("/", "."))
  with open(os.path.join(array_dir, "1.0"), "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError, match=name):
    openmoe.convert(directory, str(tmp_path / "work"), MODEL, data_state={})
  os.remove(os.path.join(array_dir, "1.0"))  # a chunk that never arrived must not read as zeros
  with pytest.raises(FileNotFoundError, match=name):
    openmoe.convert(directory, str(tmp_path / "work"), MODEL, data_state={})
  assert sorted(os.listdir(tmp_path)) == ["t5x"]


def test_shape_mismatch_names_parameter_and_both_shapes(synthetic, tmp_path):
  _, directory = synthetic
  import dataclasses
  wrong = dataclasses.replace(MODEL, d_ff=48, moe=dataclasses.replace(MODEL.moe, d_expert=48))
  with pytest.raises(ValueError, match=r"mlp/wi_0/kernel' has shape \(32, 128\).*needs \(32, 96\)"):
    openmoe.convert(directory, str(tmp_path / "work"), wrong, data_state={})
  with pytest.raises(NotImplementedError, match="norm_eps"):
    openmoe.convert(directory, str(tmp_path / "work"),
                    dataclasses.replace(MODEL, norm_eps=1e-5), data_state={})
  assert not os.path.exists(tmp_path / "work")


def test_safetensors_export_round_trips_converted_params(synthetic, tmp_path):
  from safetensors import safe_open
  from openmoe_jax.convert import safetensors_export
  params, directory = synthetic
  work, _ = openmoe.convert(directory, str(tmp_path / "work"), MODEL, data_state={})
  path = safetensors_export.export(work, str(tmp_path / "m.safetensors"))
  with safe_open(path, "np") as f:
    assert f.metadata()["step"] == "0"
    np.testing.assert_array_equal(f.get_tensor("embed.embedding_VD"),
                                  params["token_embedder/embedding"])
    # layer 3 = repeat 1 of the 2-block unit, block 1 (the MoE block)
    np.testing.assert_array_equal(f.get_tensor("segments.0.unit.blocks.1.ffn.w_gate_EDF")[1],
                                  params["decoder/layers_3/mlp/expert/wi_0/kernel"])
    q = f.get_tensor("segments.0.unit.blocks.0.attn.w_q_DHK")[0]
    np.testing.assert_allclose(q, params["decoder/layers_0/self_attention/query/kernel"]
                               .reshape(D, H, K) * np.sqrt(K), rtol=1e-6)
