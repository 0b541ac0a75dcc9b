"""MoE feed-forward layer: router -> dispatch -> experts [E, D, F] -> combine, + shared experts.

Three dispatch backends compute the same function (tests/test_moe.py checks forward and
gradient agreement):
  "einsum": T5X one-hot dispatch / combine tensors [G, S, E, C] and dense expert einsums
            (needs a capacity; dropless uses C = S);
  "ragged": kept (token, expert) assignments sorted by expert, `jax.lax.ragged_dot`, then the
            outputs un-permuted to [T, K, D] by a gather and summed with the gates (dropless or
            with capacity; expert choice combines by scatter-add);
  "gmm":    the same with `openmoe_jax.kernels.gmm.gmm` (fused row gather, custom_vjp); for
            token choice the gates are folded into the hidden rows and the output matmul is
            fused with the K-sum (`grouped.gmm_sum`).
With a capacity, the ragged / gmm backends process exactly the assignments the einsum backend
keeps, so dropped tokens get 0 from the experts on every backend; the block's residual passes
them through unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from openmoe_jax import axes as ax
from openmoe_jax import grouped
from openmoe_jax import layers
from openmoe_jax import router as router_lib
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig, MoeConfig

Aux = dict[str, Any]


def expert_width(cfg: ModelConfig) -> int:
  """F of one routed (and shared) expert."""
  return cfg.moe.d_expert or cfg.d_ff


def groups(num_tokens: int, seq_len: int, moe: MoeConfig) -> tuple[int, int]:
  """(G, S) for routing: one group per sequence, or `moe.group_size` tokens per group."""
  s = moe.group_size or seq_len
  if num_tokens % s:
    raise ValueError(f"MoeConfig.group_size={moe.group_size} does not divide the {num_tokens} "
                     "tokens of the batch")
  return num_tokens // s, s


@dataclasses.dataclass(frozen=True)
class GatedActivation:
  """Expert rows [M, F or 2F] -> activation(rows) * gate[:, None] (a hashable prologue for
  `grouped.gmm_sum`); `split` = F for gated activations (gate and up halves), else 0."""
  activation: str
  split: int

  def __call__(self, in_MF: jax.Array, gate_M: jax.Array) -> jax.Array:
    f = self.split
    gate_MF, up_MF = (in_MF, None) if not f else (in_MF[:, :f], in_MF[:, f:])
    h_MF = layers.activate(self.activation, gate_MF, up_MF)
    return (h_MF.astype(jnp.float32) * gate_M[:, None]).astype(h_MF.dtype)


@dataclasses.dataclass(frozen=True)
class GateRows:
  """Expert rows [M, F] -> rows * gate[:, None] (a hashable prologue for `grouped.gmm_sum`,
  for rows whose activation is already applied)."""

  def __call__(self, h_MF: jax.Array, gate_M: jax.Array) -> jax.Array:
    return (h_MF.astype(jnp.float32) * gate_M[:, None]).astype(h_MF.dtype)


_GLU = {"swiglu": "silu", "geglu": "gelu"}  # gated activation -> gmm_glu's activation


class MoeFFN(nnx.Module):
  """Routed experts (SwiGLU / GeGLU / ReLU / GELU) with optional always-on shared experts."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std_scale: float = 1.0):
    if cfg.moe is None:
      raise ValueError("MoeFFN needs ModelConfig.moe (got None)")
    self.cfg, self.moe = cfg, cfg.moe
    self.dtype = layers.dtype_of(cfg.dtype)
    d, e, f = cfg.d_model, cfg.moe.num_experts, expert_width(cfg)
    std, pdt = cfg.init_std, cfg.param_dtype
    # MoEUT gives every expert's selection vector the same norm (renorm_keep_std).
    router_init = (layers.renormed_normal(std, axis=0) if cfg.init_scheme == "moeut"
                   else layers.normal(std))
    self.w_router_DE = layers.param(rngs, router_init, (d, e), (ax.EMBED, None), pdt)
    self.w_gate_EDF = layers.param(rngs, layers.normal(std),
                                   (e, d, layers.gate_width(cfg.moe.activation, f)),
                                   (ax.EXPERT, ax.EMBED, ax.EXPERT_MLP), pdt)
    self.w_up_EDF = (layers.param(rngs, layers.normal(std), (e, d, f),
                                  (ax.EXPERT, ax.EMBED, ax.EXPERT_MLP), pdt)
                     if layers.is_gated(cfg.moe.activation) else None)
    self.w_out_EFD = layers.param(rngs, layers.normal(std * out_std_scale), (e, f, d),
                                  (ax.EXPERT, ax.EXPERT_MLP, ax.EMBED), pdt)
    # n shared experts of width F == one dense MLP of width n*F (their outputs are summed).
    n_shared = cfg.moe.num_shared_experts
    self.shared = (layers.MLP(dataclasses.replace(cfg, activation=cfg.moe.activation), rngs,
                              d_ff=n_shared * f, out_std_scale=out_std_scale)
                   if n_shared else None)

  # ------------------------------------------------------------------ routing

  def route(self, r_GSD: jax.Array, mask_GS: jax.Array, *, deterministic: bool,
            rng: jax.Array | None) -> tuple[router_lib.Routing, int, jax.Array]:
    """(routing, capacity C, float32 logits [G, S, E]) for router input r_GSD."""
    m = self.moe
    _, s, _ = r_GSD.shape
    train_rng = None if deterministic else rng
    jitter_rng = drop_rng = None
    if train_rng is not None:
      jitter_rng, drop_rng = jax.random.split(train_rng)
    logits_GSE = router_lib.router_logits(r_GSD, self.w_router_DE[...], jitter=m.jitter,
                                          rng=jitter_rng, dtype=m.router_dtype)
    cf = m.capacity_factor_eval if deterministic else m.capacity_factor_train
    if m.router == "expert_choice":
      if cf <= 0:
        raise ValueError(f"expert_choice routing needs a capacity factor > 0; got {cf}")
      c = router_lib.expert_capacity(s, m.num_experts, m.top_k, cf, m.min_capacity)
      return router_lib.expert_choice_routing(logits_GSE, mask_GS, capacity=c), c, logits_GSE
    dropless = m.dropless or cf <= 0
    c = router_lib.expert_capacity(s, m.num_experts, m.top_k, -1.0 if dropless else cf,
                                   m.min_capacity)
    select = None
    if m.expert_dropout > 0 and drop_rng is not None:
      select = jax.random.uniform(drop_rng, logits_GSE.shape) >= m.expert_dropout
    routing = router_lib.top_k_routing(
        logits_GSE, mask_GS, top_k=m.top_k, capacity=None if dropless else c,
        gate="sigmoid" if m.router == "sigma" else "softmax", renormalize=m.renormalize,
        batch_prioritized=m.batch_prioritized, selection_mask_GSE=select)
    return routing, c, logits_GSE

  def metrics(self, logits_GSE: jax.Array, mask_GS: jax.Array, routing: router_lib.Routing,
              batch: int) -> Aux:
    m = self.moe
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    load_E = router_lib.expert_load(routing, m.num_experts)  # once per layer
    lb = router_lib.load_balance_loss(probs_GSE, routing, mask_GS, load_E)
    z = router_lib.z_loss(logits_GSE, mask_GS)
    # Per sequence (routing groups need not be sequences), as MoEUT does.
    ent = router_lib.entropy_regularizer(logits_GSE.reshape(batch, -1, logits_GSE.shape[-1]),
                                         mask_GS.reshape(batch, -1))
    # MoEUT adds one entropy term per sigma-MoE module, its repeats pooled: each application
    # here gets weight / repeats (their mean), as SwitchHead's does.
    repeats = self.cfg.n_layers // self.cfg.n_shared_groups if self.cfg.n_shared_groups else 1
    # Terms with weight 0 stay out of the loss, so the backward (and a rematerialised forward)
    # never recomputes them; they are still reported.
    terms = ((m.load_balance_weight, lb), (m.z_loss_weight, z),
             (m.entropy_weight / repeats, ent))
    aux_loss = sum((w * v for w, v in terms if w), jnp.zeros((), jnp.float32))
    return {
        "aux_loss": aux_loss,
        "load_balance_loss": lb,
        "z_loss": z,
        "entropy_loss": ent,
        "router_entropy": router_lib.router_entropy(logits_GSE, mask_GS),
        "dropped_fraction": router_lib.dropped_fraction(
            routing, mask_GS, expert_choice=m.router == "expert_choice"),
        "expert_load_E": load_E,
    }

  # ------------------------------------------------------------------ experts

  def _weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    dt = self.dtype
    up = None if self.w_up_EDF is None else self.w_up_EDF[...].astype(dt)
    return self.w_gate_EDF[...].astype(dt), up, self.w_out_EFD[...].astype(dt)

  def _einsum(self, x_GSD: jax.Array, routing: router_lib.Routing, c: int) -> jax.Array:
    g, s, _ = x_GSD.shape
    w_gate, w_up, w_out = self._weights()
    dispatch_GSEC, combine_GSEC = router_lib.dispatch_combine(routing, s, self.moe.num_experts, c)
    x_EGCD = jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC.astype(self.dtype), x_GSD)
    buf = (ax.ACT_EXPERT, ax.ACT_EXPERT_GROUP, None, ax.ACT_EMBED)
    x_EGCD = sharding.constrain(x_EGCD, buf)
    gate_EGCF = jnp.einsum("EGCD,EDF->EGCF", x_EGCD, w_gate)
    up_EGCF = None if w_up is None else jnp.einsum("EGCD,EDF->EGCF", x_EGCD, w_up)
    h_EGCF = layers.activate(self.moe.activation, gate_EGCF, up_EGCF)
    h_EGCF = sharding.constrain(h_EGCF, (ax.ACT_EXPERT, ax.ACT_EXPERT_GROUP, None, ax.ACT_MLP))
    out_EGCD = sharding.constrain(jnp.einsum("EGCF,EFD->EGCD", h_EGCF, w_out), buf)
    y_GSD = jnp.einsum("EGCD,GSEC->GSD", out_EGCD.astype(jnp.float32), combine_GSEC)
    return y_GSD

  def _token_choice_k(self, routing: router_lib.Routing, s: int) -> int:
    """top_k when the routing is token choice in top_k_routing's k-major layout (each token
    exactly k times, once per block of S assignments), else 0."""
    k = self.moe.top_k
    layout = self.moe.router != "expert_choice" and routing.token_GA.shape[1] == k * s
    return k if layout else 0

  def _sorted(self, x_GSD: jax.Array, routing: router_lib.Routing, backend: str) -> jax.Array:
    """Ragged / gmm backends: kept assignments sorted by expert, grouped matmuls, combine.

    Lean path (no [M, E] one-hots, no float32 [M, D] buffers): the order is one stable sort of
    the flat ids (dropped ones last) and the group sizes are read off it, gmm reads
    x through its fused row gather, and for token choice the [M, D] outputs are un-permuted
    into [T, K, D] by a gather (inverse permutation; its VJP is the opposite gather) and
    summed over K with the gates. Expert choice (a token may have 0..E assignments) keeps a
    scatter-add combine.
    """
    g, s, d = x_GSD.shape
    e, k = self.moe.num_experts, self.moe.top_k
    a = routing.token_GA.shape[1]
    m = g * a
    w_gate, w_up, w_out = self._weights()
    x_TD = x_GSD.reshape(g * s, d)
    token_M = (routing.token_GA + s * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)
    kept_M = routing.kept_GA.reshape(-1)
    weight_M = routing.combine_weight_GA().reshape(-1)  # float32, 0 where dropped
    key_M = jnp.where(kept_M, routing.expert_GA.reshape(-1), e).astype(jnp.int32)
    order_M, sizes_E = grouped.order_and_sizes(key_M, e, e + 1)  # sentinel e not counted
    tok_sorted_M = token_M[order_M]
    kept_sorted_M = kept_M[order_M]

    token_choice = self._token_choice_k(routing, s) > 0
    if token_choice:
      # Assignment a = j * S + p holds choice j of one token (k-major, see top_k_routing), so
      # tk = token * K + j is a permutation of [T * K]; row_TK: sorted row of (token, choice).
      j_M = jnp.tile(jnp.arange(a, dtype=jnp.int32) // s, g)
      tk_sorted_M = tok_sorted_M * k + j_M[order_M]
      row_TK = checkpoint_name(jnp.zeros((m,), jnp.int32).at[tk_sorted_M].set(
          jnp.arange(m, dtype=jnp.int32), unique_indices=True), "routing")
      # The sorted row of assignment i is row_TK[its tk]: the inverse of order_M, so the
      # gates are permuted with a gather-backward (no float32 scatter-add over M).
      inv_order_M = row_TK[token_M * k + j_M]
      weight_sorted_M = grouped.permute_rows(weight_M[:, None], order_M, inv_order_M)[:, 0]
    else:
      weight_sorted_M = weight_M[order_M]

    # Gate and up projections as one grouped matmul over [E, D, 2F]: x is gathered once, and
    # the gmm backward scatters one [M, D] row gradient instead of two. f: the gate's width.
    f = w_gate.shape[2]
    w_in = w_gate if w_up is None else jnp.concatenate([w_gate, w_up], axis=2)
    if backend == "ragged":
      if token_choice:
        x_MD = grouped.gather_rows(x_TD, tok_sorted_M, row_TK.reshape(g * s, k))
      else:
        x_MD = x_TD[tok_sorted_M]
      in_MF = jax.lax.ragged_dot(x_MD, w_in, sizes_E)
      mm_out = lambda h_MF: jax.lax.ragged_dot(h_MF, w_out, sizes_E)
    elif token_choice and self.moe.fused_glu:
      # Rows gathered once ([M, D]), then one call that writes act(gate) * up only.
      x_MD = grouped.gather_rows(x_TD.astype(w_in.dtype), tok_sorted_M, row_TK.reshape(g * s, k))
      h_MF = checkpoint_name(grouped.kernels_gmm().gmm_glu(
          x_MD, w_in, sizes_E, activation=_GLU[self.moe.activation],
          backend=self.moe.gmm_backend), "routed_hidden")
      y_TD = grouped.gmm_sum((h_MF, weight_sorted_M), w_out, sizes_E,
                             row_TK.reshape(g * s, k), tok_sorted_M, self.moe.gmm_backend,
                             prologue=GateRows())
      return y_TD.reshape(g, s, d)
    else:
      gmm_lib = grouped.kernels_gmm()
      # Token choice: token t is used at sorted rows row_TK[t], so the x gradient is a
      # gather-and-sum of those K rows (no float32 scatter-add).
      in_MF = checkpoint_name(gmm_lib.gmm(
          x_TD, w_in, sizes_E, backend=self.moe.gmm_backend, row_index=tok_sorted_M,
          row_positions=row_TK.reshape(g * s, k) if token_choice else None), "routed_hidden")
      mm_out = lambda h_MF: gmm_lib.gmm(h_MF, w_out, sizes_E, backend=self.moe.gmm_backend)
    if token_choice and backend == "gmm":
      # Gates folded into the narrow hidden rows (0 for dropped ones), then the output matmul
      # fused with the K-sum: no [M, D] tensor is kept for, or formed in, the backward. The
      # activation runs as gmm_sum's prologue, so its [M, F] output is recomputed in the
      # backward from in_MF (kept anyway) instead of being kept too.
      prologue = GatedActivation(self.moe.activation, 0 if w_up is None else f)
      y_TD = grouped.gmm_sum((in_MF, weight_sorted_M), w_out, sizes_E,
                             row_TK.reshape(g * s, k), tok_sorted_M, self.moe.gmm_backend,
                             prologue=prologue)
      return y_TD.reshape(g, s, d)
    gate_MF, up_MF = (in_MF, None) if w_up is None else (in_MF[:, :f], in_MF[:, f:])
    h_MF = layers.activate(self.moe.activation, gate_MF, up_MF)
    out_MD = mm_out(h_MF)  # compute dtype, sorted by expert

    if token_choice:
      out_TKD = grouped.permute_rows(out_MD, row_TK, tk_sorted_M).reshape(g * s, k, d)
      w_TK = weight_sorted_M[row_TK].reshape(g * s, k)
      kept_TK = kept_sorted_M[row_TK].reshape(g * s, k)
      # Rows of dropped assignments lie outside every group: exact zeros (no NaN * 0). The
      # product and the K-sum fuse with the gather; nothing [M, D] in float32 is stored.
      y_TD = jnp.sum(jnp.where(kept_TK[..., None],
                               out_TKD.astype(jnp.float32) * w_TK[..., None], 0.0), axis=1)
    else:
      out_MD = jnp.where(kept_sorted_M[:, None],
                         out_MD.astype(jnp.float32) * weight_sorted_M[:, None], 0.0)
      y_TD = jnp.zeros((g * s, d), jnp.float32).at[tok_sorted_M].add(out_MD)
    return y_TD.reshape(g, s, d)

  # ------------------------------------------------------------------ call

  def __call__(self, x_BLD: jax.Array, *, router_input_BLD: jax.Array | None = None,
               token_mask_BL: jax.Array | None = None, rng: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    """y [B, L, D] (cfg.dtype) and the aux dict (losses and router metrics, see CONTRACTS.md).

    Experts read `x_BLD`; the router reads `router_input_BLD` if given (MoEUT peri-LN), else x.
    Tokens with token_mask_BL == 0 are not routed, take no capacity and get 0 from the experts.
    """
    b, l, d = x_BLD.shape
    g, s = groups(b * l, l, self.moe)
    x_BLD = sharding.constrain(x_BLD.astype(self.dtype), (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    r_BLD = x_BLD if router_input_BLD is None else router_input_BLD
    mask_BL = jnp.ones((b, l), jnp.int32) if token_mask_BL is None else token_mask_BL
    x_GSD, mask_GS = x_BLD.reshape(g, s, d), mask_BL.reshape(g, s)
    routing, c, logits_GSE = self.route(r_BLD.reshape(g, s, d), mask_GS,
                                        deterministic=deterministic, rng=rng)
    dispatch = self.moe.dispatch
    if dispatch == "einsum":
      y_GSD = self._einsum(x_GSD, routing, c)
    elif dispatch in ("ragged", "gmm"):
      y_GSD = self._sorted(x_GSD, routing, dispatch)
    elif dispatch == "shard_map":  # dropless expert parallelism: all-to-all around gmm
      from openmoe_jax import expert_parallel  # pylint: disable=import-outside-toplevel
      w_gate, w_up, w_out = self._weights()
      y_GSD = expert_parallel.moe_ffn(x_GSD, routing.token_GA, routing.expert_GA,
                                      routing.kept_GA, routing.gate_GA, w_gate, w_up, w_out,
                                      activation=self.moe.activation,
                                      gmm_backend=self.moe.gmm_backend,
                                      exchange=self.moe.exchange,
                                      slack=self.moe.exchange_slack,
                                      chunks=self.moe.exchange_chunks,
                                      top_k=self._token_choice_k(routing, s))
    else:
      raise ValueError(f"MoeConfig.dispatch={dispatch!r}; expected einsum, ragged or gmm")
    y_BLD = y_GSD.reshape(b, l, d).astype(self.dtype)
    if self.shared is not None:
      y_BLD = y_BLD + self.shared(x_BLD).astype(self.dtype)
    y_BLD = checkpoint_name(sharding.constrain(y_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED)),
                            "routed_out")
    return y_BLD, self.metrics(logits_GSE, mask_GS, routing, b)
