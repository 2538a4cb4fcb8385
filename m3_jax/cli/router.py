"""`m3 router fit --ckpt CKPT --runs EVALDIR... [--out DIR]`: the scale router behind `--scale auto`, fitted on
`m3 eval` runs of CKPT at every scale on a calibration split (the work is `m3_jax.eval.router.fit`)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser):
  parser.epilog = ("example:\n  m3 router fit --ckpt runs/demo/train --runs runs/demo/eval_validation   "
                   "# then: m3 eval ... --scale auto,144,36,9,1")
  sub = parser.add_subparsers(dest="router_command", metavar="{fit}", help="fit")
  sub.required = True
  p = sub.add_parser("fit", help="fit a router from eval runs at every scale", formatter_class=parser.formatter_class,
                     description="Labels every calibration sample by which scales answer it (its per-sample "
                     "score), computes the router's features with the checkpoint, trains the predictor and picks "
                     "the threshold on the calibration split; saves router/ in the checkpoint's folder.")
  p.add_argument("--ckpt", required=True, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--runs", nargs="+", required=True, metavar="EVALDIR",
                 help="`m3 eval` --out folders of CKPT at every scale on a calibration split (not the test split)")
  p.add_argument("--out", default=None,
                 help="where the router goes (default: router/ in the checkpoint's folder, which m3_jax.load reads; "
                      "for a training workdir, its step's folder)")
  p.add_argument("--features", default="auto", choices=("auto", "joint", "image", "text"),
                 help="joint: the decoder's last prompt-token state after one prefill at the smallest scale, beside "
                      "that scale's visual tokens; image / text: only the image / only the question; auto: each is "
                      "fitted and the one whose out-of-fold routing gains most over the calibration split's "
                      "fixed-scale frontier is kept (all three are reported in router.json's selection)")
  p.epilog = ("example:\n  m3 eval --ckpt runs/demo/train --task probe --data runs/demo/train/probe "
              "--task-option split=validation --out runs/demo/eval_validation\n"
              "  m3 router fit --ckpt runs/demo/train --runs runs/demo/eval_validation")
  p.set_defaults(_router=fit)


def run(args) -> int:
  return args._router(args)


def fit(args) -> int:
  import pathlib
  from m3_jax.checkpoint import reader, workdir
  from m3_jax.eval.loader import M3Model
  from m3_jax.eval.router import fit as fit_lib, store
  step = workdir.resolve_step(args.ckpt, args.step) if workdir.is_workdir(args.ckpt) else args.step
  identity = reader.identity(args.ckpt, step)
  scales = sorted(reader.model_config(args.ckpt).m3.scales)
  for run_dir in args.runs:  # the cheap checks, before the params load
    fit_lib.read_calibration(run_dir, scales, identity, args.ckpt)
  model = M3Model(reader.read_checkpoint(args.ckpt, step), name=str(args.ckpt))
  router = fit_lib.fit(model, identity, args.runs, args.features)
  out = pathlib.Path(args.out) if args.out else pathlib.Path(str(reader.home(args.ckpt, step))) / store.FOLDER
  store.save(router, out)
  cal = router.meta["calibration"]
  print(json.dumps({"router": str(out), "features": router.kind, "threshold": router.meta["threshold"],
                    "calibration": {k: cal[k] for k in ("num_samples", "fixed", "oracle", "default")}}))
  return 0
