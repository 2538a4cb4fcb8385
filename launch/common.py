"""What every launcher shares: its command-line conventions and the `m3 train` command line for one process."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from m3_jax.configs.overrides import split_overrides


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


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """Parses a launcher's argv; `--config.KEY=VALUE` overrides (and the deprecated `--set KEY=VALUE`) end up in
  `args.overrides`, in order."""
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
  parser.epilog = (parser.epilog or "") + "\nAny --config.KEY=VALUE is passed on to m3 train as a config override."
  overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
  args = parser.parse_args(rest)
  if args.set:
    print("warning: --set KEY=VALUE is deprecated; use --config.KEY=VALUE", file=sys.stderr)
  args.overrides = [*args.set, *overrides]
  return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Flag helps show their defaults; the module docstring (the example) keeps its line breaks."""
