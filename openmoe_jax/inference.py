"""Load a trained workdir and complete text prompts (used by launch/sample.py and the notebook)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
from flax import nnx

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import generate
from openmoe_jax import train_step as ts
from openmoe_jax.config import DataConfig, ModelConfig


@dataclasses.dataclass
class Session:
  """A model (graph definition + parameters) with the vocabulary it was trained with."""
  graphdef: Any
  params: Any
  data: DataConfig
  step: int

  @property
  def vocab(self) -> Any:
    from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.get_vocabulary(self.data)

  @property
  def model(self) -> Any:
    return nnx.merge(self.graphdef, self.params)

  def encode(self, text: str) -> list[int]:
    return list(self.vocab.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    from openmoe_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
    return vocab_lib.decode(self.vocab, list(ids))

  def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               prefix_lm: bool | None = None) -> list[str]:
    """Continuations of each prompt.

    prefix_lm: attend over the prompt bidirectionally, as UL2 training does over its inputs.
    None = as the model was trained: bidirectional after UL2 (DataConfig.ul2), causal after
    plain causal-LM training (and for converted MoEUT checkpoints), which never saw a
    bidirectional prefix.
    """
    from openmoe_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
    cfg = generate.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens,
                                  stop_tokens=(vocab_lib.eos_id(self.vocab),),
                                  prefix_lm=self.data.ul2 if prefix_lm is None else prefix_lm)
    outs = generate.generate(self.graphdef, self.params, [self.encode(p) for p in prompts], cfg,
                             jax.random.PRNGKey(seed))
    return [self.decode([t for t in ids if t != vocab_lib.eos_id(self.vocab)]) for ids in outs]


def load_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def model_and_data(config: dict[str, Any]) -> tuple[ModelConfig, DataConfig]:
  """The ModelConfig and DataConfig of a workdir's config.json (as `load_config` reads it)."""
  from openmoe_jax import train  # pylint: disable=import-outside-toplevel
  data_fields = dict(config["data"])
  data_fields["text_files"] = tuple(data_fields.get("text_files", ()))
  return train.model_config_from_dict(config["model"]), DataConfig(**data_fields)


def load(workdir: str, step: int | None = None) -> Session:
  """Restores the parameters of the latest (or given) checkpoint of a training workdir."""
  model_cfg, data_cfg = model_and_data(load_config(workdir))
  abstract = nnx.eval_shape(lambda: ts.build_model(model_cfg, 0))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, abstract_params)
  directory = os.path.join(workdir, "checkpoints")
  params, restored_step = ckpt_lib.restore_params(directory, abstract_params, shardings, step)
  return Session(graphdef, params, data_cfg, restored_step)
