"""`m3 convert SRC OUT`: llava-hf (LLaVA-1.5 / NeXT) or original LLaVA / M3 directory, or a training workdir's step
(`--step N`, default the latest), -> m3 checkpoint."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser):
  p.description = (
      "Convert a llava-hf checkpoint (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration, any "
      "transformers 4.5x-5.x layout) or an original LLaVA / M3 checkpoint (LlavaLlamaForCausalLM with mm_* config "
      "keys) into an m3 checkpoint directory. Weights are read tensor by tensor from safetensors (single file or "
      "sharded with an index).")
  p.add_argument("src", metavar="SRC",
                 help="source checkpoint directory (config.json + weights), or a HuggingFace hub id (e.g. "
                      "llava-hf/llava-1.5-7b-hf) already in the local HuggingFace cache (never downloaded), or a "
                      "training workdir (m3 train --workdir): its step becomes an m3 checkpoint with the run's "
                      "tokenizer and preprocessor")
  p.add_argument("--step", type=int, default=None,
                 help="with a training workdir: the checkpoint step to convert (default: the latest)")
  p.add_argument("out", metavar="OUT", help="new m3 checkpoint directory (must not exist or be empty)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="stored parameter dtype")
  p.add_argument("--vision-from", metavar="DIR", default=None,
                 help="CLIP vision directory (CLIPVisionModel/CLIPModel config.json + safetensors) for original "
                      "LLaVA checkpoints that carry no vision weights, or whose mm_vision_tower is not "
                      "openai/clip-vit-large-patch14-336")
  p.add_argument("--allow-pickle", action="store_true",
                 help="accept PyTorch .bin weights (loaded with torch.load(weights_only=True); needs torch)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.epilog = ("example:\n  m3 convert llava-hf/llava-1.5-7b-hf ckpt/llava15   # a hub id in the HF cache, or a "
              "directory\n  m3 convert runs/tiny ckpt/tiny-900 --step 900         # a training run's step")


def run(args) -> int:
  from m3_jax.cli import checks
  from m3_jax.convert import hub
  from m3_jax.errors import BadValue
  from m3_jax.convert.convert import convert
  checks.existing(args.vision_from, "--vision-from", "dir")
  checks.output_dir(args.out, "OUT")
  from m3_jax.checkpoint import workdir
  if workdir.is_workdir(args.src):
    from m3_jax.convert.workdir import to_m3dir
    for flag, given in (("--vision-from", args.vision_from), ("--allow-pickle", args.allow_pickle)):
      if given:
        raise BadValue(f"{flag} applies to HF and original LLaVA sources; SRC {args.src} is a training workdir, "
                       "whose steps hold every weight in its own format")
    to_m3dir(args.src, args.out, args.step, dtype=args.dtype)
    print(f"wrote {args.out}: step {workdir.resolve_step(args.src, args.step)} of the training workdir {args.src} "
          f"({args.dtype})")
    return 0
  if args.step is not None:
    raise BadValue(f"--step {args.step}: SRC {args.src} is not a training workdir (only a workdir has steps)")
  cfg = convert(hub.resolve(args.src), args.out, dtype=args.dtype, vision_from=args.vision_from,
                allow_pickle=args.allow_pickle, progress=not args.no_progress)
  from m3_jax.convert import hf
  print(f"wrote {args.out}: {cfg.type}, {hf.count(cfg):,} parameters ({args.dtype}), scales "
        f"{', '.join(map(str, cfg.m3.scales))}")
  return 0
