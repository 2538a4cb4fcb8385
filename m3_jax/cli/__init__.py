"""The `m3` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int | None`; modules are imported only when their subcommand runs, so `m3 --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep in sync with the DESIGN.md command table.
COMMANDS = {
    "convert": ("m3_jax.cli.convert", "llava-hf (LLaVA-1.5 / NeXT) or original LLaVA / M3 directory -> m3 checkpoint"),
    "export": ("m3_jax.cli.export", "m3 checkpoint -> llava-hf safetensors + config (transformers runs it at full scale only)"),
    "generate": ("m3_jax.cli.generate", "answer a prompt about an image at a chosen scale"),
    "train": ("m3_jax.cli.train", "train (LLaVA -> M3); resumes from --workdir when it holds a checkpoint"),
    "eval": ("m3_jax.cli.eval", "evaluate a checkpoint on a task at several scales"),
    "score": ("m3_jax.cli.score", "score predictions from any model with a task's official metric"),
    "analyze": ("m3_jax.cli.analyze", "granularity table, oracle, report.md and score_vs_tokens.png"),
    "data": ("m3_jax.cli.data", "data tools: `check` a LLaVA JSON file, build the granularity `probe`"),
    "demo": ("m3_jax.cli.demo", "the main job on the embedded tiny default, no downloads"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="m3", description="Matryoshka Multimodal Models in JAX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  wanted = next((a for a in argv if not a.startswith("-")), None)
  for name, (module, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    if name == wanted:  # only the chosen subcommand's module is imported
      p.set_defaults(_module=module)
      importlib.import_module(module).add_arguments(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = build_parser(argv).parse_args(argv)
  code = importlib.import_module(args._module).run(args)
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())
