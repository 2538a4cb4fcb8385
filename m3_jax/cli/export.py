"""`m3 export --ckpt CKPT [--step N] OUT` (or `m3 export CKPT OUT`): an m3 checkpoint or a training workdir's step ->
llava-hf directory that transformers loads."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser):
  p.description = (
      "Write an m3 checkpoint as a llava-hf directory (config.json, safetensors, tokenizer, preprocessor_config.json) "
      "that LlavaForConditionalGeneration / LlavaNextForConditionalGeneration.from_pretrained loads. transformers "
      "has no Matryoshka pooling: the exported model runs at FULL SCALE ONLY (576 tokens per image or per crop).")
  p.add_argument("--ckpt", default=None,
                 help="m3 checkpoint directory (m3_config.json + params/) or training workdir (m3 train --workdir)")
  p.add_argument("--step", type=int, default=None,
                 help="with a training workdir: the checkpoint step to export (default: the latest)")
  p.add_argument("ckpt_positional", nargs="?", metavar="CKPT", help="the same as --ckpt (kept for old command lines)")
  p.add_argument("out", metavar="OUT", help="new output directory (must not exist or be empty)")
  p.add_argument("--shard-size-gb", type=float, default=4.0, help="largest safetensors shard in GiB")
  p.epilog = ("example:\n  m3 export --ckpt ckpt/m3-tiny exported/m3-tiny-hf\n"
              "  m3 export --ckpt runs/tiny --step 900 exported/tiny-900-hf   # a training run's step")


def run(args) -> int:
  from m3_jax.errors import BadValue
  if args.ckpt and args.ckpt_positional and args.ckpt != args.ckpt_positional:
    raise BadValue(f"two checkpoints given (--ckpt {args.ckpt} and {args.ckpt_positional})")
  args.ckpt = args.ckpt or args.ckpt_positional
  if not args.ckpt:
    raise BadValue("name the checkpoint: m3 export --ckpt CKPT OUT")
  from m3_jax.cli import checks
  from m3_jax.convert.export import export
  checks.checkpoint(args.ckpt)
  checks.output_dir(args.out, "OUT")
  if not args.shard_size_gb > 0:
    raise BadValue(f"--shard-size-gb {args.shard_size_gb}: expected a size > 0")
  out = export(args.ckpt, args.out, shard_bytes=int(args.shard_size_gb * (1 << 30)), step=args.step)
  print(f"wrote {out} (llava-hf layout; transformers runs it at full scale only)")
  return 0
