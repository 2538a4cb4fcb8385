"""`m3 generate --ckpt CKPT --image PATH --prompt TEXT [--scale N] [--max-new-tokens K] [--template T] [--json]`:
one answer from a checkpoint about an image at one scale (the model is `m3_jax.eval.loader.M3Model`)."""
from __future__ import annotations

import argparse
import json

from m3_jax.cli import scale_list
from m3_jax.data.conversation import TEMPLATES
from m3_jax.eval.generate import MAX_NEW_TOKENS


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--ckpt", required=True, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
  p.add_argument("--prompt", required=True, help="the question about the image")
  p.add_argument("--scale", type=scale_list, default=None, metavar="N[,N...]",
                 help="visual tokens for the image: one of the checkpoint's model.m3.scales, or a comma list (one "
                      "answer per scale); auto: the checkpoint's scale router chooses; default: the full grid")
  p.add_argument("--budget", type=float, default=None, metavar="N",
                 help="with auto: the router threshold whose calibration mean visual tokens stay within N")
  p.add_argument("--router", default=None, metavar="PATH",
                 help="with auto: this router folder (default: router/ in the checkpoint's folder)")
  p.add_argument("--grid", default=None, metavar="RxC",
                 help="LLaVA-NeXT: override the anyres crop grid, e.g. 3x3 (paper Table 5)")
  p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens generated per answer")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--template", default="auto",
                 choices=["auto", *TEMPLATES],
                 help="chat template; auto = the one recorded at conversion")
  p.add_argument("--json", action="store_true",
                 help='print one JSON object per answer {"text", "token_ids" (generated ids only), "scale", '
                      '"visual_tokens", "finish_reason" ("stop" | "length"), "seconds"}')
  p.epilog = ('example:\n  m3 generate --ckpt ckpt/m3 --image cat.jpg --prompt "What is on the mat?" '
              '--scale 576,36,1')


def run(args) -> int:
  from m3_jax.checkpoint import reader
  from m3_jax.cli import checks
  from m3_jax.eval.loader import load
  # Cheap checks first: a wrong flag costs no params load.
  checks.checkpoint(args.ckpt)
  checks.existing(args.image, "--image", "file")
  checks.at_least(args.max_new_tokens, "--max-new-tokens", 1)
  checks.scales(reader.model_config(args.ckpt), args.scale)
  grid = parse_grid(args.grid)
  scales = args.scale or (None,)
  model = load(args.ckpt, step=args.step, template=args.template, router=args.router)
  if "auto" in scales:
    model.route([], [])  # no router: the how-to-fit message, before any work
    model.router.threshold(args.budget)
  for scale in scales:
    out = model.generate([args.image], [args.prompt], scale=scale, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         grid=grid, budget=args.budget)[0]
    text = f"[{scale}] {out['text']}" if len(scales) > 1 else out["text"]
    print(json.dumps(out) if args.json else text)
  return 0


def parse_grid(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    rows, cols = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--grid {text!r}: expected ROWSxCOLS, e.g. 3x3") from None
  return rows, cols
