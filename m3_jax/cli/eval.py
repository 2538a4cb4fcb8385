"""`m3 eval --ckpt CKPT --task NAME --data PATH --scales LIST --out DIR`: a checkpoint on a benchmark at several
scales -> predictions.jsonl, summary.json, summary.csv in DIR (resumable; the work is `m3_jax.eval.evaluator`)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from m3_jax.cli import scale_list
from m3_jax.cli.score import make_task, task_option
from m3_jax.data.conversation import TEMPLATES
from m3_jax.eval.generate import MAX_NEW_TOKENS
from m3_jax.models.matryoshka import POOL_METHODS


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--ckpt", required=True, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--task", required=True, help="task name (probe, llava_jsonl, textvqa, pope, mmbench, ...)")
  p.add_argument("--data", required=True, help="the task's file or folder (README: where to get each)")
  p.add_argument("--image-folder", default=None, help="images / videos folder, where the task reads one")
  p.add_argument("--scale", "--scales", dest="scales", type=scale_list, default=None, metavar="N[,N...]",
                 help="one scale or a comma list, e.g. 576,144,36,9,1 (default: the checkpoint's model.m3.scales); "
                      "auto: the scale router's choice per sample (auto,576,144,...)")
  p.add_argument("--budget", type=float, default=None, metavar="N",
                 help="with auto: the router's threshold whose calibration mean visual tokens (routing included) "
                      "stay within N (default: the router's, which matches the best fixed scale at the fewest tokens)")
  p.add_argument("--router", default=None, metavar="PATH",
                 help="with auto: this router folder (default: router/ in the checkpoint's folder)")
  p.add_argument("--out", required=True, help="output directory: predictions.jsonl, summary.json, summary.csv")
  p.add_argument("--batch-size", type=int, default=16, help="samples per generation batch")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
  p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens generated per answer")
  p.add_argument("--template", default="auto", choices=["auto", *TEMPLATES],
                 help="chat template; auto = the one recorded at conversion")
  p.add_argument("--pool", default=None, choices=POOL_METHODS,
                 help="override the pooling method at inference (paper Tables 4 and 6: inference-time pooling of a "
                      "model trained at full scale, or the spatial / sequential samplers)")
  p.add_argument("--grid", default=None, metavar="RxC",
                 help="LLaVA-NeXT: override the anyres crop grid, e.g. 3x3 (paper Table 5); scales are per crop")
  p.add_argument("--likelihood", action="store_true",
                 help="multiple-choice tasks: pick the option letter with the highest log-likelihood at the scale "
                      "instead of generating")
  p.add_argument("--task-option", action="append", default=[], type=task_option, metavar="KEY=VALUE",
                 help="a task option, repeatable (video tasks: prompt=igvlm|igvlm_verbatim|llava, "
                      "collage=igvlm|linspace_2x3)")
  p.add_argument("--overwrite", action="store_true",
                 help="delete the predictions in --out and start afresh (by default a folder holding another "
                      "run's predictions is refused, and one holding this run's is resumed)")
  p.add_argument("--allow-outside-images", action="store_true",
                 help="read image paths of the task's records that leave its image folder (absolute paths, '..', "
                      "symlinks out); refused by default")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.epilog = ("example:\n  m3 eval --ckpt runs/demo/train --task probe --data runs/demo/train/probe --scale 144,36,9,1 "
              "--out runs/demo/eval")


def _stored_template(path: str) -> str:
  """The chat template a checkpoint records (what --template auto resolves to), read without its params."""
  from m3_jax.checkpoint import m3dir, workdir
  if m3dir.is_m3dir(path):
    return m3dir.read_meta(path).get("template", "llava_hf")
  return workdir.read_config(path)["data"]["template"]


def run(args) -> int:
  from m3_jax.checkpoint import reader, workdir
  from m3_jax.cli import checks
  from m3_jax.cli.generate import parse_grid
  from m3_jax.errors import BadValue
  from m3_jax.eval import cache, evaluator
  from m3_jax.eval.loader import M3Model
  from m3_jax.eval.tasks.common import outside_images
  from m3_jax.models.llava import with_overrides

  # Cheap checks first: a wrong flag costs no data read and no params load.
  checks.checkpoint(args.ckpt)
  checks.existing(args.data, "--data")
  checks.existing(args.image_folder, "--image-folder", "dir")
  checks.output_dir(args.out, "--out")
  checks.at_least(args.batch_size, "--batch-size", 1)
  checks.at_least(args.max_new_tokens, "--max-new-tokens", 1)
  checks.at_least(args.limit, "--limit", 0)
  grid = parse_grid(args.grid)
  config = reader.model_config(args.ckpt)
  checks.scales(config, args.scales)
  options = dict(sorted(args.task_option))
  if args.image_folder:
    options["image_folder"] = args.image_folder
  task = make_task(args.task, options)
  # The step is resolved once, so the identity and the params evaluated are the same step's.
  step = workdir.resolve_step(args.ckpt, args.step) if workdir.is_workdir(args.ckpt) else args.step
  fingerprint = cache.Fingerprint(args.data)
  samples = []
  with outside_images(args.allow_outside_images):
    for s in fingerprint.feed(task.samples(args.data)):  # the whole file goes into the fingerprint, not --limit
      if args.limit is None or len(samples) < args.limit:
        samples.append(s)
  identity = reader.identity(args.ckpt, step)
  pool = args.pool or config.m3.pool
  run = cache.run_record(
      ckpt=args.ckpt, step=step, data=args.data, ckpt_identity=identity, task=args.task,
      task_options=options, data_fingerprint=fingerprint.hexdigest(),
      template=_stored_template(args.ckpt) if args.template == "auto" else args.template, pool=pool,
      grid=list(grid) if grid else None, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
      likelihood=args.likelihood, image_folder=args.image_folder, allow_outside_images=args.allow_outside_images)
  cache.open_run(args.out, run, args.overwrite)  # before the params load: a refusal costs nothing
  auto = bool(args.scales) and "auto" in args.scales
  router = None
  if auto:  # before the params load: a missing or mismatched router, or an unreachable budget, costs nothing
    from m3_jax.eval.loader import load_router
    router = load_router(args.ckpt, step, args.router)
    if router is None:
      raise BadValue(f'--scale auto: {args.ckpt} has no scale router; fit one with `m3 router fit --ckpt '
                     f'{args.ckpt} --runs EVALDIR...` (EVALDIR: `m3 eval` at every scale on a calibration '
                     "split), or pass one with --router PATH")
    threshold = router.threshold(args.budget)
  ckpt = reader.read_checkpoint(args.ckpt, step)
  if args.pool:
    ckpt = dataclasses.replace(ckpt, config=with_overrides(ckpt.config, pool=args.pool))
  model = M3Model(ckpt, args.template, router, str(args.ckpt))
  del ckpt  # its stacked params: the engine holds its own (unscanned) layout of them
  scales = list(args.scales) if args.scales else list(model.scales)
  generate, choose = evaluator.model_functions(model, max_new_tokens=args.max_new_tokens,
                                               batch_size=args.batch_size, grid=grid, likelihood=args.likelihood,
                                               scales=[s for s in scales if s != "auto"])
  extra = {"ckpt": str(args.ckpt), "pool": model.config.m3.pool, "ckpt_identity": identity}
  route = None
  if auto:
    from m3_jax.eval.router.route import route_function
    route = route_function(model, args.budget, args.batch_size)
    extra["router"] = {"path": router.path, "identity": router.identity, "features": router.kind,
                       "threshold": threshold, "budget": args.budget}
  summary = evaluator.evaluate(generate, task, samples, scales, args.out, choose=choose, batch_size=args.batch_size,
                               progress=not args.no_progress, run=run, extra_summary=extra, route=route,
                               router_id=router.identity if router else None,
                               router_threshold=threshold if router else None)
  print(json.dumps(summary))
  return 0
