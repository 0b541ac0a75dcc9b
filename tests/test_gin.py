"""Every gin file parses, respects the include rules, and builds what it configures."""
import glob
import os
import re

import gin
import pytest
from flax import nnx

from openmoe_jax import gin_setup, train_step
from openmoe_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, os.path.join(REPO, "gin"))
               for p in glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True))
KINDS = {"models": ModelConfig, "data": DataConfig, "runs": TrainConfig, "sharding": MeshConfig}


def _includes(rel):
  with open(os.path.join(REPO, "gin", rel), encoding="utf-8") as f:
    return re.findall(r"^include\s+'([^']+)'", f.read(), flags=re.M)


@pytest.fixture(autouse=True)
def _fresh_gin():
  gin_setup.register()
  gin.clear_config()
  yield
  gin.clear_config()


def test_there_are_gin_files():
  assert any(f.startswith("experiments/") for f in FILES)


@pytest.mark.parametrize("rel", FILES)
def test_include_rules(rel):
  kind = rel.split("/")[0]
  incs = _includes(rel)
  if kind != "experiments":
    assert not incs, f"{rel}: only experiments may include"
    return
  dirs = [i.split("/")[0] for i in incs]
  assert len(dirs) == len(set(dirs)), f"{rel} includes two files of one folder"
  for inc in incs:
    assert inc in FILES and not _includes(inc), f"{rel}: include depth > 2 via {inc}"
  with open(os.path.join(REPO, "gin", rel), encoding="utf-8") as f:
    head = f.read(600)
  assert "python launch/train.py" in head and "Expected" in head, f"{rel}: no command/expectation"


@pytest.mark.parametrize("rel", [f for f in FILES if f.split("/")[0] in KINDS])
def test_component_file_builds(rel):
  gin_setup.parse([rel])
  cls = KINDS[rel.split("/")[0]]
  built = gin_setup.configured(cls.__name__)()
  assert isinstance(built, cls)
  if cls is ModelConfig and built.vocab_size == 0:
    built = ModelConfig(**{**built.__dict__, "vocab_size": 2048})
  if cls is ModelConfig:  # abstract build: shapes only, nothing allocated
    model = nnx.eval_shape(lambda: train_step.build_model(built, 0))
    assert nnx.state(model, nnx.Param)


@pytest.mark.parametrize("rel", [f for f in FILES if f.startswith("experiments/")])
def test_experiment_dry_run_builds(rel, capsys):
  gin_setup.parse([rel])
  result = gin_setup.configured("run")(workdir="", dry_run=True)
  assert result["params"]["total"] > 0
  assert '"model"' in capsys.readouterr().out


def test_optimizer_config_from_runs_is_consistent():
  gin_setup.parse(["runs/tiny_cpu.gin"])
  assert isinstance(gin_setup.configured("OptimConfig")(), OptimConfig)


def test_includes_parse_with_a_runs_folder_in_the_working_directory(tmp_path, monkeypatch):
  """The main job writes runs/ into the repo; afterwards `runs` is importable as a namespace
  package and gin's package-resource reader used to crash on `include 'runs/...'`."""
  import importlib  # pylint: disable=import-outside-toplevel
  (tmp_path / "runs" / "tiny_openmoe_ul2").mkdir(parents=True)
  (tmp_path / "models").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  assert importlib.util.find_spec("runs") is not None  # the trap is armed
  gin_setup.parse([os.path.join(REPO, "gin", "experiments", "tiny_openmoe_ul2.gin")])
  assert gin_setup.configured("TrainConfig")().steps > 0
