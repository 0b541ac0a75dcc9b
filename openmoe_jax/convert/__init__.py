"""Checkpoint conversion: T5X OpenMoE and MoEUT (PyTorch) into openmoe_jax workdirs; safetensors export.

  t5x_reader.py         read a T5X checkpoint directory with msgpack + tensorstore only (no t5x)
  openmoe.py            OpenMoE / OpenLLaMA T5X parameter tree -> our Transformer parameters
  moeut.py              official MoEUT PyTorch state dict (safetensors or torch.load) -> ours
  workdir.py            write converted parameters as a workdir `train.run` / `inference.load` read
  safetensors_export.py our checkpoints -> a .safetensors file
"""
