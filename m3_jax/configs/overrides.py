"""`--config.KEY=VALUE` command-line overrides (`m3 train`, launch/, benchmarks/): taken out of an argv before
argparse parses the rest; `m3_jax.configs.base.load(spec, overrides)` applies them. Pure Python, so `m3 --help`
stays fast."""
from __future__ import annotations


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv -> (the `--config.KEY=VALUE` / `--config.KEY VALUE` overrides as "KEY=VALUE", the rest).

  argparse has no wildcard options, and ml_collections' config_flags (absl flags) cannot share an argv with an
  argparse subcommand (with known_only it leaves every --config.KEY unparsed), so the overrides are taken out
  here, before argparse sees the rest, and applied by `m3_jax.configs.base.load`."""
  overrides, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key = arg[len("--config."):]
      if "=" not in key:
        if i + 1 >= len(argv):
          raise SystemExit(f"error: {arg} needs a value (--config.KEY=VALUE)")
        key, i = f"{key}={argv[i + 1]}", i + 1
      overrides.append(key)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest
