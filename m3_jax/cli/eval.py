"""`m3 eval --ckpt CKPT --task NAME --data PATH --scales LIST --out DIR`: a checkpoint on a benchmark at several
scales -> predictions.jsonl, summary.json, summary.csv in DIR (resumable; the work is `m3_jax.eval.evaluator`)."""
from __future__ import annotations

import argparse
import dataclasses
import json


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--ckpt", required=True, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--task", required=True, help="task name (probe, llava_jsonl, textvqa, pope, mmbench, ...)")
  p.add_argument("--data", required=True, help="the task's file or folder (README: where to get each)")
  p.add_argument("--image-folder", default=None, help="images / videos folder, where the task reads one")
  p.add_argument("--scales", default=None,
                 help="comma-separated scales, e.g. 576,144,36,9,1 (default: the checkpoint's model.m3.scales)")
  p.add_argument("--out", required=True, help="output directory: predictions.jsonl, summary.json, summary.csv")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--template", default="auto", choices=["auto", "vicuna_v1", "llava_hf", "plain", "none"])
  p.add_argument("--pool", default=None, choices=["avg", "spatial", "sequential"],
                 help="override the pooling method at inference (paper Tables 4 and 6: inference-time pooling of a "
                      "model trained at full scale, or the spatial / sequential samplers)")
  p.add_argument("--grid", default=None, metavar="RxC",
                 help="LLaVA-NeXT: override the anyres crop grid, e.g. 3x3 (paper Table 5); scales are per crop")
  p.add_argument("--likelihood", action="store_true",
                 help="multiple-choice tasks: pick the option letter with the highest log-likelihood at the scale "
                      "instead of generating")
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  from m3_jax.eval import evaluator
  from m3_jax.cli.generate import parse_grid
  from m3_jax.eval.loader import M3Model, read_checkpoint
  from m3_jax.eval.tasks import get_task
  from m3_jax.models.llava import with_overrides

  ckpt = read_checkpoint(args.ckpt, args.step)
  if args.pool:
    ckpt = dataclasses.replace(ckpt, config=with_overrides(ckpt.config, pool=args.pool))
  model = M3Model(ckpt, args.template)
  options = {"image_folder": args.image_folder} if args.image_folder else {}
  task = get_task(args.task, **options)
  samples = []
  for s in task.samples(args.data):
    samples.append(s)
    if args.limit is not None and len(samples) >= args.limit:
      break
  scales = [int(s) for s in args.scales.split(",")] if args.scales else list(model.scales)
  for s in scales:
    model.config.check_scale(s)
  generate, choose = evaluator.model_functions(model, max_new_tokens=args.max_new_tokens,
                                               batch_size=args.batch_size, grid=parse_grid(args.grid),
                                               likelihood=args.likelihood)
  summary = evaluator.evaluate(generate, task, samples, scales, args.out, choose=choose, batch_size=args.batch_size,
                               progress=not args.no_progress,
                               extra_summary={"ckpt": str(args.ckpt), "pool": ckpt.config.m3.pool})
  print(json.dumps(summary))
  return 0
