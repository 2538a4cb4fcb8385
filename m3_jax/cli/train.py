"""`m3 train --config FILE[:ARGS] [--config.KEY=VALUE ...] --workdir DIR`: trains, resuming from DIR by itself.

Multi-host: `jax.distributed.initialize()` runs automatically on TPU pods and under SLURM (it detects them);
elsewhere pass --coordinator HOST:PORT --num-processes N --process-id I (launch/local.py does this for you).

Exit status: 0 trained (or stopped by SIGTERM, saved); 2 a user error, one line (a bad config value, a workdir
another trainer holds, a resume whose config changed without --allow-config-change, a data source with no good
record); 3 a non-finite step (train.on_nonfinite="raise"); 4 a checkpoint that could not be written (a full disk: the
step's path and the free space are named; the checkpoints before it are intact).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

EXIT_SAVE_FAILED = 4   # a checkpoint could not be written (see the module docstring)


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("--config", required=True, metavar="FILE[:ARGS]",
                      help="config file or shipped config name, e.g. tiny, configs/tiny.py or "
                           "configs/llava15_7b_m3.py:init=ckpt/llava15")
  parser.add_argument("--workdir", required=True,
                      help="run directory: config.json, checkpoints/, metrics.jsonl, tb/; a local path or an "
                           "object-store URL (gs://bucket/runs/m3, through etils.epath)")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="jax.distributed coordinator (multi-process runs outside TPU pods / SLURM)")
  parser.add_argument("--num-processes", type=int, default=None, help="with --coordinator: the process count")
  parser.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index")
  parser.add_argument("--no-distributed", action="store_true",
                      help="never call jax.distributed.initialize (single process)")
  parser.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                      help="CPU cross-process collectives (multi-process CPU runs need gloo)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--allow-config-change", action="store_true",
                      help="resume a workdir whose config.json differs in fields that change the run's numbers (the "
                           "change is logged and recorded in config_changes.jsonl); without it such a resume is "
                           "refused, listing the fields")
  # --config.KEY=VALUE / --config.KEY VALUE are taken out of argv before argparse (m3_jax/configs/overrides.py).
  parser.set_defaults(overrides=[])
  parser.epilog = ("Any --config.KEY=VALUE (or --config.KEY VALUE) overrides a config field.\n"
                   "example:\n  m3 train --config tiny --workdir runs/tiny --config.train.num_steps=50 "
                   "--config.train.finest_first_steps=2/3")


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
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  # JAX logs at INFO each backend it cannot start ("Unable to initialize backend 'tpu'") on every CPU/GPU run.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  initialize_distributed(args)
  if args.no_progress:  # TFDS draws its own bars while it builds the probe
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  from m3_jax.configs import base as m3_config
  from m3_jax.train import loop
  from m3_jax.train.state import TrainStep
  from m3_jax.checkpoint.workdir import SaveFailed
  config = m3_config.load(args.config, args.overrides)  # a bad key or type: one line from cli.main
  check_batch(config)
  try:
    summary = loop.fit(TrainStep(config), args.workdir, progress=not args.no_progress,
                       on_eval=eval_callback(config, args.workdir), allow_config_change=args.allow_config_change)
  except loop.NonFiniteError as e:
    logging.getLogger("m3.train").error("%s", e)
    return 3
  except SaveFailed as e:
    logging.getLogger("m3.train").error("%s", e)
    return EXIT_SAVE_FAILED
  logging.getLogger("m3.train").info("done: %s", summary)
  return 0


def eval_callback(config, workdir):
  """`train.eval_every` > 0: the in-training evaluation (m3_jax.eval.training) that loop.fit calls with the current
  params; None when off. Built here because train does not import eval."""
  if not int(config.train.get("eval_every", 0) or 0):
    return None
  from m3_jax.eval import training
  return training.callback(config, workdir)


def check_batch(config) -> None:
  """Before any model is built: train.batch_size must split into train.grad_accum micro-batches, and each
  micro-batch over the processes and over the mesh axes that the "batch" rule shards it by."""
  import jax
  from m3_jax import sharding
  from m3_jax.errors import BadValue
  batch, accum = int(config.train.batch_size), int(config.train.grad_accum)
  if batch < 1 or accum < 1 or batch % accum:
    raise BadValue(f"train.batch_size={batch} does not split into train.grad_accum={accum} equal micro-batches")
  shape = dict(zip(sharding.AXES, sharding.mesh_shape(config.mesh.shape, jax.device_count())))
  axes = sharding.logical_to_mesh_axes((sharding.BATCH,), sharding.rules_of(config.mesh.rules))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  ways = math.prod(shape[a] for a in axes)
  if (batch // accum) % ways or (batch // accum) % jax.process_count():
    raise BadValue(f"train.batch_size={batch} (micro-batch {batch // accum} with train.grad_accum={accum}) does not "
                   f"split over {jax.device_count()} devices: the batch is sharded {ways} ways over mesh axes "
                   f"{'x'.join(axes) or '(none)'} (mesh.shape={tuple(config.mesh.shape)} -> {tuple(shape.values())}) "
                   f"and {jax.process_count()} processes; use a multiple of {math.lcm(ways, jax.process_count())}")
  if config.train.get("scale_sampling", "all") == "random_per_sample":
    m = len(config.train.get("scales", ()) or config.model.m3.scales)
    group = batch // accum // m
    # A group XLA cannot split over the batch shards is replicated: every device would decode all of it.
    if (batch // accum) % m == 0 and group % ways:
      raise BadValue(f"train.scale_sampling='random_per_sample' decodes each of the {m} scales' groups of "
                     f"{batch // accum} / {m} = {group} rows sharded {ways} ways; {group} rows do not split over "
                     f"{ways} shards (each device would decode the whole group); use a train.batch_size that is a "
                     f"multiple of {m * ways * accum}")


def main(argv: list[str] | None = None) -> int:
  """`python -m m3_jax.cli.train ...` (the same as `m3 train ...`)."""
  from m3_jax import cli
  return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
