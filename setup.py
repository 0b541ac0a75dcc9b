"""openmoe_jax: Mixture-of-Experts language models in JAX / Flax NNX.

`data/` and `kernels/` live at the repository top level (the design card's layout) but are
installed only inside the package namespace, as `openmoe_jax.data` and `openmoe_jax.kernels`.
"""
from setuptools import find_packages, setup

_SUBTREES = {"data": "openmoe_jax.data", "kernels": "openmoe_jax.kernels"}


def _packages() -> tuple[list[str], dict[str, str]]:
  packages = find_packages(include=["openmoe_jax", "openmoe_jax.*"])
  package_dir = {"openmoe_jax": "openmoe_jax"}
  for folder, namespace in _SUBTREES.items():
    package_dir[namespace] = folder
    packages.append(namespace)
    packages += [f"{namespace}.{sub}" for sub in find_packages(where=folder)]
  return packages, package_dir


_PACKAGES, _PACKAGE_DIR = _packages()

setup(
    name="openmoe_jax",
    version="0.1.0",
    description="OpenMoE, MoEUT, SwitchHead and UMoE in JAX / Flax NNX",
    python_requires=">=3.12",
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    package_data={"openmoe_jax.kernels.gmm": ["tuned.json"]},
    install_requires=[
        "jax>=0.11,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",  # optax.tree.norm
        "orbax-checkpoint>=0.11",
        "gin-config>=0.5",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "sentencepiece>=0.2",
        "numpy",
        "tqdm",
        "tensorboardX",
        "msgpack",
        "tensorstore",
        "fsspec",
        "safetensors",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
            "gcp-storage-emulator",
            "gcsfs",
            "google-cloud-storage",
        ],
        "gpu": ["jax[cuda12]>=0.11,<0.12", "jax-triton"],
        "tpu": ["jax[tpu]>=0.11,<0.12"],
        "torch": ["torch"],
    },
)
