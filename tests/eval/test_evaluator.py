"""`m3 eval` end to end on a tiny random checkpoint: files written, scores consistent, resume after a crash."""
import contextlib
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from m3_jax import cli
from m3_jax.checkpoint import m3dir, reader
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import evaluator, predictions
from m3_jax.eval.loader import M3Model, load
from m3_jax.eval.tasks import Sample, get_task
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
  m3dir.save(ckpt, cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
             template="vicuna_v1")
  data = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  lines = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / f"{i}.png")
    lines.append({"question_id": f"q{i}", "image": f"{i}.png", "text": "what colour is the picture?",
                  "answer": ["red", "green", "blue", "red", "teal"][i], "category": "even" if i % 2 == 0 else "odd"})
  (data / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return ckpt, data / "questions.jsonl"


def run_eval(*argv):
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert cli.main(["eval", *argv, "--no-progress"]) == 0
  return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_eval_writes_predictions_and_consistent_summaries(setup, tmp_path):
  ckpt, questions = setup
  summary = run_eval("--ckpt", str(ckpt), "--task", "llava_jsonl", "--data", str(questions), "--scales", "144,9",
                     "--out", str(tmp_path), "--max-new-tokens", "3", "--batch-size", "2")
  preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert sorted((p["question_id"], p["scale"]) for p in preds) == sorted(
      (f"q{i}", s) for i in range(5) for s in (144, 9))
  for scale in (144, 9):
    scores = [p["score"] for p in preds if p["scale"] == scale]
    assert summary["scales"][str(scale)]["accuracy"] == pytest.approx(np.mean(scores))
  assert json.loads((tmp_path / "summary.json").read_text())["task"] == "llava_jsonl"
  assert (tmp_path / "summary.csv").read_text().splitlines()[0].startswith("scale,accuracy")
  # The predictions are what the Python API gives for the same inputs.
  model = load(ckpt)
  direct = model.generate([str(questions.parent / "1.png")], ["what colour is the picture?"], scale=9,
                          max_new_tokens=3)[0]["text"]
  assert next(p for p in preds if p["question_id"] == "q1" and p["scale"] == 9)["prediction"] == direct


def test_eval_resumes_after_a_crash_without_recomputing(setup, tmp_path, monkeypatch):
  ckpt, questions = setup
  args = ("--ckpt", str(ckpt), "--task", "llava_jsonl", "--data", str(questions), "--scales", "36",
          "--out", str(tmp_path), "--max-new-tokens", "3", "--batch-size", "2")
  run_eval(*args)
  full = (tmp_path / "predictions.jsonl").read_text().splitlines()
  # A crash after two samples, in the middle of writing the third line.
  (tmp_path / "predictions.jsonl").write_text("\n".join(full[:2]) + "\n" + full[2][:10])
  calls = []
  real = M3Model.generate
  monkeypatch.setattr(M3Model, "generate", lambda self, images, *a, **k: calls.append(len(images)) or
                      real(self, images, *a, **k))
  run_eval(*args)
  assert sum(calls) == 3
  redone = predictions.latest(predictions.read(tmp_path / "predictions.jsonl"))
  assert {k: v["prediction"] for k, v in redone.items()} == \
      {(json.loads(x)["question_id"], 36): json.loads(x)["prediction"] for x in full}


def test_likelihood_mode_picks_the_most_likely_option_letter(setup):
  ckpt, questions = setup
  model = load(ckpt)
  samples = [Sample(question_id=str(i), prompt="what colour is the picture?\nA. red\nB. blue\nC. green",
                    answers="A", image=str(questions.parent / f"{i}.png"), options=["red", "blue", "green"])
             for i in range(2)]
  picked = model.choose([s.image for s in samples], [s.prompt for s in samples], [3, 3], 9)
  for s, letter in zip(samples, picked):
    ids = model.prompt_ids(s.prompt, True)
    vis = model.engine.visual_tokens(model.pixels([s.image]), 9)
    conts = [np.asarray(model.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in "ABC"]
    total, _ = model.engine.loglikelihood([ids] * 3, conts, vis * 3)
    assert letter == "ABC"[int(np.argmax(total))]


def test_bad_question_file_names_the_line(tmp_path):
  bad = tmp_path / "q.jsonl"
  bad.write_text('{"question_id": 1, "image": "a.png", "text": "hi", "answer": "x"}\n{"question_id": 2}\n')
  with pytest.raises(ValueError, match=r"q.jsonl, line 2: expected a JSON object with question_id, image, text"):
    list(get_task("llava_jsonl").samples(str(bad)))


def test_pool_flag_overrides_the_checkpoint_pooling(setup, tmp_path, monkeypatch):
  """`--pool spatial` (paper Table 6) reaches the model that pools; the checkpoint's own method is avg."""
  ckpt, questions = setup
  seen = {}

  def fake_generate(self, images, prompts, **kw):
    seen.update(pool=self.config.m3.pool, engine_pool=self.engine.model.config.m3.pool)
    return [{"text": "x"} for _ in prompts]

  def fake_evaluate(generate, task, samples, scales, out, **kw):
    seen.update(scales=scales, extra=kw["extra_summary"], answers=generate(samples[:2], 9))
    return {}

  monkeypatch.setattr(M3Model, "generate", fake_generate)
  monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
  run_eval("--ckpt", str(ckpt), "--task", "llava_jsonl", "--data", str(questions), "--out", str(tmp_path),
           "--pool", "spatial")
  assert seen == {"pool": "spatial", "engine_pool": "spatial", "scales": [144, 36, 9, 1],
                  "extra": {"ckpt": str(ckpt), "pool": "spatial", "ckpt_identity": reader.identity(ckpt)},
                  "answers": ["x", "x"]}
  assert load(ckpt).config.m3.pool == "avg"
