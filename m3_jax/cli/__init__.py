"""The `m3` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int | None`; modules are imported only when their subcommand runs, so `m3 --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from m3_jax import errors
from m3_jax.configs.overrides import split_overrides

# name -> (module, one-line help). docs/design.md lists the commands.
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
    "serve": ("m3_jax.cli.serve", "OpenAI-compatible chat server; each request chooses its visual tokens"),
    "info": ("m3_jax.cli.info", "what a checkpoint is: model, scales, parameters, dtype, source, template, identity, "
             "router"),
    "router": ("m3_jax.cli.router", "fit the scale router that answers `--scale auto` from eval runs at every scale"),
    "cost": ("m3_jax.cli.cost", "analytic FLOPs, parameter, KV-cache and activation bytes per scale (Table 9)"),
}
# Subcommands that compile XLA programs: they use the persistent compilation cache (m3_jax/compile_cache.py).
COMPILING = ("convert", "export", "generate", "train", "eval", "demo", "serve", "info", "router")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Every flag's help shows its default (unset ones, None / False / required, say what they mean in their help);
  descriptions and example epilogs keep their line breaks."""

  def _get_help_string(self, action):
    if action.required or action.default in (None, False) or "(default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
  from m3_jax import __version__
  parser = argparse.ArgumentParser(prog="m3", description="Matryoshka Multimodal Models in JAX.",
                                   formatter_class=HelpFormatter)
  parser.add_argument("--version", action="version", version=f"m3-jax {__version__}")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of a user error too (it may stand anywhere on the command line)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  wanted = next((a for a in argv if not a.startswith("-")), None)
  for name, (module, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
    if name == wanted:  # only the chosen subcommand's module is imported
      p.set_defaults(_module=module)
      importlib.import_module(module).add_arguments(p)
  return parser


def scale_list(text: str) -> tuple[int | str, ...]:
  """`--scale` values: one scale or a comma list ("144" or "576,144,36,9,1"); "auto" (the scale router's choice)
  may be one of them ("auto,576,144")."""
  try:
    scales = tuple(s.strip() if s.strip() == "auto" else int(s) for s in text.split(",") if s.strip())
  except ValueError:
    scales = ()
  if not scales:
    raise argparse.ArgumentTypeError(f"{text!r} is not a scale or a comma list of scales, e.g. 144, 576,144,36 or "
                                     "auto,144")
  twice = sorted({str(s) for s in scales if scales.count(s) > 1})
  if twice:
    raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(twice)} more than once; give each scale once")
  return scales


def main(argv: list[str] | None = None) -> int:
  """Runs one subcommand. A user error (m3_jax.errors.is_user_error: a UserError, a path the user named, a check's
  ValueError/KeyError/TypeError) ends as one `m3 COMMAND: error: MESSAGE` line on stderr and exit status 2; any
  other exception is a bug and keeps its traceback. `--debug` (anywhere in argv) shows user errors' tracebacks too."""
  argv = sys.argv[1:] if argv is None else argv
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  overrides, rest = split_overrides(argv)   # argparse has no wildcard options: see configs/overrides.py
  parser = build_parser(rest)
  args = parser.parse_args(rest)
  if overrides:
    if not hasattr(args, "overrides"):   # a subcommand that takes overrides sets the `overrides` default
      parser.error(f"m3 {args.command} takes no --config.KEY=VALUE overrides (got --config.{overrides[0]})")
    args.overrides = overrides
  if args.command in COMPILING:
    from m3_jax import compile_cache
    compile_cache.enable()
  try:
    code = importlib.import_module(args._module).run(args)
  except Exception as e:  # noqa: BLE001 -- sorted by errors.is_user_error; the rest is re-raised
    if debug or not errors.is_user_error(e):
      raise
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None),
                                  getattr(args, "router_command", None))))
    print(f"m3 {name}: error: {errors.message(e)}", file=sys.stderr)
    return 2
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())
