"""`m3 cost --config CFG [--text-tokens 30] [--image WxH] [--json]`: analytic FLOPs and bytes per scale."""
from __future__ import annotations

import argparse
import json
import sys

NEXT_IMAGE = "672x672"


def add_arguments(p: argparse.ArgumentParser):
  p.description = (
      "Per scale, from the config's shapes alone (no parameters are built): the prefill FLOPs of the vision tower,\n"
      "the projector, the language model and the last position's logits, the decode FLOPs of the first new token,\n"
      "the KV-cache and activation bytes of one sample, and the parameter bytes. A FLOP is a multiply or an add;\n"
      "attention counts QK^T and AV over the full sequence (dense attention computes the causally masked half too);\n"
      "norms, softmax and activations are not counted. Conventions: m3_jax/cost.py.")
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = ("example:\n"
              "  m3 cost --config llava15_7b_m3 --dtype bfloat16     # the paper's Table 9: 'llm' = 8.04 TFLOPs at 576\n"
              "  m3 cost --config llava_next_7b_m3 --image 640x480 --json")
  p.add_argument("--config", required=True, metavar="CFG[:ARGS]",
                 help="config name (tiny, small, llava15_7b_m3, llava_next_7b_m3) or file, e.g. configs/tiny.py")
  p.add_argument("--text-tokens", type=int, default=30,
                 help="text tokens beside the image's visual tokens (default 30, as the paper's Table 9)")
  p.add_argument("--image", metavar="WxH", default=None,
                 help=f"image width x height in pixels: picks LLaVA-NeXT's crop grid and unpadding (default "
                      f"{NEXT_IMAGE} for llava_next; LLaVA-1.5 pads every image to one crop and ignores it)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="element type of parameters, KV cache and activations (default: the config's model.dtype)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args) -> int:
  from m3_jax import cost
  from m3_jax.configs import base as m3_config
  from m3_jax.models.config import ModelConfig
  try:
    cfg = ModelConfig.from_config(m3_config.load(args.config).model)
    image_hw = parse_image(args.image or NEXT_IMAGE) if cfg.type == "llava_next" else None
    if args.text_tokens < 0:
      raise ValueError(f"--text-tokens {args.text_tokens}: expected a count >= 0")
    out = cost.report(cfg, args.text_tokens, image_hw, args.dtype or cfg.dtype)
  except (ValueError, FileNotFoundError) as e:
    print(f"m3 cost: error: {e}", file=sys.stderr)
    return 2
  out["config"] = args.config
  print(json.dumps(out) if args.json else table(out))
  return 0


def parse_image(spec: str) -> tuple[int, int]:
  """'WxH' -> (h, w)."""
  try:
    w, h = (int(x) for x in spec.lower().split("x"))
  except ValueError:
    raise ValueError(f"--image {spec!r}: expected WIDTHxHEIGHT in pixels, e.g. 640x480") from None
  if w <= 0 or h <= 0:
    raise ValueError(f"--image {spec!r}: both sides must be positive")
  return h, w


def table(out: dict) -> str:
  image = f", image {out['image_hw'][1]}x{out['image_hw'][0]}" if out["image_hw"] else ""
  p = out["params"]
  lines = [f"{out['config']} ({out['model']}), {out['text_tokens']} text tokens{image}, {out['dtype']}",
           f"parameters: {p['total']:,} ({_si(out['param_bytes'])}B): vision {p['vision']:,}, projector "
           f"{p['projector']:,}, llm {p['llm']:,}", "",
           "| scale | crops | visual tokens | sequence | llm prefill FLOPs | vision FLOPs | projector FLOPs | "
           "logits FLOPs | prefill total | decode FLOPs/token | KV cache | activations |",
           "|" + "---:|" * 12]
  for r in out["scales"]:
    f = r["prefill_flops"]
    lines.append(f"| {r['scale']} | {r['crops']} | {r['visual_tokens']} | {r['sequence']} | {_si(f['llm'])} | "
                 f"{_si(f['vision'])} | {_si(f['projector'])} | {_si(f['logits'])} | {_si(f['total'])} | "
                 f"{_si(r['decode_flops_per_token'])} | {_si(r['kv_cache_bytes'])}B | "
                 f"{_si(r['activation_bytes'])}B |")
  return "\n".join(lines)


def _si(x: float) -> str:
  """3 significant digits with a decimal SI prefix: 8041455943680 -> '8.04 T'."""
  for prefix, unit in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= unit:
      return f"{x / unit:.3g} {prefix}"
  return f"{x:.3g} "
