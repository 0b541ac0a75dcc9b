"""Generation: cached decoding == full-sequence logits at every step for every attention type
(with layer sharing), greedy generate == an uncached greedy loop, stop tokens, batching, and the
sampling filters (top-k, top-p, temperature)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import generate, inference, transformer
from openmoe_jax.config import DataConfig, ModelConfig, MoeConfig, SwitchHeadConfig, UmoeConfig

V = 61
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=2, head_dim=16, d_ff=48,
                   dtype="float32", max_seq_len=64)
SIGMA_MOE = MoeConfig(num_experts=6, top_k=2, d_expert=16, router="sigma", dropless=True,
                      dispatch="ragged", activation="relu", load_balance_weight=0.0,
                      z_loss_weight=0.0, entropy_weight=0.01)
UMOE = UmoeConfig(num_experts=6, d_expert=16, attn_top_k=2, ffn_top_k=3, qk_dim=16,
                  q_lora_rank=4)
CONFIGS = {
    "dense-gqa-moe-abab": dataclasses.replace(BASE, n_kv_heads=1, rope_fraction=0.5,
                                              moe=SIGMA_MOE, n_shared_groups=2,
                                              norm_scheme="peri"),
    "switchhead-abab": dataclasses.replace(
        BASE, attention="switchhead", switchhead=SwitchHeadConfig(num_experts=4, top_k=2),
        moe=SIGMA_MOE, n_shared_groups=2, norm_scheme="peri", init_scheme="moeut",
        rope_fraction=0.5),
    "switchhead1-aabb": dataclasses.replace(
        BASE, attention="switchhead", switchhead=SwitchHeadConfig(num_experts=1, top_k=1),
        n_shared_groups=2, share_order="aabb", norm_scheme="peri"),
    "umoe-aabb": dataclasses.replace(BASE, attention="umoe", umoe=UMOE, n_shared_groups=2,
                                     share_order="aabb"),
    "umoe-onehead": dataclasses.replace(BASE, attention="umoe",
                                        umoe=dataclasses.replace(UMOE, one_head=True,
                                                                 q_lora_rank=0)),
}


def _model(cfg):
  return transformer.Transformer(cfg, nnx.Rngs(params=3))


def _full_inputs(tokens, seg, prompt_len):
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  prefix = np.zeros_like(seg)
  prefix[:, :prompt_len] = seg[:, :prompt_len]
  return pos, prefix


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_full_sequence(name):
  """Prompt (prefix-LM, left-padded, batch 2) then 4 single-token steps through the cache."""
  model = _model(CONFIGS[name])
  prompt_tokens, prompt_seg = generate.pad_prompts([[5, 9, 2, 7, 3], [11, 4]])
  b, p = prompt_tokens.shape
  new = np.array([[8, 1, 30, 2], [6, 6, 40, 13]], np.int32)
  tokens = np.concatenate([prompt_tokens, new], axis=1)
  seg = np.concatenate([prompt_seg, np.ones_like(new)], axis=1)
  pos, prefix = _full_inputs(tokens, seg, p)
  full = nnx.jit(lambda m, t, p_, s, pf: m(t, positions_BL=p_, segment_ids_BL=s, prefix_BL=pf)[0])(
      model, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(prefix))

  step = nnx.jit(lambda m, t, s, pf, c: m(t, segment_ids_BL=s, prefix_BL=pf, cache=c))
  cache = generate.init_cache(model, b, tokens.shape[1])
  logits, _, cache = step(model, jnp.asarray(prompt_tokens), jnp.asarray(prompt_seg),
                          jnp.asarray(prompt_seg), cache)
  real = prompt_seg.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[:, :p][real],
                             atol=2e-4, rtol=2e-4)
  ones = jnp.ones((b, 1), jnp.int32)
  for i in range(new.shape[1]):
    logits, _, cache = step(model, jnp.asarray(new[:, i:i + 1]), ones, jnp.zeros_like(ones),
                            cache)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, p + i]),
                               atol=2e-4, rtol=2e-4, err_msg=f"{name} step {i}")


def _greedy_reference(model, prompt, n, length=16, prefix_lm=True):
  """Uncached: rerun the whole sequence each step (right-padded to a fixed length with segment
  id 0, so one compiled forward serves every step); prefix = [BOS] + prompt (or none)."""
  forward = nnx.jit(lambda m, t, s, pf: m(t, segment_ids_BL=s, prefix_BL=pf)[0])
  seq, out = [0, *prompt], []
  for _ in range(n):
    t, seg, prefix = (np.zeros((1, length), np.int32) for _ in range(3))
    t[0, :len(seq)], seg[0, :len(seq)], prefix[0, :len(prompt) + 1] = seq, 1, int(prefix_lm)
    logits = forward(model, jnp.asarray(t), jnp.asarray(seg), jnp.asarray(prefix))
    out.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    seq.append(out[-1])
  return out


def test_greedy_generate_equals_uncached_loop_batched_and_stops():
  model = _model(CONFIGS["switchhead-abab"])
  graphdef, params = nnx.split(model, nnx.Param)
  prompts = [[5, 9, 2, 7, 3], [11, 4]]
  refs = [_greedy_reference(model, p, 5) for p in prompts]
  # A stop token ends its row right after it (and only that row); batched == one by one.
  stop = refs[0][1]
  cfg = generate.SamplingConfig(max_new_tokens=5, stop_tokens=(stop,))
  outs = generate.generate(graphdef, params, prompts, cfg)
  cuts = [r.index(stop) + 1 if stop in r else 5 for r in refs]
  assert outs == [r[:c] for r, c in zip(refs, cuts)]
  assert generate.generate(graphdef, params, prompts[1:], cfg) == outs[1:]


@pytest.mark.parametrize("ul2", [True, False])
def test_session_reads_the_prompt_as_its_model_trained(ul2):
  """Session.complete's default: a UL2 model reads its prompt bidirectionally (the prefix its
  training inputs had), a causal LM (DataConfig.ul2=False, converted MoEUT) causally: it never
  saw a bidirectional prefix. Both equal the uncached greedy loop with that mask."""
  data = DataConfig(ul2=ul2, mixture="stdlib_ul2" if ul2 else "stdlib_lm")
  model = _model(dataclasses.replace(BASE, vocab_size=2048, init_std=0.3))
  graphdef, params = nnx.split(model, nnx.Param)
  session = inference.Session(graphdef, params, data, 0)
  ids = session.encode("def f(x):")
  want = {p: _greedy_reference(model, ids, 6, prefix_lm=p) for p in (True, False)}
  assert want[True] != want[False]  # the mask matters for this model and prompt
  assert session.complete(["def f(x):"], max_new_tokens=6) == [session.decode(want[ul2])]
  assert session.complete(["def f(x):"], max_new_tokens=6, prefix_lm=not ul2) == [
      session.decode(want[not ul2])]


def test_generation_past_max_seq_len_or_with_top_k_past_the_vocabulary_is_refused():
  model = _model(dataclasses.replace(BASE, max_seq_len=12))
  graphdef, params = nnx.split(model, nnx.Param)
  cfg = generate.SamplingConfig(max_new_tokens=6)
  assert len(generate.generate(graphdef, params, [[5] * 5], cfg)[0]) == 6  # 1 + 5 + 6 = 12
  with pytest.raises(ValueError, match="max_seq_len=12"):
    generate.generate(graphdef, params, [[5] * 6], cfg)
  with pytest.raises(ValueError, match=f"top_k={V + 1}; expected <= the vocabulary size {V}"):
    generate.generate(graphdef, params, [[5]], dataclasses.replace(cfg, top_k=V + 1))


def test_sampling_filters_restrict_support_and_follow_probabilities():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)

  def draws(cfg):
    f = jax.vmap(lambda k: generate.sample_logits(logits, k, cfg)[0])
    return np.bincount(np.asarray(f(keys)), minlength=5) / len(keys)

  assert int(generate.sample_logits(logits, keys[0], generate.SamplingConfig())[0]) == 0
  freq = draws(generate.SamplingConfig(temperature=1.0))
  np.testing.assert_allclose(freq, [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.03)
  freq = draws(generate.SamplingConfig(temperature=1.0, top_k=2))
  assert freq[2:].sum() == 0
  np.testing.assert_allclose(freq[:2], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)
  freq = draws(generate.SamplingConfig(temperature=1.0, top_p=0.8))  # nucleus {0, 1, 2}
  assert freq[3:].sum() == 0 and freq[2] > 0
  freq = draws(generate.SamplingConfig(temperature=0.25))  # sharper: p^4 renormalised
  p4 = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 4
  np.testing.assert_allclose(freq, p4 / p4.sum(), atol=0.03)


def test_sampling_config_errors():
  with pytest.raises(ValueError, match="top_p"):
    generate.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    generate.SamplingConfig(temperature=-1.0)
