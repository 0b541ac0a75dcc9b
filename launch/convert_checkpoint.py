"""Convert a checkpoint into an openmoe_jax workdir (or export one to safetensors).

  python launch/convert_checkpoint.py t5x /data/openmoe-base/checkpoint_500000 /work/om-base \
      --preset openmoe-base --vocab_path /data/umt5.spm
  python launch/convert_checkpoint.py moeut moeut_244m.safetensors /work/moeut --preset moeut-244m
  python launch/convert_checkpoint.py safetensors /work/om-base om-base.safetensors

The workdir holds checkpoints/0 (parameters + a fresh optimizer state) and config.json:
`openmoe_jax.inference.load(workdir)` samples from it, and `train.run` fine-tunes it when given
the same model / data / optim configs (the data pipeline state is that of a fresh iterator).
Get T5X checkpoints with launch/download.py (--params_only is enough to convert).
"""
import argparse
import dataclasses
import sys

from openmoe_jax import download, presets
from openmoe_jax.config import DataConfig, OptimConfig

_EPILOG = "\n".join(
    ["OpenMoE T5X checkpoints (convert with the preset of the same name):"] +
    [f"  {n:15s} {r['path']}  params {r['params']}, ~{r['est_gb']} GB float32 (estimate)"
     for n, r in download.RELEASED.items()] +
    ["OpenMoE uses the umT5 SentencePiece vocabulary (256384 ids): pass its .model as "
     "--vocab_path to sample text or fine-tune."])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, epilog=_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("format", choices=("t5x", "moeut", "safetensors"),
                      help="t5x: OpenMoE T5X dir; moeut: MoEUT state dict; safetensors: export")
  parser.add_argument("src", help="checkpoint_N dir / state dict file / our workdir")
  parser.add_argument("dst", help="new workdir (must not exist) / .safetensors file")
  parser.add_argument("--preset", default="openmoe-base", choices=sorted(presets.PRESETS),
                      help="the model the checkpoint holds (t5x: openmoe-*/openllama-*; moeut: "
                           "the moeut-* profile it was trained with, which sets the top-k sizes "
                           "and n_layers a state dict does not record)")
  parser.add_argument("--vocab_path", default=None, help="SentencePiece model for config.json")
  parser.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"),
                      help="optimizer whose fresh state is written (T5X Adafactor moments are "
                           "not carried over)")
  parser.add_argument("--dtype", default="float32", help="safetensors export dtype")
  args = parser.parse_args(argv)
  if args.format == "safetensors":
    from openmoe_jax.convert import safetensors_export
    print(safetensors_export.export(args.src, args.dst, dtype=args.dtype))
    return 0
  model = presets.get(args.preset)
  data = DataConfig(vocab_path=args.vocab_path)
  if args.format == "moeut":  # a causal LM: sample and fine-tune it as one
    data = DataConfig(vocab_path=args.vocab_path, mixture="stdlib_lm", ul2=False)
  optim = dataclasses.replace(OptimConfig(), name=args.optimizer)
  if args.format == "t5x":
    from openmoe_jax.convert import openmoe
    out, cfg = openmoe.convert(args.src, args.dst, model, optim=optim, data=data,
                               progress=lambda name: print("converting", name))
  else:
    from openmoe_jax.convert import moeut
    out, cfg = moeut.convert(args.src, args.dst, model, optim=optim, data=data)
  print(f"wrote {out} (vocab {cfg.vocab_size}, {cfg.n_layers} layers)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
