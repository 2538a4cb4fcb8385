"""Launch `m3 train` on every worker of a Cloud TPU VM pod slice (one process per host).

    python launch/tpu.py --tpu NAME --zone ZONE --config configs/llava15_7b_m3.py:init=gs://b/llava15 \
        --workdir gs://bucket/runs/m3 [--repo ~/m3-jax] [--config.train.batch_size=256 ...] [--dry-run]

--dry-run prints the command instead of running it. On the workers `jax.distributed.initialize()` needs no
arguments: the TPU runtime tells every host the coordinator, its id and the process count. Use a workdir every host
can reach (gs://...); each host writes its own checkpoint shards and data-iterator state.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

try:
  from launch.common import HelpFormatter, parse, quote, train_args
except ImportError:  # run as a script: python launch/tpu.py
  from common import HelpFormatter, parse, quote, train_args


def command(args) -> list[str]:
  remote = (f"cd {args.repo} && {args.python} -m m3_jax.cli "
            + quote(train_args(args.config, args.workdir, args.overrides, ["--no-progress"] if args.no_progress else [])))
  if args.env:
    remote = " ".join(args.env) + " " + remote
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}", "--worker=all",
          *([f"--project={args.project}"] if args.project else []), f"--command={remote}"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--tpu", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True, help="the TPU VM's zone, e.g. us-east5-a")
  p.add_argument("--project", default="", help="gcloud project (default: gcloud's configured one)")
  p.add_argument("--config", required=True, help="m3 train --config: a config name or file[:ARGS]")
  p.add_argument("--workdir", required=True, help="m3 train --workdir, reachable from every host (gs://...)")
  p.add_argument("--repo", default="~/m3-jax", help="checkout on the workers (same path on every host)")
  p.add_argument("--python", default=".venv/bin/python", help="Python on the workers, relative to --repo")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment on the workers")
  p.add_argument("--no-progress", action="store_true", help="no progress bar on the workers")
  p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
  p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)   # deprecated: running is the default
  args = parse(p, argv)
  cmd = command(args)
  print(quote(cmd))
  if args.dry_run:
    return 0
  return subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
