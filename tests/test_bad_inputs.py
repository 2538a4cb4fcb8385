"""Every `m3` command given broken inputs ends as one `m3 CMD: error: ...` line naming the offending value, exit 2,
no traceback; the rule that tells a user error from a bug; the checks behind them (issue 11).

All in-process through `cli.main` with one tiny m3 checkpoint (zeros of the right shapes, no compile)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from m3_jax import cli, errors
from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

NOT_UTF8 = b'{"question_id": 1, "prediction": "a"}\n{"question_id": 2, "prediction": "caf\xe9"}\n'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny m3 checkpoint directory: the tiny config's shapes, zero params (built without a compile)."""
  cfg = ModelConfig.from_config(m3_config.load("tiny").model)
  shapes = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return str(m3dir.save(tmp_path_factory.mktemp("ckpt") / "m3", cfg, params, template="vicuna_v1"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  (d / "a_file").write_text("x")
  (d / "empty.jsonl").write_text("")
  (d / "empty.json").write_text("[]")
  (d / "bad.json").write_text('[{"id": 1,}]')
  (d / "not_utf8.jsonl").write_bytes(NOT_UTF8)
  (d / "not_utf8.json").write_bytes(b'[\n{"id": "1", "conversations": []},\n{"id": "caf\xe9"}\n]')
  (d / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "q", "answer": "a"}) + "\n")
  (d / "q_not_utf8.jsonl").write_bytes((d / "q.jsonl").read_bytes() + b'{"question_id": 2, "text": "caf\xe9"}\n')
  (d / "eval").mkdir()
  (d / "eval" / "predictions.jsonl").write_text("")
  return d


def run(capsys, argv) -> tuple[int, str]:
  code = cli.main(list(argv))
  return code, capsys.readouterr().err


def cases(ckpt, d):
  """(argv, text the one error line must hold). `{ckpt}` and `{d}` are filled in."""
  missing = f"{d}/missing"
  return [
      # convert / export
      (["convert", missing, f"{d}/out"], f"{missing} does not exist"),
      (["convert", ckpt, f"{d}/a_file/sub"], f"{d}/a_file is a file"),
      (["convert", ckpt, f"{d}/out", "--vision-from", missing], f"--vision-from {missing}: no such file"),
      (["export", "--ckpt", missing, f"{d}/out"], f"--ckpt {missing}: no such file"),
      (["export", "--ckpt", ckpt, f"{d}/a_file"], f"OUT {d}/a_file: {d}/a_file is a file"),
      (["export", "--ckpt", ckpt, f"{d}/out", "--shard-size-gb", "0"], "--shard-size-gb 0.0: expected a size > 0"),
      (["export", "--ckpt", str(d), f"{d}/out"], f"--ckpt {d} is neither an m3 checkpoint directory"),
      # generate
      (["generate", "--ckpt", ckpt, "--prompt", "hi", "--scale", "7"], "--scale 7 is not one of this checkpoint's "
                                                                       "scales (1, 9, 36, 144"),
      (["generate", "--ckpt", ckpt, "--prompt", "hi", "--image", missing], f"--image {missing}: no such file"),
      (["generate", "--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: expected"),
      (["generate", "--ckpt", ckpt, "--prompt", "hi", "--grid", "3by3"], "--grid '3by3': expected ROWSxCOLS"),
      # eval
      (["eval", "--ckpt", ckpt, "--task", "nosuchtask", "--data", f"{d}/q.jsonl", "--out", f"{d}/o"],
       "unknown task 'nosuchtask'; known tasks:"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", f"{d}/q.jsonl", "--out", f"{d}/o", "--scale",
        "144,5"], "--scale 5 is not one of this checkpoint's scales"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", missing, "--out", f"{d}/o"],
       f"--data {missing}: no such file"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", f"{d}/q.jsonl", "--out", f"{d}/a_file"],
       f"--out {d}/a_file: {d}/a_file is a file"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", f"{d}/q.jsonl", "--out", f"{d}/o",
        "--batch-size", "0"], "--batch-size 0: expected a number >= 1"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", f"{d}/q.jsonl", "--out", f"{d}/o",
        "--image-folder", f"{d}/a_file"], f"--image-folder {d}/a_file is a file; expected a folder"),
      (["eval", "--ckpt", ckpt, "--task", "llava_jsonl", "--data", f"{d}/q_not_utf8.jsonl", "--out", f"{d}/o"],
       f"{d}/q_not_utf8.jsonl, line 2: not UTF-8 text (byte 0xe9"),
      (["eval", "--ckpt", missing, "--task", "pope", "--data", f"{d}/q.jsonl", "--out", f"{d}/o"],
       f"--ckpt {missing}: no such file"),
      # score / analyze
      (["score", "nosuchtask", "--data", f"{d}/q.jsonl", "--predictions", f"{d}/q.jsonl"], "unknown task 'nosuchtask'"),
      (["score", "llava_jsonl", "--data", f"{d}/q.jsonl", "--predictions", missing], f"--predictions {missing}: no "),
      (["score", "llava_jsonl", "--data", f"{d}/q.jsonl", "--predictions", f"{d}/empty.jsonl"],
       f"{d}/empty.jsonl: no predictions"),
      (["score", "llava_jsonl", "--data", f"{d}/q.jsonl", "--predictions", f"{d}/not_utf8.jsonl"],
       f"{d}/not_utf8.jsonl, line 2: not UTF-8 text"),
      (["analyze", missing], f"DIR {missing}: no such file"),
      (["analyze", f"{d}/eval", "--out", f"{d}/a_file"], f"--out {d}/a_file: {d}/a_file is a file"),
      # data
      (["data", "check", missing], f"JSON {missing}: no such file"),
      (["data", "check", f"{d}/empty.json"], f"{d}/empty.json: no records (an empty list)"),
      (["data", "check", f"{d}/bad.json"], f"{d}/bad.json, line 1: not valid JSON"),
      (["data", "check", f"{d}/not_utf8.json"], f"{d}/not_utf8.json, line 3: not UTF-8 text (byte 0xe9"),
      (["data", "check", f"{d}/empty.json", "--image-folder", missing], f"--image-folder {missing}: no such"),
      (["data", "probe", "--out", f"{d}/a_file"], f"--out {d}/a_file: {d}/a_file is a file"),
      (["data", "probe", "--out", f"{d}/p", "--train", "-1"], "--train -1: expected a number >= 1"),
      # train (all before a model is built)
      (["train", "--config", "nosuchconfig", "--workdir", f"{d}/w", "--no-distributed"],
       "config 'nosuchconfig' is neither a file nor a shipped config name"),
      (["train", "--config", "tiny", "--workdir", f"{d}/w", "--no-distributed", "--config.train.batchsize=2"],
       "config has no field 'train.batchsize'"),
      (["train", "--config", "tiny", "--workdir", f"{d}/w", "--no-distributed", "--config.train.batch_size=x"],
       "config field train.batch_size='x': expected int"),
      (["train", "--config", "tiny", "--workdir", f"{d}/w", "--no-distributed", "--config.train.batch_size=12"],
       "train.batch_size=12 (micro-batch 12 with train.grad_accum=1) does not split over 8 devices"),
      (["train", "--config", "tiny:next", "--workdir", f"{d}/w", "--no-distributed",
        "--config.train.scale_sampling=random_per_sample"],
       "train.scale_sampling='random_per_sample' decodes each of the 4 scales' groups of 16 / 4 = 4 rows sharded 8 "
       "ways; 4 rows do not split over 8 shards"),
      # info / cost / router
      (["info", "--ckpt", missing], f"--ckpt {missing}: no such file"),
      (["info", str(d)], f"--ckpt {d} is neither an m3 checkpoint directory"),
      (["cost", "--config", "nosuchconfig"], "config 'nosuchconfig' is neither a file"),
      (["cost", "--config", "tiny", "--text-tokens", "-1"], "--text-tokens -1: expected a count >= 0"),
      (["cost", "--config", "tiny:next", "--image", "wide"], "--image 'wide': expected WIDTHxHEIGHT"),
      (["router", "fit", "--ckpt", missing, "--runs", str(d)], missing),
  ]


def test_every_command_names_the_bad_input_in_one_line(ckpt, files, capsys):
  seen = set()
  for argv, expected in cases(ckpt, str(files)):
    code, err = run(capsys, argv)
    name = " ".join(argv[:2] if argv[0] in ("data", "router") else argv[:1])
    seen.add(argv[0])
    assert code == 2, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert err.startswith(f"m3 {name}: error: ") and err.count("\n") == 1, (argv, err)
    assert expected in err, (argv, expected, err)
  assert seen == set(cli.COMMANDS) - {"demo", "serve"}
  assert not (files / "w").exists() and not (files / "o").exists()  # refused before anything was written


def test_debug_shows_the_traceback(ckpt, capsys):
  with pytest.raises(errors.BadValue, match="--scale 7 is not one of"):
    cli.main(["generate", "--ckpt", ckpt, "--prompt", "hi", "--scale", "7", "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch, files):
  """A ValueError raised by Python or a library inside m3_jax is a bug: it propagates (with its traceback)."""
  from m3_jax.cli import info
  monkeypatch.setattr(info, "run", lambda args: int("not a number"))
  with pytest.raises(ValueError, match="invalid literal"):
    cli.main(["info", str(files)])
  monkeypatch.setattr(info, "run", lambda args: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    cli.main(["info", str(files)])


def _raise_checked():
  raise ValueError("--thing 3: expected 1 or 2")


def test_is_user_error():
  try:
    _raise_checked()
  except ValueError as e:
    assert not errors.is_user_error(e)  # raised here, in tests/, not by m3_jax's own code
  from m3_jax.models.config import ModelConfig
  try:
    ModelConfig().check_scale(7)
  except ValueError as e:
    assert errors.is_user_error(e) and "scale 7 is not one of" in errors.message(e)
  try:
    json.loads("{")
  except ValueError as e:
    assert not errors.is_user_error(e)  # a library's error is not a check
  assert errors.is_user_error(FileNotFoundError(2, "No such file or directory", "/x/y"))
  assert errors.message(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"
  assert errors.message(KeyError("config has no field 'a'")) == "config has no field 'a'"
  assert errors.is_user_error(errors.BadFile("f"))
  assert not errors.is_user_error(RuntimeError("x"))
