"""The eval cache key: `m3 eval` into a folder of another checkpoint's predictions is refused (naming the fields),
a true resume computes nothing, `--overwrite` starts afresh; the data fingerprint follows content, not location."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from m3_jax import cli
from m3_jax.checkpoint import m3dir, reader
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import cache
from m3_jax.eval.loader import M3Model
from m3_jax.eval.tasks import get_task
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two tiny checkpoints that differ only in their params, and a 3-question llava_jsonl file."""
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  root = tmp_path_factory.mktemp("ckpts")
  ckpts = []
  for seed in (0, 1):
    ckpts.append(m3dir.save(root / f"seed{seed}", cfg, llava.init_params(cfg, jax.random.key(seed)),
                            tokenizer_src=probe_tokenizer(), template="vicuna_v1"))
  data = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  lines = []
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    lines.append({"question_id": f"q{i}", "image": f"{i}.png", "text": "what colour?", "answer": "red"})
  (data / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return ckpts, data / "questions.jsonl"


def m3_eval(ckpt, questions, out, *extra):
  """(exit code, last stdout line as JSON or None, stderr)."""
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = cli.main(["eval", "--ckpt", str(ckpt), "--task", "llava_jsonl", "--data", str(questions), "--scale", "9",
                     "--out", str(out), "--max-new-tokens", "2", "--no-progress", *extra])
  lines = stdout.getvalue().strip().splitlines()
  return code, (json.loads(lines[-1]) if code == 0 else None), stderr.getvalue()


@pytest.fixture(scope="module")
def done(setup, tmp_path_factory):
  """A finished eval of checkpoint seed0 (one generation compile for the whole module)."""
  (ckpt, _), questions = setup
  out = tmp_path_factory.mktemp("done") / "eval"
  code, summary, err = m3_eval(ckpt, questions, out)
  assert code == 0, err
  return out, summary


def counting_generate(monkeypatch) -> list[int]:
  calls: list[int] = []
  real = M3Model.generate
  monkeypatch.setattr(M3Model, "generate", lambda self, images, *a, **k: calls.append(len(images)) or
                      real(self, images, *a, **k))
  return calls


def test_another_checkpoint_is_refused_naming_the_identity(setup, done, tmp_path, monkeypatch):
  (ckpt0, ckpt1), questions = setup
  out = tmp_path / "eval"
  shutil.copytree(done[0], out)
  before = (out / "predictions.jsonl").read_text()
  calls = counting_generate(monkeypatch)
  code, _, err = m3_eval(ckpt1, questions, out)
  assert code == 2 and calls == []
  id0, id1 = reader.identity(ckpt0), reader.identity(ckpt1)
  assert id0 != id1
  assert f"ckpt_identity: folder {id0!r}, this run {id1!r}" in err
  assert "--overwrite" in err and "max_new_tokens" not in err  # only the differing field is named
  assert (out / "predictions.jsonl").read_text() == before
  # A generation setting is a key field too.
  code, _, err = m3_eval(ckpt0, questions, out, "--max-new-tokens", "5")
  assert code == 2 and "max_new_tokens: folder 2, this run 5" in err and "ckpt_identity" not in err


def test_a_true_resume_recomputes_nothing(setup, done, tmp_path, monkeypatch):
  (ckpt0, _), questions = setup
  out = tmp_path / "eval"
  shutil.copytree(done[0], out)
  calls = counting_generate(monkeypatch)
  code, summary, err = m3_eval(ckpt0, questions, out, "--batch-size", "1")  # batch size is not a key field
  assert code == 0, err
  assert calls == []
  assert summary["scales"] == {k: {m: v for m, v in s.items() if m != "samples_per_second"}
                               for k, s in done[1]["scales"].items()}
  assert summary["ckpt_identity"] == reader.identity(ckpt0)
  run = json.loads((out / "run.json").read_text())
  assert run["format"] == cache.FORMAT and run["key"]["ckpt_identity"] == reader.identity(ckpt0)
  assert run["key"]["template"] == "vicuna_v1" and run["key"]["pool"] == "avg" and run["key"]["grid"] is None


def test_overwrite_starts_afresh_with_the_new_checkpoint(setup, done, tmp_path, monkeypatch):
  (_, ckpt1), questions = setup
  out = tmp_path / "eval"
  shutil.copytree(done[0], out)
  calls = counting_generate(monkeypatch)
  code, summary, err = m3_eval(ckpt1, questions, out, "--overwrite")
  assert code == 0, err
  assert sum(calls) == 3
  lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert [(r["question_id"], r["scale"]) for r in lines] == [("q0", 9), ("q1", 9), ("q2", 9)]
  assert lines[0]["prompt"] == "what colour?" and lines[0]["answers"] == "red"
  assert summary["ckpt_identity"] == reader.identity(ckpt1)
  assert json.loads((out / "run.json").read_text())["key"]["ckpt_identity"] == reader.identity(ckpt1)


def test_predictions_without_a_run_file_are_refused(setup, tmp_path):
  (ckpt0, _), questions = setup
  (tmp_path / "predictions.jsonl").write_text('{"question_id": "q0", "scale": 9, "prediction": "red"}\n')
  code, _, err = m3_eval(ckpt0, questions, tmp_path)
  assert code == 2 and "holds predictions.jsonl without run.json" in err


def test_fingerprint_follows_content_not_location(tmp_path):
  task = get_task("llava_jsonl")

  def fingerprint(folder, answer="red"):
    folder.mkdir(exist_ok=True)
    (folder / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "hi",
                                                "answer": answer}) + "\n")
    fp = cache.Fingerprint(folder / "q.jsonl")
    list(fp.feed(task.samples(str(folder / "q.jsonl"))))
    return fp.hexdigest()

  a = fingerprint(tmp_path / "a")
  assert fingerprint(tmp_path / "b") == a          # the same file elsewhere
  assert fingerprint(tmp_path / "c", "blue") != a  # another reference answer
  assert len(a) == 16


def test_run_record_needs_every_key_field():
  with pytest.raises(TypeError, match="run key fields"):
    cache.run_record(ckpt="c", step=None, data="d", task="probe")


def test_a_cut_or_hand_edited_run_file_is_named_and_run_json_is_written_whole(tmp_path):
  run = cache.run_record(ckpt="c", step=None, data="d", **{k: None for k in cache.KEY_FIELDS})
  (tmp_path / "predictions.jsonl").write_text('{"question_id": "q0", "scale": 9, "prediction": "red"}\n')
  for text, found in [('{"format": "m3-eval-run/1", "key": {"ckpt_id', "not valid JSON"),
                      ('["a list"]', 'got \\["a list"\\]')]:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(cache.CacheMismatch, match=rf"run.json: expected an eval run record .*{found}.*--overwrite"):
      cache.open_run(tmp_path, run)
  cache.open_run(tmp_path, run, overwrite=True)
  assert cache.read(tmp_path) == json.loads(json.dumps(run)) and sorted(p.name for p in tmp_path.iterdir()) == [
      "run.json"]   # (no temporary file left beside it)
