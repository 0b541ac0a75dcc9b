"""Frozen, typed configuration dataclasses; validated on construction. Imports no gin.

Gin binds the fields of these classes (see `openmoe_jax/gin_setup.py`); Python code builds them
directly. Every field has a comment; every check raises a ValueError naming the bad value.
"""
from __future__ import annotations

import dataclasses

# openmoe_swiglu: OpenMoE's SwiGLU, a gate twice as wide, (g1 * silu(g2)) * up (layers.activate)
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu", "openmoe_swiglu")
ROUTERS = ("topk_softmax", "sigma", "expert_choice")
DISPATCHES = ("einsum", "ragged", "gmm", "shard_map")  # shard_map: openmoe_jax.expert_parallel
EXCHANGES = ("auto", "dense", "ragged")  # expert all-to-all of dispatch="shard_map"
REMATS = ("none", "dots", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")  # see attention.dot_product_attention
DTYPES = ("float32", "bfloat16", "float16")


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  _check(value in allowed, f"{name}={value!r}; expected one of {allowed}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  _check(ok, f"{name}={value!r}; expected a {'non-negative' if allow_zero else 'positive'} value")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-Experts feed-forward settings (ST-MoE / OpenMoE / open_lm / MoEUT sigma-MoE)."""

  num_experts: int = 8  # E: routed experts per MoE layer
  top_k: int = 2  # k: experts chosen per token (token choice) or capacity multiplier (expert choice)
  d_expert: int = 0  # F of one expert; 0 = ModelConfig.d_ff
  router: str = "topk_softmax"  # one of ROUTERS
  capacity_factor_train: float = 1.25  # capacity = ceil(tokens * k * cf / E); <= 0 means dropless
  capacity_factor_eval: float = 2.0  # same, at evaluation
  min_capacity: int = 0  # lower bound on the per-group expert capacity (OpenMoE/ColossalAI: 4)
  dropless: bool = False  # route every token (sort + ragged matmul); ignores capacity factors
  group_size: int = 0  # tokens per routing group for capacity; 0 = one group per sequence
  batch_prioritized: bool = False  # fill capacity by router confidence, not by position (BPR)
  jitter: float = 0.0  # multiplicative uniform noise on router inputs during training (ST-MoE: 0)
  renormalize: bool = False  # renormalise top-k softmax weights to sum to 1 (OpenMoE: False)
  load_balance_weight: float = 0.01  # coefficient of E * sum(frac_tokens * mean_prob)
  z_loss_weight: float = 0.001  # coefficient of mean(logsumexp(logits)^2)
  entropy_weight: float = 0.0  # sigma-MoE entropy regulariser coefficient (MoEUT: 0.01)
  num_shared_experts: int = 0  # always-on dense experts of width d_expert added to the routed output
  layer_period: int = 1  # every N-th layer is MoE (OpenMoE: 4, open_lm moe_freq); 1 = all layers
  layer_offset: int = 0  # layer i is MoE iff i % layer_period == layer_offset
  dispatch: str = "einsum"  # one of DISPATCHES: one-hot einsum (capacity), ragged_dot, gmm kernel
  gmm_backend: str = "auto"  # kernel backend for dispatch="gmm" (see openmoe_jax.kernels.gmm)
  exchange: str = "auto"  # dispatch="shard_map": one of EXCHANGES (openmoe_jax.expert_parallel)
  exchange_slack: float = 1.25  # its buffers: this x the balanced share of rows per device pair
  #   while every pair fits (else worst case, same result); <= 0: always the worst case
  exchange_chunks: int = 1  # each device's groups in this many pieces, so exchanges overlap
  activation: str = "swiglu"  # expert FFN activation, one of ACTIVATIONS
  fused_glu: bool = False  # dispatch="gmm", swiglu/geglu, token choice: the first expert layer
  #   as one kernels.gmm.gmm_glu call (token rows gathered, then act(gate) * up in the Hopper
  #   kernel's epilogue, [M, 2F] never written). Its backward recomputes that product: for
  #   forward-only use (eval, generation) or a remat policy that recomputes the forward
  expert_dropout: float = 0.0  # MoEUT expert dropout on the router selection (training only)
  router_dtype: str = "float32"  # operands of the router matmul (logits accumulate in float32):
  #   "float32" as ST-MoE prescribes; "bfloat16" as MoEUT's autocast runs its sigma-MoE router

  def __post_init__(self):
    _positive("MoeConfig.num_experts", self.num_experts)
    _check(1 <= self.top_k <= self.num_experts,
           f"MoeConfig.top_k={self.top_k}; expected 1..num_experts={self.num_experts}")
    _positive("MoeConfig.d_expert", self.d_expert, allow_zero=True)
    _choice("MoeConfig.router", self.router, ROUTERS)
    _choice("MoeConfig.dispatch", self.dispatch, DISPATCHES)
    _choice("MoeConfig.exchange", self.exchange, EXCHANGES)
    _positive("MoeConfig.exchange_chunks", self.exchange_chunks)
    _choice("MoeConfig.activation", self.activation, ACTIVATIONS)
    _choice("MoeConfig.router_dtype", self.router_dtype, ("float32", "bfloat16"))
    _positive("MoeConfig.layer_period", self.layer_period)
    _check(0 <= self.layer_offset < self.layer_period,
           f"MoeConfig.layer_offset={self.layer_offset}; expected 0..{self.layer_period - 1}")
    _positive("MoeConfig.group_size", self.group_size, allow_zero=True)
    _check(not self.renormalize or self.router == "topk_softmax",
           f"MoeConfig.renormalize renormalises top-k softmax weights; router={self.router!r} "
           "has none to renormalise (sigma: raw sigmoid gates, as MoEUT)")
    _check(not self.dropless or self.router != "expert_choice",
           "MoeConfig.dropless=True routes every token by token choice; router='expert_choice' "
           "gives each expert a capacity (set by capacity_factor_*) by construction")
    _positive("MoeConfig.min_capacity", self.min_capacity, allow_zero=True)
    _check(0.0 <= self.expert_dropout < 1.0,
           f"MoeConfig.expert_dropout={self.expert_dropout}; expected [0, 1)")
    for name in ("jitter", "load_balance_weight", "z_loss_weight", "entropy_weight"):
      _positive(f"MoeConfig.{name}", getattr(self, name), allow_zero=True)
    _positive("MoeConfig.num_shared_experts", self.num_shared_experts, allow_zero=True)
    _check(not self.fused_glu or (self.dispatch == "gmm" and self.activation in
                                  ("swiglu", "geglu")),
           f"MoeConfig.fused_glu needs dispatch='gmm' and a gated activation (swiglu, geglu); "
           f"got dispatch={self.dispatch!r}, activation={self.activation!r}")
    if self.dispatch == "einsum" and self.dropless:
      raise ValueError("MoeConfig.dispatch='einsum' needs a capacity; dropless=True needs "
                       "dispatch='ragged' or 'gmm'")

  def is_moe_layer(self, layer: int) -> bool:
    return layer % self.layer_period == self.layer_offset


@dataclasses.dataclass(frozen=True)
class SwitchHeadConfig:
  """SwitchHead attention (MoEUT): dense Q/K, per-head expert V and O chosen by sigma-MoE gates."""

  num_experts: int = 8  # att_n_experts per head; 1 = dense V/O with a learned sigmoid output gate
  top_k: int = 2  # att_k: V / O experts active per head and token
  entropy_weight: float = 0.001  # MoEUT att_entropy_reg (delta) on the V and O selections
  selection_dtype: str = "float32"  # operands of the V/O selection matmuls (float32 logits);
  #   "bfloat16" as MoEUT's autocast runs them

  def __post_init__(self):
    _positive("SwitchHeadConfig.num_experts", self.num_experts)
    _check(1 <= self.top_k <= self.num_experts,
           f"SwitchHeadConfig.top_k={self.top_k}; expected 1..num_experts={self.num_experts}")
    _positive("SwitchHeadConfig.entropy_weight", self.entropy_weight, allow_zero=True)
    _choice("SwitchHeadConfig.selection_dtype", self.selection_dtype, ("float32", "bfloat16"))


UMOE_ACTIVATIONS = ("silu", "relu", "gelu")  # UMoE experts are plain (not gated) D -> F -> D MLPs


@dataclasses.dataclass(frozen=True)
class UmoeConfig:
  """UMoE: attention as "pre-mixing" + FFN experts shared by the attention and FFN sub-layers."""

  num_experts: int = 64  # E routed experts per layer, used by both attention and FFN
  d_expert: int = 512  # F of one expert (moe_intermediate_size)
  attn_top_k: int = 3  # experts (= attention heads) per token in attention (num_experts_per_tok)
  ffn_top_k: int = 10  # experts per token in the FFN (ffn_num_experts_per_tok)
  qk_dim: int = 512  # Q: query / key width (qk_nope_head_dim + qk_rope_head_dim)
  q_lora_rank: int = 36  # rank of the per-expert low-rank queries; 0 = full-rank [D, Q] each
  res_query: bool = True  # add a shared full-rank query to every low-rank expert query
  num_shared_experts: int = 1  # always-on experts (width num_shared * F) with their own query
  separate_ffn_shared: bool = True  # the FFN uses its own shared expert (not attention's)
  separate_ffn_router: bool = True  # the FFN routes with its own router
  one_head: bool = False  # one_head_attention_moe: one query, one mixed vector fed to all top-k
  activation: str = "silu"  # expert non-linearity, one of UMOE_ACTIVATIONS
  aux_loss_weight: float = 0.001  # DeepSeek per-sequence balance loss (aux_loss_alpha), per router

  def __post_init__(self):
    _positive("UmoeConfig.num_experts", self.num_experts)
    _positive("UmoeConfig.d_expert", self.d_expert)
    _positive("UmoeConfig.qk_dim", self.qk_dim)
    for name in ("attn_top_k", "ffn_top_k"):
      k = getattr(self, name)
      _check(1 <= k <= self.num_experts,
             f"UmoeConfig.{name}={k}; expected 1..num_experts={self.num_experts}")
    _positive("UmoeConfig.q_lora_rank", self.q_lora_rank, allow_zero=True)
    _positive("UmoeConfig.num_shared_experts", self.num_shared_experts, allow_zero=True)
    _positive("UmoeConfig.aux_loss_weight", self.aux_loss_weight, allow_zero=True)
    _choice("UmoeConfig.activation", self.activation, UMOE_ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer shape and options (OpenMoE, openllama, MoEUT, UMoE)."""

  vocab_size: int = 2048  # V; 0 = taken from the data pipeline's vocabulary at run time
  d_model: int = 128  # D
  n_layers: int = 4  # number of transformer blocks applied (with sharing: groups * repeats)
  n_heads: int = 4  # H query heads
  n_kv_heads: int = 0  # KV heads (grouped-query attention); 0 = n_heads
  head_dim: int = 0  # K per head; 0 = d_model // n_heads
  d_ff: int = 512  # F of the dense FFN
  activation: str = "swiglu"  # dense FFN activation, one of ACTIVATIONS
  norm_eps: float = 1e-6  # epsilon of every norm
  norm_type: str = "rms"  # "rms": RMSNorm (scale) | "layer": LayerNorm (mean-centred, scale and
  #   bias; the official MoEUT code's torch.nn.LayerNorm, used by its converted checkpoints)
  tie_embeddings: bool = False  # share the input embedding with the output projection
  head_bias: bool = False  # a learned bias [V] on the output logits (MoEUT's lm_head has one)
  rope_theta: float = 10000.0  # RoPE base
  rope_fraction: float = 1.0  # fraction of head_dim rotated (MoEUT rotates part of it)
  max_seq_len: int = 2048  # longest sequence (RoPE tables, KV cache)
  dtype: str = "bfloat16"  # activation/compute dtype
  param_dtype: str = "float32"  # parameter (master weight) dtype
  moe: MoeConfig | None = None  # None = dense FFN in every layer
  attention: str = "dense"  # "dense" | "switchhead" | "umoe"
  attention_impl: str = "xla"  # one of ATTENTION_IMPLS: XLA einsums | cuDNN fused (GPU only) |
  #   Pallas flash kernel (openmoe_jax.flash_attention); same masks and results. On the GPU,
  #   cuDNN's backward is not bitwise reproducible run to run; xla and pallas are
  attention_mask: str = "packed"  # "packed": segments (packed examples) and bidirectional
  #   prefixes from the batch, as UL2 needs | "causal": each row is one causal stream, the
  #   batch's segments, prefixes and positions are ignored by attention (MoEUT's contiguous-
  #   window LM training; padding, segment id 0, still has no loss and is not routed); lets
  #   attention_impl="cudnn" run cuDNN's causal kernel without a mask tensor
  n_shared_groups: int = 0  # MoEUT/UT: G distinct layers reused n_layers/G times; 0 = no sharing
  share_order: str = "abab"  # "abab": G layers in order, repeated; "aabb": each repeated in place
  norm_scheme: str = "pre"  # "pre" (pre-LN) | "peri" (MoEUT: norms on router/QK inputs + final)
  scan_layers: bool = True  # nnx.scan over repeated blocks so compile time does not grow with depth
  remat: str = "none"  # activation checkpointing policy per block, one of REMATS
  remat_cse_repeats: int = 0  # unrolled layers: the first N repeats of each segment let XLA
  #   reuse forward values in their rematerialised backward (jax.checkpoint prevent_cse=False:
  #   faster, more memory); -1 = all of them. Scanned layers always allow it.
  init_std: float = 0.02  # std of normal initialisers (scaled per layer by the model code)
  z_loss: float = 0.0  # output-logit z-loss coefficient (PaLM/OpenMoE style)
  logits_dtype: str = "float32"  # dtype of the [B, L, V] logits the head writes: "bfloat16"
  #   halves their bytes and their gradient's (large vocabularies); the loss still reduces in f32
  loss_chunk_len: int = 0  # training/eval loss: run the head + cross-entropy over chunks of
  #   this many positions, each rematerialised in the backward, so the [B, L, V] logits and
  #   their gradient never exist whole (large vocabularies); 0 = one pass over all of L
  extra: tuple[tuple[str, object], ...] = ()  # family-specific options (SwitchHead, UMoE), key/value
  switchhead: SwitchHeadConfig | None = None  # needed by attention="switchhead"
  umoe: UmoeConfig | None = None  # needed by attention="umoe" (the block then has no `moe` FFN)
  init_scheme: str = "scaled"  # "scaled": normal(init_std), residual outputs / sqrt(2 n_layers);
  #   "moeut": MoEUT's reset_parameters: std sqrt(2 / n_layers) / sqrt(fan_in) for every
  #   projection (init_std unused), embeddings std 1 / sqrt(d_model)

  def __post_init__(self):
    _positive("ModelConfig.vocab_size", self.vocab_size, allow_zero=True)
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      _positive(f"ModelConfig.{name}", getattr(self, name))
    _check(self.head_dim > 0 or self.d_model % self.n_heads == 0,
           f"ModelConfig.d_model={self.d_model} not divisible by n_heads={self.n_heads}; "
           "set head_dim explicitly")
    _check(self.n_kv_heads == 0 or self.n_heads % self.n_kv_heads == 0,
           f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    _choice("ModelConfig.activation", self.activation, ACTIVATIONS)
    _choice("ModelConfig.dtype", self.dtype, DTYPES)
    _choice("ModelConfig.param_dtype", self.param_dtype, DTYPES)
    _choice("ModelConfig.logits_dtype", self.logits_dtype, ("float32", "bfloat16"))
    _choice("ModelConfig.attention", self.attention, ("dense", "switchhead", "umoe"))
    _choice("ModelConfig.share_order", self.share_order, ("abab", "aabb"))
    _choice("ModelConfig.norm_scheme", self.norm_scheme, ("pre", "peri"))
    _choice("ModelConfig.norm_type", self.norm_type, ("rms", "layer"))
    _choice("ModelConfig.remat", self.remat, REMATS)
    if self.remat_cse_repeats < -1:
      raise ValueError(f"ModelConfig.remat_cse_repeats={self.remat_cse_repeats}; expected "
                       ">= 0, or -1 for every repeat")
    _positive("ModelConfig.loss_chunk_len", self.loss_chunk_len, allow_zero=True)
    _choice("ModelConfig.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _choice("ModelConfig.attention_mask", self.attention_mask, ("packed", "causal"))
    _choice("ModelConfig.init_scheme", self.init_scheme, ("scaled", "moeut"))
    _check(self.attention != "switchhead" or self.switchhead is not None,
           "ModelConfig.attention='switchhead' needs ModelConfig.switchhead (a SwitchHeadConfig)")
    _check(self.attention != "umoe" or self.umoe is not None,
           "ModelConfig.attention='umoe' needs ModelConfig.umoe (a UmoeConfig)")
    _check(self.attention != "umoe" or self.moe is None,
           "ModelConfig.attention='umoe' shares its experts with the FFN; set ModelConfig.moe=None")
    _check(0.0 < self.rope_fraction <= 1.0,
           f"ModelConfig.rope_fraction={self.rope_fraction}; expected (0, 1]")
    _check(self.n_shared_groups == 0 or self.n_layers % self.n_shared_groups == 0,
           f"ModelConfig.n_layers={self.n_layers} not divisible by n_shared_groups="
           f"{self.n_shared_groups}")
    if self.moe is not None and self.n_shared_groups:
      _check(self.n_shared_groups % self.moe.layer_period == 0,
             f"MoeConfig.layer_period={self.moe.layer_period} must divide n_shared_groups="
             f"{self.n_shared_groups}")
      # "aabb" repeats each shared layer in place: consecutive layers share one FFN, so no
      # layer_period > 1 can make layer i MoE iff i % period == offset.
      _check(self.share_order != "aabb" or self.moe.layer_period == 1,
             f"MoeConfig.layer_period={self.moe.layer_period} with share_order='aabb': its "
             "repeats of a layer share one FFN, so MoE layers cannot alternate; use 'abab'")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  def option(self, key: str, default: object = None) -> object:
    """Looks up a family-specific option from `extra`."""
    return dict(self.extra).get(key, default)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training text comes from and how it becomes batches."""

  mixture: str = "stdlib_ul2"  # registered seqio task or mixture name
  vocab_path: str | None = None  # SentencePiece .model; None = the cached stdlib model
  data_dir: str | None = None  # TFDS data directory (c4, the_stack); None = not used
  text_files: tuple[str, ...] = ()  # local .txt / .jsonl files for the "text_files" task
  pack: bool = True  # pack several examples into one sequence (segment ids)
  ul2: bool = True  # UL2 mixture of denoisers; False = plain causal LM
  seed: int = 0  # shuffling / denoiser seed

  def __post_init__(self):
    _check(bool(self.mixture), "DataConfig.mixture is empty; expected a task or mixture name")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser and learning-rate schedule."""

  name: str = "adamw"  # "adamw" | "adafactor"
  learning_rate: float = 3e-3  # peak learning rate
  schedule: str = "cosine"  # "cosine" | "rsqrt" | "constant" (all after linear warmup)
  warmup_steps: int = 50  # linear warmup length
  decay_steps: int = 0  # cosine decay length; 0 = TrainConfig.steps
  min_lr_ratio: float = 0.1  # final lr / peak lr for cosine
  b1: float = 0.9  # Adam beta1 / Adafactor momentum (0 = none)
  b2: float = 0.95  # Adam beta2 (Adafactor's second-moment decay exponent is T5X's 0.8)
  eps: float = 1e-8  # Adam epsilon
  weight_decay: float = 0.1  # decoupled weight decay (not on norms, biases)
  clip_norm: float = 1.0  # global gradient norm clip; 0 = off
  grad_accum_steps: int = 1  # micro-batches accumulated per optimiser step

  def __post_init__(self):
    _choice("OptimConfig.name", self.name, ("adamw", "adafactor"))
    _choice("OptimConfig.schedule", self.schedule, ("cosine", "rsqrt", "constant"))
    _positive("OptimConfig.learning_rate", self.learning_rate)
    _positive("OptimConfig.warmup_steps", self.warmup_steps, allow_zero=True)
    _positive("OptimConfig.decay_steps", self.decay_steps, allow_zero=True)
    _check(0.0 <= self.min_lr_ratio <= 1.0,
           f"OptimConfig.min_lr_ratio={self.min_lr_ratio}; expected [0, 1]")
    _check(0.0 <= self.b1 < 1.0, f"OptimConfig.b1={self.b1}; expected [0, 1)")
    _check(0.0 < self.b2 < 1.0, f"OptimConfig.b2={self.b2}; expected (0, 1)")
    _positive("OptimConfig.weight_decay", self.weight_decay, allow_zero=True)
    _positive("OptimConfig.clip_norm", self.clip_norm, allow_zero=True)
    _positive("OptimConfig.grad_accum_steps", self.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 fills the remaining devices (at most one -1)."""

  data: int = -1  # pure data parallelism
  fsdp: int = 1  # parameter + optimizer sharding (ZeRO-3 style) over the batch
  expert: int = 1  # expert parallelism: experts split across this axis (batch also split)
  tensor: int = 1  # tensor (model) parallelism over heads / hidden
  rules: str = "data_parallel"  # logical-axis rule preset name (see openmoe_jax.sharding.RULES)
  # Use only this process's first N devices (single-process runs, e.g. one GPU of a shared
  # machine, or an in-process test run on 1 of 8 fake CPU devices); 0 = every device.
  num_devices: int = 0

  def __post_init__(self):
    _positive("MeshConfig.num_devices", self.num_devices, allow_zero=True)
    sizes = (self.data, self.fsdp, self.expert, self.tensor)
    _check(sum(s == -1 for s in sizes) <= 1, f"MeshConfig sizes {sizes}: at most one -1")
    _check(all(s == -1 or s >= 1 for s in sizes),
           f"MeshConfig sizes {sizes}: each must be >= 1 or -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training loop: length, batch, evaluation, checkpointing and logging."""

  steps: int = 300  # optimiser steps
  batch_size: int = 16  # global batch (sequences) per optimiser step
  seq_len: int = 256  # tokens per sequence
  seed: int = 0  # parameter init seed
  eval_every: int = 100  # steps between evaluations; 0 = only at the end
  eval_batches: int = 4  # batches per evaluation
  checkpoint_every: int = 100  # steps between checkpoints; 0 = only at the end
  keep_checkpoints: int = 2  # keep the last K checkpoints
  log_every: int = 10  # steps between scalar logs
  sample_prompt: str = "def "  # prompt for the end-of-run sample written to the workdir
  sample_tokens: int = 48  # tokens sampled at the end of the run; 0 = no sample
  sample_temperature: float = 0.8  # 0 = greedy (a short run's greedy text loops)
  sample_top_p: float = 0.95  # nucleus sampling of the end-of-run sample; 1 = off
  sample_seed: int = 0  # PRNG seed of the end-of-run sample
  stop_after: int = 0  # stop (as if killed) after this step, for resume tests; 0 = never

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints",
                 "eval_batches"):
      _positive(f"TrainConfig.{name}", getattr(self, name))
    for name in ("eval_every", "checkpoint_every", "sample_tokens", "stop_after"):
      _positive(f"TrainConfig.{name}", getattr(self, name), allow_zero=True)
    _check(self.sample_temperature >= 0,
           f"TrainConfig.sample_temperature must be >= 0, got {self.sample_temperature}")
    _check(0 < self.sample_top_p <= 1,
           f"TrainConfig.sample_top_p must be in (0, 1], got {self.sample_top_p}")

