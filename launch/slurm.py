"""Render (and optionally submit) a SLURM batch script running `m3 train` on GPU nodes: one process per node,
each driving all of its GPUs.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --config configs/llava15_7b_m3.py:init=ckpt/llava15 \
        --workdir /shared/runs/m3 [--partition gpu] [--time 24:00:00] [--config.KEY=VALUE ...] [--dry-run]

It prints the script and submits it with sbatch; --dry-run only prints it. `jax.distributed.initialize()` reads the SLURM environment
(SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, the node list), so `m3 train` needs no coordinator flags. SLURM sends
SIGTERM before the time limit (`--signal`), and `m3 train` saves a checkpoint and exits 0; `--requeue` then
restarts the job, which resumes from the workdir.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

try:
  from launch.common import HelpFormatter, parse, quote, train_args
except ImportError:
  from common import HelpFormatter, parse, quote, train_args


def script(args) -> str:
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           "#SBATCH --signal=TERM@300",  # SIGTERM to every task 5 minutes before the limit: time to save
           "#SBATCH --requeue",
           f"#SBATCH --output={args.workdir}/slurm-%j.out"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  train = quote([args.python, "-m", "m3_jax.cli", *train_args(args.config, args.workdir, args.overrides,
                                                               ["--no-progress"])])
  lines += ["set -euo pipefail",
            f"cd {args.repo}",
            f"mkdir -p {args.workdir}",
            *[f"export {e}" for e in args.env],
            f"srun --kill-on-bad-exit=1 {train}"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--nodes", type=int, default=1, help="nodes (one m3 train process each)")
  p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
  p.add_argument("--cpus-per-task", type=int, default=32, help="CPUs per node's process")
  p.add_argument("--time", default="24:00:00", help="SLURM time limit")
  p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
  p.add_argument("--account", default="", help="SLURM account (default: yours)")
  p.add_argument("--job-name", default="m3-train", help="SLURM job name")
  p.add_argument("--config", required=True, help="m3 train --config: a config name or file[:ARGS]")
  p.add_argument("--workdir", required=True, help="m3 train --workdir on storage every node reaches")
  p.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[1]), help="checkout on the nodes")
  p.add_argument("--python", default=".venv/bin/python", help="Python on the nodes, relative to --repo")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment on the nodes")
  p.add_argument("--dry-run", action="store_true", help="print the script without submitting it")
  p.add_argument("--submit", action="store_true", help=argparse.SUPPRESS)   # deprecated: submitting is the default
  args = parse(p, argv)
  text = script(args)
  print(text, end="")
  if args.dry_run:
    return 0
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
    f.write(text)
  return subprocess.call(["sbatch", f.name])


if __name__ == "__main__":
  sys.exit(main())
