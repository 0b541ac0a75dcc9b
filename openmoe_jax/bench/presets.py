"""Model presets the train-step benchmark can run: the registries of `PRESET_MODULES` plus
always-available built-in shapes (CI runs those before / without the registries)."""
from __future__ import annotations

import importlib
from typing import Any

from openmoe_jax.config import ModelConfig, MoeConfig

# Always-available shapes, so the benchmark runs in CI before / without the preset registries.
BUILTIN_PRESETS: dict[str, Any] = {
    "bench-tiny-dense": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, d_ff=128, max_seq_len=128),
    "bench-tiny-moe": ModelConfig(
        vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=128,
        moe=MoeConfig(num_experts=4, top_k=2, d_expert=64, layer_period=2, layer_offset=1)),
}


def moeut_244m_standin() -> ModelConfig:
  """MoEUT-244M's shape (official profiles.py MoEUT_244M: d_model 1024, 18 layers, group size 2,
  4 heads of 128, 387 sigma-MoE experts of 128 with k=16, ReLU, peri-LN; vocabulary 8000 as in
  the paper) with plain dense attention of the same heads instead of SwitchHead: isolates the
  sigma-MoE FFN. The full model is the `moeut-244m` preset."""
  return ModelConfig(
      vocab_size=8000, d_model=1024, n_layers=18, n_heads=4, head_dim=128, d_ff=128,
      activation="relu", max_seq_len=1024, rope_fraction=0.5, n_shared_groups=2,
      norm_scheme="peri",
      moe=MoeConfig(num_experts=387, top_k=16, d_expert=128, router="sigma", activation="relu",
                    dropless=True, dispatch="gmm", load_balance_weight=0.0, z_loss_weight=0.0,
                    entropy_weight=0.01))


BUILTIN_PRESETS["bench-moeut-244m"] = moeut_244m_standin  # type: ignore[assignment]
# Modules whose module-level upper-case dicts of name -> ModelConfig (or a callable returning one, or an
# object with a `.model` ModelConfig) are searched for presets, in order.
PRESET_MODULES = ("openmoe_jax.presets", "openmoe_jax.presets_moeut")


# ----------------------------------------------------------------------------- presets

def _as_model_config(value: Any) -> ModelConfig | None:
  if isinstance(value, ModelConfig):
    return value
  model = getattr(value, "model", None)
  if isinstance(model, ModelConfig):
    return model
  return None


def available_presets() -> dict[str, Any]:
  """name -> ModelConfig, a factory, or a bundle with `.model`, from PRESET_MODULES + builtins."""
  found: dict[str, Any] = {}
  for mod_name in PRESET_MODULES:
    try:
      mod = importlib.import_module(mod_name)
    except ImportError:  # not written yet, or needs a package the device image lacks
      continue
    for attr_name, attr in vars(mod).items():
      if attr_name.startswith("_") or not attr_name.isupper():
        continue  # registries are module constants (PRESETS), not __builtins__ and the like
      if isinstance(attr, dict) and attr and all(isinstance(k, str) for k in attr):
        for name, value in attr.items():
          if _as_model_config(value) is not None or callable(value):
            found.setdefault(name, value)
  for name, cfg in BUILTIN_PRESETS.items():
    found.setdefault(name, cfg)
  return found


def resolve_preset(name: str) -> ModelConfig:
  presets = available_presets()
  if name not in presets:
    raise ValueError(f"--preset={name!r} is unknown; available: {sorted(presets)}")
  value = presets[name]
  cfg = _as_model_config(value)
  if cfg is None and callable(value):
    cfg = _as_model_config(value())
  if cfg is None:
    raise ValueError(f"preset {name!r} gives {type(value).__name__}, not a ModelConfig")
  return cfg
