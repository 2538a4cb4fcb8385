"""The eval output files (`eval.predictions`) and the evaluator driven by fake answer functions: no model, no JAX."""
from __future__ import annotations

import json

import pytest

from m3_jax.eval import evaluator, predictions
from m3_jax.eval.tasks import Sample, Task


class Exact(Task):
  """Score 1 when the prediction equals the answer."""
  name = "exact"

  def samples(self, path):
    raise NotImplementedError

  def score(self, sample, prediction):
    return float(prediction == sample.answers)


SAMPLES = [Sample("q0", "free", "cat", category="animal"),
           Sample("q1", "free", "dog", category="animal"),
           Sample("q2", "pick", "B", options=["x", "y"], category="choice")]


def test_read_normalises_and_names_bad_lines(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"question_id": 7, "text": "yes"}\n\n{"question_id": "8", "scale": "9", "prediction": "no"}\n')
  assert predictions.read(f) == [{"question_id": "7", "prediction": "yes", "scale": None},
                                 {"question_id": "8", "scale": 9, "prediction": "no"}]
  f.write_text('{"question_id": 1, "prediction": "a"}\n{"question_id": 2}\n')
  with pytest.raises(predictions.PredictionError,
                     match=r"p.jsonl, line 2: record lacks \['prediction'\]; m3 score needs question_id, prediction"):
    predictions.read(f, who="m3 score")
  f.write_text('{"question_id": 1, "prediction": "a", "scale": "big"}\n')
  with pytest.raises(predictions.PredictionError, match=r"line 1: 'scale' must be an integer or 'auto', got 'big'"):
    predictions.read(f)


def test_a_cut_last_line_is_skipped_only_when_unterminated(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"question_id": 1, "prediction": "a"}\n{"question_id": 2, "predi')
  assert [r["question_id"] for r in predictions.read(f)] == ["1"]
  f.write_text('{"question_id": 1, "prediction": "a"}\n{"question_id": 2, "predi\n')  # complete but broken
  with pytest.raises(predictions.PredictionError, match="line 2: not valid JSON"):
    predictions.read(f)


def test_appender_drops_a_cut_line_and_latest_wins(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"question_id": "a", "scale": 1, "prediction": "old"}\n{"question_id": "b", "sc')
  with predictions.Appender(f) as out:
    out.write([predictions.record("a", 1, "new", 1.0), predictions.record("b", 1, "b1", 0.0)])
  assert f.read_text().count("\n") == 3
  assert {k: r["prediction"] for k, r in predictions.latest(predictions.read(f)).items()} == \
      {("a", 1): "new", ("b", 1): "b1"}


def test_appender_keeps_a_whole_last_line_that_lost_its_newline(tmp_path):
  """Readers keep an unterminated last line that is valid JSON, so the appender must too (it used to drop it: the
  answer was counted by the resume that read it, then gone from the file)."""
  f = tmp_path / "p.jsonl"
  f.write_text('{"question_id": "a", "scale": 1, "prediction": "a1"}\n'
               '{"question_id": "b", "scale": 1, "prediction": "b1"}')
  assert [r["question_id"] for r in predictions.read(f)] == ["a", "b"]
  with predictions.Appender(f) as out:
    out.write([predictions.record("c", 1, "c1", 0.0)])
  assert [r["question_id"] for r in predictions.read(f)] == ["a", "b", "c"] and f.read_text().count("\n") == 3


def test_evaluate_with_fake_functions_writes_the_contract(tmp_path):
  calls = []

  def generate(samples, scale):
    calls.append(("generate", scale, [s.question_id for s in samples]))
    return ["cat" if scale == 9 else "?" for _ in samples]

  def choose(samples, scale):
    calls.append(("choose", scale, [s.question_id for s in samples]))
    return ["B" for _ in samples]

  summary = evaluator.evaluate(generate, Exact(), SAMPLES, [9, 1], tmp_path, choose=choose, batch_size=2,
                               progress=False, extra_summary={"ckpt": "c", "pool": "avg"})
  # Batches of two in sample order, each answered at every scale before the next (its image encoded once); a sample
  # with options goes to choose, the others to generate.
  assert calls == [("generate", 9, ["q0", "q1"]), ("generate", 1, ["q0", "q1"]),
                   ("choose", 9, ["q2"]), ("choose", 1, ["q2"])]
  lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert lines[0] == {"question_id": "q0", "scale": 9, "prediction": "cat", "score": 1.0, "category": "animal",
                      "prompt": "free", "answers": "cat"}
  assert [(r["question_id"], r["scale"], r["score"]) for r in lines] == [
      ("q0", 9, 1.0), ("q1", 9, 0.0), ("q0", 1, 0.0), ("q1", 1, 0.0), ("q2", 9, 1.0), ("q2", 1, 1.0)]
  assert summary == json.loads((tmp_path / "summary.json").read_text())
  assert {k: v for k, v in summary.items() if k != "scales"} == {"task": "exact", "num_samples": 3, "ckpt": "c",
                                                               "pool": "avg"}
  assert summary["scales"]["9"]["accuracy"] == pytest.approx(2 / 3)
  assert summary["scales"]["1"]["accuracy/animal"] == 0.0 and summary["scales"]["1"]["accuracy/choice"] == 1.0
  assert summary["scales"]["9"]["samples_per_second"] > 0
  csv = (tmp_path / "summary.csv").read_text().splitlines()
  assert csv[0] == "scale,accuracy,accuracy/animal,accuracy/choice,count,samples_per_second"
  assert csv[1].startswith("9,0.666")

  # A rerun answers nothing and rebuilds the same scores (no timing: nothing ran).
  calls.clear()
  again = evaluator.evaluate(generate, Exact(), SAMPLES, [9, 1], tmp_path, choose=choose, progress=False)
  assert calls == [] and again["scales"]["9"]["accuracy"] == pytest.approx(2 / 3)
  assert "samples_per_second" not in again["scales"]["9"]


def test_evaluate_without_choose_generates_multiple_choice(tmp_path):
  seen = []
  evaluator.evaluate(lambda samples, scale: seen.extend(s.question_id for s in samples) or ["B"] * len(samples),
                     Exact(), SAMPLES[2:], [1], tmp_path, progress=False)
  assert seen == ["q2"]


def test_a_samples_answer_does_not_depend_on_its_batch(tmp_path):
  """With likelihood mode (choose), a batch mixing free-form and choice samples sends each to its own function: the
  choice sample is chosen at any --batch-size (it used to be generated whenever its batch held a free-form one)."""
  calls = []
  generate = lambda samples, scale: calls.append(("generate", [s.question_id for s in samples])) or ["?"] * len(samples)
  choose = lambda samples, scale: calls.append(("choose", [s.question_id for s in samples])) or ["B"] * len(samples)
  for batch_size in (3, 1):
    calls.clear()
    summary = evaluator.evaluate(generate, Exact(), SAMPLES, [1], tmp_path / str(batch_size), choose=choose,
                                 batch_size=batch_size, progress=False)
    assert summary["scales"]["1"]["accuracy/choice"] == 1.0
    assert sorted(q for kind, ids in calls if kind == "choose" for q in ids) == ["q2"]
  assert calls == [("generate", ["q0"]), ("generate", ["q1"]), ("choose", ["q2"])]


def test_auto_lines_resume_only_for_the_same_router_and_threshold(tmp_path):
  """--budget sets the router's threshold: answers routed at another threshold are routed and answered again. The
  auto summary counts this call's samples only (a --limit 2 run in a folder that holds 3)."""
  routed = []

  def route(chunk):
    routed.extend(s.question_id for s in chunk)
    return [{"chosen_scale": 9 if s.question_id == "q0" else 1, "visual_tokens": 10 if s.question_id == "q0" else 2,
             "routing_visual_tokens": 1, "routing_flops": 5.0} for s in chunk]

  answer = lambda samples, scale: ["cat"] * len(samples)
  run = lambda samples, threshold: evaluator.evaluate(
      answer, Exact(), samples, ["auto"], tmp_path, progress=False, route=route, router_id="r1",
      router_threshold=threshold)
  run(SAMPLES, 0.5)
  assert routed == ["q0", "q1", "q2"]
  line = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
  assert line["router"] == "r1" and line["threshold"] == 0.5
  routed.clear()
  run(SAMPLES, 0.5)
  assert routed == []                      # same router, same threshold: resumed
  summary = run(SAMPLES[:2], 0.25)         # another --budget: routed again
  assert routed == ["q0", "q1"]
  # (10 + 2) / 2 visual tokens over q0 and q1; q2's line (threshold 0.5) is not this run's
  assert summary["scales"]["auto"]["mean_visual_tokens"] == 6.0
  assert summary["scales"]["auto"]["chosen_scales"] == {"9": 1, "1": 1}
