"""The `m3` command-line conventions: --config.KEY=VALUE overrides (no monkey-patched argparse), errors that name the
key and the expected type, --version, defaults in every flag's help, an example in every --help, --ckpt."""
from __future__ import annotations

import argparse

import pytest

from m3_jax import __version__, cli
from m3_jax.configs.overrides import split_overrides


def test_overrides_are_split_out_in_both_forms():
  argv = ["train", "--config", "tiny", "--config.train.lr=1e-3", "--workdir", "w", "--config.train.num_steps", "5"]
  assert split_overrides(argv) == (["train.lr=1e-3", "train.num_steps=5"],
                                   ["train", "--config", "tiny", "--workdir", "w"])
  with pytest.raises(SystemExit, match=r"--config.train.lr needs a value \(--config.KEY=VALUE\)"):
    split_overrides(["--config.train.lr"])


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.strip() == f"m3-jax {__version__}"


@pytest.mark.parametrize("override,message", [
    ("--config.model.llm.head_dimm=64", "m3 train: error: config has no field 'model.llm.head_dimm' (known in "
                                        "model.llm: ['depth', 'head_dim', "),
    ("--config.train.lr=fast", "m3 train: error: config field train.lr='fast': expected float"),
])
def test_train_names_a_bad_override(tmp_path, capsys, override, message):
  code = cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path), "--no-distributed", override])
  assert code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "config.json").exists()


def test_overrides_are_refused_by_commands_without_a_config(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["export", "--ckpt", "a", "b", "--config.train.lr=1"])
  assert e.value.code == 2
  assert "m3 export takes no --config.KEY=VALUE overrides (got --config.train.lr=1)" in capsys.readouterr().err


def subparser(name: str):
  parser = cli.build_parser([name])
  sub = next(a for a in parser._actions if a.dest == "command")
  return sub.choices[name]


@pytest.mark.parametrize("name", ["train", "export", "convert", "generate", "eval", "score", "analyze", "data", "demo",
                                  "cost", "router", "serve", "info"])
def test_help_shows_defaults_and_an_example(name):
  p = subparser(name)
  for action in p._actions:
    assert action.help, f"m3 {name} {action.option_strings or action.dest} has no help text"
  text = p.format_help()
  assert "example" in text and "\n  m3 " + name in text
  if name == "export":
    assert "largest safetensors shard in GiB (default: 4.0)" in " ".join(text.split())
  if name in ("generate", "eval"):
    assert "most tokens generated per answer (default: 32)" in " ".join(text.split())


def test_export_takes_the_checkpoint_as_ckpt_or_positional():
  p = subparser("export")
  assert (p.parse_args(["--ckpt", "c", "o"]).ckpt, p.parse_args(["--ckpt", "c", "o"]).out) == ("c", "o")
  args = p.parse_args(["c", "o"])
  assert (args.ckpt_positional, args.out) == ("c", "o")


def test_scale_takes_one_value_or_a_comma_list():
  assert subparser("eval").parse_args(["--ckpt", "c", "--task", "t", "--data", "d", "--out", "o", "--scales",
                                       "144,9"]).scales == (144, 9)
  g = subparser("generate")
  assert g.parse_args(["--ckpt", "c", "--prompt", "p", "--scale", "36"]).scale == (36,)
  assert g.parse_args(["--ckpt", "c", "--prompt", "p", "--scale", "576,1"]).scale == (576, 1)
  with pytest.raises(SystemExit):
    g.parse_args(["--ckpt", "c", "--prompt", "p", "--scale", "many"])
  # A repeated scale would be answered (and appended to predictions.jsonl) twice.
  from m3_jax.cli import scale_list
  with pytest.raises(argparse.ArgumentTypeError, match="'144,9,144' names 144 more than once"):
    scale_list("144,9,144")
