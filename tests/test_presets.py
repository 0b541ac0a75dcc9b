"""Presets: gin files == Python constructors; analytical parameter counts == built model; the
published totals (printed as a table) and the tiny dense/MoE active-parameter match."""
import dataclasses
import math
import os

import gin
import pytest
from flax import nnx

from openmoe_jax import gin_setup, params, presets, transformer
from openmoe_jax.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with_vocab(cfg: ModelConfig) -> ModelConfig:
  return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=512)


def _built_counts(cfg: ModelConfig) -> int:
  model = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))  # allocates nothing
  return sum(math.prod(p.shape) for p in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture
def fresh_gin():
  gin_setup.register()
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_gin_file_equals_preset(name, fresh_gin):
  path = os.path.join("models", presets.gin_file(name))
  assert os.path.exists(os.path.join(REPO, "gin", path))
  gin_setup.parse([path])
  assert gin_setup.configured("ModelConfig")() == presets.PRESETS[name]()


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_analytical_count_equals_built_model(name):
  cfg = _with_vocab(presets.get(name))
  assert params.count_params(cfg)["total"] == _built_counts(cfg)


def test_counts_with_layer_sharing_and_tied_embeddings():
  cfg = dataclasses.replace(_with_vocab(presets.get("tiny-openmoe")), n_shared_groups=2,
                            tie_embeddings=True)
  assert params.count_params(cfg)["total"] == _built_counts(cfg)


@pytest.mark.parametrize("name", ["tiny-openmoe", "moeut-tiny", "umoe-tiny"])
def test_counts_with_layer_norms_and_head_bias(name):
  cfg = dataclasses.replace(_with_vocab(presets.get(name)), norm_type="layer", head_bias=True)
  assert params.count_params(cfg)["total"] == _built_counts(cfg)


def test_published_totals(capsys):
  rows = []
  for name, (pub_total, pub_active, source) in presets.PUBLISHED.items():
    cfg = presets.get(name)
    ours = params.count_params(cfg)
    rows.append(f"{name:14s} total {ours['total'] / 1e6:10.1f}M (published "
                f"{pub_total / 1e6:8.1f}M)  active {ours['active'] / 1e6:8.1f}M (published "
                f"{'-' if pub_active is None else f'{pub_active / 1e6:.1f}M'})  [{source}]")
    # OpenMoE's published "8B"/"34B" are rounded model names, and they (and the 637M of
    # openmoe-base, roughly) count its MLPs as Llama SwiGLU: with OpenMoE's real 2F-wide gates
    # (its checkpoints' wi_0) the models have 11.9B / 46.3B parameters (see presets.py).
    # open_lm: "1.1B" has two significant digits, "509.2M" four (ours lacks only the
    # megablocks per-layer output bias).
    if cfg.activation == "openmoe_swiglu":
      cfg = dataclasses.replace(cfg, activation="swiglu",
                                moe=dataclasses.replace(cfg.moe, activation="swiglu"))
    tol = 0.05 if name == "open_lm-moe" else 0.2
    assert abs(params.count_params(cfg)["total"] / pub_total - 1) < tol, name
    if pub_active is not None:
      assert abs(ours["active"] / pub_active - 1) < 1e-3, name
  with capsys.disabled():
    print("\n" + "\n".join(rows))


def test_tiny_dense_matches_tiny_openmoe_active_params():
  moe_counts = params.count_params(_with_vocab(presets.get("tiny-openmoe")))
  dense_counts = params.count_params(_with_vocab(presets.get("tiny-dense")))
  assert moe_counts["active"] == dense_counts["active"] == dense_counts["total"]
  assert moe_counts["total"] > 2 * dense_counts["total"]


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset"):
    presets.get("nope")
