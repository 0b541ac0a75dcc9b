"""The train state, its sharded initialisation, and the pure `train_step` / `eval_step`.

The state is a plain pytree {"step", "params", "opt_state", "rng"}; the model's graph definition
stays static, so `train_step(state, batch) -> (state, metrics)` is one pure function that is
jitted once with explicit shardings and a donated state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openmoe_jax import chunked_loss
from openmoe_jax import losses
from openmoe_jax import optimizer as optim_lib
from openmoe_jax import sharding
from openmoe_jax import transformer
from openmoe_jax.config import ModelConfig, OptimConfig

State = dict[str, Any]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run's step functions."""
  model_cfg: ModelConfig
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: sharding.Rules
  state_shardings: Any
  grad_accum_steps: int = 1


def build_model(cfg: ModelConfig, seed: int) -> transformer.Transformer:
  return transformer.Transformer(cfg, nnx.Rngs(params=seed))


def make_setup(model_cfg: ModelConfig, optim_cfg: OptimConfig, total_steps: int, seed: int,
               mesh: Mesh, rules: sharding.Rules) -> Setup:
  """Traces the model abstractly (no allocation) and derives the state shardings."""
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, seed))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  tx = optim_lib.make(optim_cfg, total_steps)
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "opt_state": jax.eval_shape(tx.init, abstract_params),
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  return Setup(model_cfg, graphdef, tx, mesh, rules, shardings, optim_cfg.grad_accum_steps)


def init_state(setup: Setup, seed: int) -> State:
  """Initialises parameters and optimizer state directly into their shardings."""

  def init() -> State:
    params = nnx.state(build_model(setup.model_cfg, seed), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.tx.init(params), "rng": jax.random.PRNGKey(seed + 1)}

  with sharding.activate(setup.mesh, setup.rules):
    return jax.jit(init, out_shardings=setup.state_shardings)()


def _forward_sums(setup: Setup, params: Any, batch: Batch, rng: jax.Array | None,
                  deterministic: bool, for_grad: bool = False
                  ) -> tuple[dict[str, jax.Array], Any]:
  """Loss sums of one batch; "objective_sum" (loss + z-loss) is the one to differentiate.

  With ModelConfig.loss_chunk_len the model stops at the hidden states and the head runs
  chunk by chunk (`chunked_loss`): for a gradient (`for_grad`) in the fused form that forms
  each chunk's gradient in the forward, else as a plain chunked forward."""
  cfg = setup.model_cfg
  model = nnx.merge(setup.graphdef, params)
  x_BLD, aux, _ = model(batch["decoder_input_tokens"],
                        positions_BL=batch["decoder_positions"],
                        segment_ids_BL=batch["decoder_segment_ids"],
                        prefix_BL=batch["decoder_causal_attention"],
                        rng=rng, deterministic=deterministic, return_hidden=True)
  targets_BL, weights_BL = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  if for_grad and chunked_loss.num_chunks(x_BLD.shape[1], cfg.loss_chunk_len) > 1:
    objective, sums = chunked_loss.fused_chunked_objective(
        functools.partial(transformer.head_logits, cfg), x_BLD, model.head_weight(),
        targets_BL, weights_BL, cfg.loss_chunk_len, cfg.z_loss)
  else:
    weight = model.head_weight()
    sums = chunked_loss.chunked_cross_entropy(
        x_BLD, lambda h_BLD: transformer.head_logits(cfg, h_BLD, weight), targets_BL,
        weights_BL, cfg.loss_chunk_len, cfg.z_loss)
    objective = sums["loss_sum"] + sums["z_loss_sum"]
  sums = {**sums, "objective_sum": objective, "aux_loss": transformer.total_aux_loss(aux)}
  return sums, aux


def train_step(setup: Setup, state: State, batch: Batch) -> tuple[State, dict[str, Any]]:
  """One optimiser step over `grad_accum_steps` micro-batches; metrics are device arrays."""
  n_micro = setup.grad_accum_steps
  total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)
  step_rng = jax.random.fold_in(state["rng"], state["step"])

  def objective(params, micro, rng):
    sums, aux = _forward_sums(setup, params, micro, rng, deterministic=False, for_grad=True)
    value = sums["objective_sum"] / total_weight + sums["aux_loss"] / n_micro
    return value, (sums, aux)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if n_micro == 1:
    (_, (sums, aux)), grads = grad_fn(state["params"], batch, step_rng)
  else:
    micro_batches = jax.tree.map(
        lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      micro, i = xs
      (_, (sums_i, aux_i)), grads_i = grad_fn(state["params"], micro,
                                             jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, carry, (grads_i, sums_i, aux_i)), None

    (_, (sums_shape, aux_shape)), grads_shape = jax.eval_shape(
        grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro_batches), step_rng)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        (grads_shape, sums_shape, aux_shape))
    (grads, sums, aux), _ = jax.lax.scan(accumulate, init,
                                         (micro_batches, jnp.arange(n_micro)))
    aux = jax.tree.map(lambda a: a / n_micro, aux)
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "rng": state["rng"]}
  metrics = {**losses.summarize(sums), "aux_loss": sums["aux_loss"] / n_micro,
             "z_loss": sums["z_loss_sum"] / total_weight,
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
             "moe": aux}
  return new_state, metrics


def eval_step(setup: Setup, params: Any, batch: Batch, with_aux: bool = False) -> Any:
  """Weighted sums for one evaluation batch (deterministic routing, eval capacity); with
  `with_aux`, (sums, the model's MoE statistics)."""
  sums, aux = _forward_sums(setup, params, batch, None, deterministic=True)
  return (sums, aux) if with_aux else sums


def batch_shardings(setup: Setup, batch_spec: dict[str, Any]) -> dict[str, NamedSharding]:
  return {k: sharding.batch_sharding(setup.mesh, len(v.shape)) for k, v in batch_spec.items()}


def jit_train_step(setup: Setup, batch_spec: dict[str, Any]) -> Callable[[State, Batch], Any]:
  """`train_step` jitted with explicit in/out shardings and the state donated."""
  replicated = NamedSharding(setup.mesh, P())

  def step(state, batch):
    with sharding.activate(setup.mesh, setup.rules):
      return train_step(setup, state, batch)

  return jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings(setup, batch_spec)),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))

