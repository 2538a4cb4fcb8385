"""What every launcher shares: the `m3 train` command line for one process."""
from __future__ import annotations

import shlex
from typing import Sequence


def train_args(config: str, workdir: str, overrides: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
  """`m3 train --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...] [extra ...]` as an argv list."""
  args = ["train", "--config", config, "--workdir", workdir]
  for o in overrides:
    o = o.removeprefix("--config.").removeprefix("config.")
    if "=" not in o:
      raise SystemExit(f"override {o!r} is not KEY=VALUE (e.g. train.num_steps=100)")
    args.append(f"--config.{o}")
  return args + list(extra)


def quote(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)
