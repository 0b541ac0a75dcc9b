"""MoEUT and UMoE presets; registered into `openmoe_jax.presets.PRESETS` (and PUBLISHED).

MoEUT (Csordas et al. 2024; github.com/RobertCsordas/moeut profiles.py): G shared layers repeated
n_layers / G times in ABAB order, peri-LN, MoEUT init, SwitchHead attention (att_k = 2,
att_entropy_reg 0.001, half of each head rotated) and a sigma-MoE FFN (ReLU experts of width 128,
sigmoid top-k gates, dropless, entropy_reg 0.01). Vocabulary 8000 (the paper's SentencePiece
model; with it the official profiles give exactly the paper's sizes). MoEUT-727M uses
d_model 1280 as the paper's training sweep did (profiles.py says 1024, which gives 582M).
Differences from the official model (counts differ by < 0.1%): RMSNorm instead of LayerNorm
(no biases) and no lm_head bias. `norm_type="layer", head_bias=True` give the official model
exactly (what `convert/moeut.py` sets when it imports an official state dict).

UMoE (Yang et al. 2025; github.com/ysngki/UMoE model_libs/configs/1B-UMoE-1024): 24 layers,
d_model 2048, 64 experts of width 512 (SiLU MLPs) shared by attention (top-3, low-rank queries of
rank 36 + residual query, qk dim 512) and FFN (own router, top-10), one shared expert each,
vocabulary 32000, context 1024. "1B" names the dense-baseline scale; the MoE has 3.6B parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from openmoe_jax import presets as _presets
from openmoe_jax.config import ModelConfig, MoeConfig, SwitchHeadConfig, UmoeConfig


def moeut(d_model: int, n_layers: int, n_heads: int, ff_n_experts: int, att_n_experts: int,
          d_head: int, ff_k: int, group_size: int, *, vocab_size: int = 8000,
          ff_expert_size: int = 128, max_seq_len: int = 1024, dtype: str = "bfloat16"
          ) -> ModelConfig:
  """A MoEUT model from the arguments of MoEUTLM (profiles.py names)."""
  return ModelConfig(
      vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
      head_dim=d_head, d_ff=ff_expert_size, activation="relu", norm_eps=1e-5,
      tie_embeddings=False, rope_theta=10000.0, rope_fraction=0.5, max_seq_len=max_seq_len,
      dtype=dtype, attention="switchhead",
      switchhead=SwitchHeadConfig(num_experts=att_n_experts, top_k=2, entropy_weight=0.001,
                                  selection_dtype="bfloat16"),
      moe=MoeConfig(num_experts=ff_n_experts, top_k=ff_k, d_expert=ff_expert_size,
                    router="sigma", dropless=True, dispatch="gmm", activation="relu",
                    load_balance_weight=0.0, z_loss_weight=0.0, entropy_weight=0.01,
                    router_dtype="bfloat16"),
      n_shared_groups=group_size, share_order="abab", norm_scheme="peri", init_scheme="moeut")


def moeut_44m() -> ModelConfig:
  return moeut(412, 16, 4, 155, 8, 82, 12, 2)


def moeut_126m() -> ModelConfig:
  return moeut(768, 18, 4, 254, 10, 96, 12, 2)


def moeut_244m() -> ModelConfig:
  return moeut(1024, 18, 4, 387, 10, 128, 16, 2)


def moeut_318m() -> ModelConfig:
  return moeut(1024, 24, 4, 338, 10, 128, 16, 3)


def moeut_727m() -> ModelConfig:
  return moeut(1280, 36, 5, 467, 13, 128, 20, 4)


def moeut_1b() -> ModelConfig:
  return moeut(1536, 36, 6, 565, 12, 128, 24, 4)


def moeut_tiny() -> ModelConfig:
  """CPU-sized MoEUT: 2 shared layers x 2 repeats, 4 heads of 4 SwitchHead experts, 16 FFN
  experts of width 32 (top-4); vocabulary from the data."""
  return moeut(128, 4, 4, 16, 4, 32, 4, 2, vocab_size=0, ff_expert_size=32, max_seq_len=512,
               dtype="float32")


def umoe_1b() -> ModelConfig:
  return ModelConfig(
      vocab_size=32000, d_model=2048, n_layers=24, n_heads=4, d_ff=5632, norm_eps=1e-6,
      tie_embeddings=False, rope_theta=10000.0, max_seq_len=1024, attention="umoe",
      umoe=UmoeConfig(num_experts=64, d_expert=512, attn_top_k=3, ffn_top_k=10, qk_dim=512,
                      q_lora_rank=36, res_query=True, num_shared_experts=1,
                      separate_ffn_shared=True, separate_ffn_router=True, activation="silu",
                      aux_loss_weight=0.001))


def umoe_tiny() -> ModelConfig:
  """CPU-sized UMoE: 4 layers, 16 experts of width 64 (attention top-2, FFN top-4)."""
  return ModelConfig(
      vocab_size=0, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=512,
      dtype="float32", attention="umoe",
      umoe=UmoeConfig(num_experts=16, d_expert=64, attn_top_k=2, ffn_top_k=4, qk_dim=32,
                      q_lora_rank=8))


def umoe_tiny_shared() -> ModelConfig:
  """umoe-tiny with one-head attention MoE and share_layer_repeat_num = 2 (layers 0=1, 2=3)."""
  cfg = dataclasses.replace(umoe_tiny(), umoe=dataclasses.replace(umoe_tiny().umoe,
                                                                  one_head=True))
  return dataclasses.replace(cfg, n_shared_groups=2, share_order="aabb")


MOEUT_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "moeut-44m": moeut_44m,
    "moeut-126m": moeut_126m,
    "moeut-244m": moeut_244m,
    "moeut-318m": moeut_318m,
    "moeut-727m": moeut_727m,
    "moeut-1b": moeut_1b,
    "moeut-tiny": moeut_tiny,
    "umoe-1b": umoe_1b,
    "umoe-tiny": umoe_tiny,
    "umoe-tiny-shared": umoe_tiny_shared,
}

# (total, active, source); the MoEUT sizes are the paper's model names (Tab. 2 / Fig. 4).
MOEUT_PUBLISHED: dict[str, tuple[float | None, float | None, str]] = {
    "moeut-44m": (44e6, None, "MoEUT paper / profiles.py MoEUT_44M"),
    "moeut-126m": (126e6, None, "MoEUT paper / profiles.py MoEUT_126M"),
    "moeut-244m": (244e6, None, "MoEUT paper / profiles.py MoEUT_244M"),
    "moeut-318m": (318e6, None, "MoEUT paper / profiles.py MoEUT_318M"),
    "moeut-727m": (727e6, None, "MoEUT paper (d_model 1280) / profiles.py MoEUT_727M"),
    "moeut-1b": (1.04e9, None, "MoEUT paper 1.04B / profiles.py MoEUT_1B"),
}

_presets.PRESETS.update(MOEUT_PRESETS)
_presets.PUBLISHED.update(MOEUT_PUBLISHED)
