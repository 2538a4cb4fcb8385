"""Run `m3 train` as N processes on this machine (a multi-host run in miniature, e.g. to test on CPUs).

    python launch/local.py --num-processes 2 --devices-per-process 2 --config configs/tiny.py --workdir runs/mp

Each process gets --coordinator 127.0.0.1:PORT --num-processes N --process-id I; on CPU it gets
`--xla_force_host_platform_device_count` devices and gloo collectives. Process 0's output is shown; the others
go to WORKDIR/process_I.log. Exits with the first non-zero exit status. --dry-run prints the commands.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys

try:
  from launch.common import HelpFormatter, parse, quote, train_args
except ImportError:
  from common import HelpFormatter, parse, quote, train_args


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(args, port: int) -> list[tuple[list[str], dict]]:
  out = []
  for i in range(args.num_processes):
    extra = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.num_processes), "--process-id",
             str(i), "--no-progress"]
    env = {}
    if args.platform == "cpu":
      extra += ["--cpu-collectives", "gloo"]
      env = {"JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process} {args.xla_flags}".strip()}
    out.append(([args.python, "-m", "m3_jax.cli", *train_args(args.config, args.workdir, args.overrides, extra)], env))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--num-processes", type=int, default=2, help="m3 train processes on this machine")
  p.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process (XLA host devices)")
  p.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu"], help="JAX platform of the processes")
  p.add_argument("--xla-flags", default="", help="more XLA_FLAGS for every process (CPU)")
  p.add_argument("--config", required=True, help="m3 train --config: a config name or file[:ARGS]")
  p.add_argument("--workdir", required=True, help="m3 train --workdir; process I > 0 logs to WORKDIR/process_I.log")
  p.add_argument("--python", default=sys.executable, help="Python that runs m3_jax.cli")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
  args = parse(p, argv)
  port = args.port or free_port()
  cmds = commands(args, port)
  if args.dry_run:
    for cmd, env in cmds:
      print(" ".join(f"{k}={quote([v])}" for k, v in env.items()), quote(cmd))
    return 0
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  procs, logs = [], []
  for i, (cmd, env) in enumerate(cmds):
    full_env = {**os.environ, **env}
    if i == 0:
      procs.append(subprocess.Popen(cmd, env=full_env))
    else:
      log = open(workdir / f"process_{i}.log", "w")
      logs.append(log)
      procs.append(subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT))
  codes = [proc.wait() for proc in procs]
  for log in logs:
    log.close()
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
