"""`m3 train --config FILE[:ARGS] [--config.KEY=VALUE ...] --workdir DIR`: trains, resuming from DIR by itself.

Multi-host: `jax.distributed.initialize()` runs automatically on TPU pods and under SLURM (it detects them);
elsewhere pass --coordinator HOST:PORT --num-processes N --process-id I (launch/local.py does this for you).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("--config", required=True, metavar="FILE[:ARGS]",
                      help="config file, e.g. configs/tiny.py or configs/llava15_7b_m3.py:init=ckpt/llava15")
  parser.add_argument("--workdir", required=True, help="run directory: config.json, checkpoints/, metrics.jsonl, tb/")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="jax.distributed coordinator (multi-process runs outside TPU pods / SLURM)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--no-distributed", action="store_true",
                      help="never call jax.distributed.initialize (single process)")
  parser.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                      help="CPU cross-process collectives (multi-process CPU runs need gloo)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.epilog = "Any --config.KEY=VALUE overrides a config field, e.g. --config.train.num_steps=50."
  # argparse has no wildcard options: take --config.KEY=VALUE out before it sees them.
  parse_known = parser.parse_known_args

  def parse_known_args(args=None, namespace=None):
    overrides, rest = parse_overrides(list(sys.argv[1:] if args is None else args))
    namespace, extras = parse_known(rest, namespace)
    namespace._overrides = overrides
    return namespace, extras
  parser.parse_known_args = parse_known_args


def parse_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits `--config.KEY=VALUE` / `--config.KEY VALUE` out of argv -> (overrides "KEY=VALUE", the rest)."""
  overrides, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key = arg[len("--config."):]
      if "=" not in key:
        if i + 1 >= len(argv):
          raise SystemExit(f"{arg} needs a value (--config.KEY=VALUE)")
        key, i = f"{key}={argv[i + 1]}", i + 1
      overrides.append(key)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def initialize_distributed(args) -> None:
  import jax
  if args.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
  if args.no_distributed:
    return
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif _cluster_detected():
    jax.distributed.initialize()  # TPU pod / SLURM: addresses and ranks come from the environment


def _cluster_detected() -> bool:
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")
  import importlib.util
  on_tpu_vm = importlib.util.find_spec("libtpu") is not None and env.get("JAX_PLATFORMS", "") in ("", "tpu")
  return slurm or tpu_pod or on_tpu_vm or "MEGASCALE_COORDINATOR_ADDRESS" in env


def run(args) -> int:
  overrides = getattr(args, "_overrides", [])
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  initialize_distributed(args)
  if args.no_progress:  # TFDS draws its own bars while it builds the probe
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  from m3_jax.configs import base as m3_config
  from m3_jax.train import loop
  from m3_jax.train.state import TrainStep
  config = m3_config.load(args.config, overrides)
  try:
    summary = loop.fit(TrainStep(config), args.workdir, progress=not args.no_progress)
  except loop.NonFiniteError as e:
    logging.getLogger("m3.train").error("%s", e)
    return 3
  logging.getLogger("m3.train").info("done: %s", summary)
  return 0


def main(argv: list[str] | None = None) -> int:
  """`python -m m3_jax.cli.train ...` (the same as `m3 train ...`)."""
  parser = argparse.ArgumentParser(prog="m3 train")
  add_arguments(parser)
  return int(run(parser.parse_args(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
  sys.exit(main())
