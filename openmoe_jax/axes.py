"""Shape letters and logical axis names used across openmoe_jax.

Tensor names carry their shape as a suffix (`x_BLD`, `w_in_EDF`), with these letters:

  B batch            L query length        S key/cache length    D model dim
  F FFN hidden       H query heads         N kv heads            K head dim
  V vocabulary       E experts             C expert capacity     G routing groups
  T tokens (B*L)     M rows of a grouped matmul                  R repeats / stacked layers
  J evaluation groups (the total, then each UL2 denoiser kind; openmoe_jax.evaluation)

Parameters carry *logical* axis names (below) at creation; `openmoe_jax.sharding` maps them to
mesh axes through a short rule table. Mesh axis names appear only in sharding.py and gin presets.
"""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"
LAYERS = "layers"  # the stacked-layer axis that nnx.scan iterates over
NORM = "norm"  # 1-D norm scales (never sharded)

# Activation axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_EXPERT = "act_expert"
ACT_EXPERT_GROUP = "act_expert_group"  # routing groups inside expert buffers (batch minus "expert")
ACT_VOCAB = "act_vocab"

PARAM_AXES = (VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, EXPERT, EXPERT_MLP, LAYERS, NORM)
ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_EXPERT, ACT_EXPERT_GROUP,
                   ACT_VOCAB)
