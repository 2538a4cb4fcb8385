"""`m3 score`: predictions from anywhere, matched by the task file's ids; id problems are listed, never scored."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from m3_jax.cli import main


def pope_file(tmp_path):
  f = tmp_path / "coco_pope_random.json"
  rows = [{"question_id": i, "image": f"COCO_val2014_{i}.jpg", "text": f"Is there a thing {i}?",
           "label": "yes" if i <= 2 else "no"} for i in range(1, 5)]
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(f)


def preds_file(tmp_path, rows, name="preds.jsonl"):
  f = tmp_path / name
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(f)


def score(capsys, *argv):
  code = main(["score", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def last_json(out):
  return json.loads(out.strip().splitlines()[-1])


def test_scores_pope_and_prints_summary_last(tmp_path, capsys):
  data = pope_file(tmp_path)
  # ids 1, 2 are "yes"; 3, 4 are "no". Predictions: yes, no, no, yes -> TP 1, FN 1, TN 1, FP 1
  preds = preds_file(tmp_path, [{"question_id": 1, "prediction": "Yes"}, {"question_id": "2", "prediction": "No"},
                                {"question_id": 3, "prediction": "No."}, {"question_id": 4, "text": "Yes it is"}])
  per = tmp_path / "per.jsonl"
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--per-sample", str(per))
  assert code == 0, err
  summary = last_json(out)
  assert summary["task"] == "pope" and summary["count"] == 4
  assert summary["accuracy"] == 0.5 and summary["precision"] == 0.5 and summary["recall"] == 0.5
  assert summary["f1"] == 0.5 and summary["yes_ratio"] == 0.5
  rows = [json.loads(l) for l in per.read_text().splitlines()]
  assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0]


def test_id_problems_are_listed_and_fail(tmp_path, capsys):
  data = pope_file(tmp_path)
  preds = preds_file(tmp_path, [{"question_id": 1, "prediction": "yes"}, {"question_id": 1, "prediction": "no"},
                                {"question_id": 99, "prediction": "yes"}, {"question_id": 3, "prediction": "no"}])
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds)
  assert code == 2 and out == ""
  assert "1 ids not in the task file: 99" in err
  assert "1 ids predicted more than once: 1" in err
  assert "2 task ids without a prediction (--allow-missing scores the rest): 2, 4" in err


def test_allow_missing_scores_the_rest_and_reports_it(tmp_path, capsys):
  data = pope_file(tmp_path)
  preds = preds_file(tmp_path, [{"question_id": 1, "prediction": "yes"}, {"question_id": 3, "prediction": "yes"}])
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--allow-missing")
  assert code == 0, err
  summary = last_json(out)
  # scored: id 1 (yes, right), id 3 (yes, wrong) -> accuracy 0.5, precision 0.5, recall 1
  assert summary["missing"] == 2 and summary["count"] == 2
  assert summary["accuracy"] == 0.5 and summary["recall"] == 1.0
  # unknown ids stay an error even with --allow-missing
  preds = preds_file(tmp_path, [{"question_id": 7, "prediction": "yes"}], "p2.jsonl")
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--allow-missing")
  assert code == 2 and "ids not in the task file: 7" in err


def test_m3_eval_files_are_scored_per_scale(tmp_path, capsys):
  data = pope_file(tmp_path)
  rows = []
  for scale, answers in ((576, ["yes", "yes", "no", "no"]), (9, ["yes", "yes", "yes", "yes"])):
    rows += [{"question_id": i + 1, "scale": scale, "prediction": a, "score": 0} for i, a in enumerate(answers)]
  preds = preds_file(tmp_path, rows)
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds)
  assert code == 0, err
  summary = last_json(out)
  assert summary["scales"]["576"]["accuracy"] == 1.0
  assert summary["scales"]["9"]["accuracy"] == 0.5 and summary["scales"]["9"]["yes_ratio"] == 1.0
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--scale", "9")
  assert code == 0 and last_json(out)["scale"] == 9 and last_json(out)["accuracy"] == 0.5
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--scale", "9,576")
  assert code == 0, err
  assert last_json(out)["scales"]["9"]["accuracy"] == 0.5 and last_json(out)["scales"]["576"]["accuracy"] == 1.0
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--scale", "36")
  assert code == 2 and "with scale 36" in err
  # A resumed or re-routed eval appends a later line for the same (question_id, scale): it replaces the earlier one.
  preds = preds_file(tmp_path, rows + [{"question_id": 1, "scale": 9, "prediction": "no", "score": 0}], "p2.jsonl")
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", preds, "--scale", "9")
  assert code == 0, err
  assert last_json(out)["accuracy"] == 0.25 and last_json(out)["count"] == 4


def test_bad_prediction_line_and_unknown_task(tmp_path, capsys):
  data = pope_file(tmp_path)
  f = tmp_path / "bad.jsonl"
  f.write_text('{"question_id": 1, "prediction": "yes"}\n{"question_id": 2, "prediction": 5}\n')
  code, out, err = score(capsys, "pope", "--data", data, "--predictions", str(f))
  assert code == 2 and "bad.jsonl, line 2: 'prediction' must be a string" in err
  code, out, err = score(capsys, "popee", "--data", data, "--predictions", str(f))
  assert code == 2 and "unknown task 'popee'; known tasks:" in err and "pope" in err


def test_console_entry_prints_summary_last(tmp_path):
  d = tmp_path / "gqa"
  d.mkdir()
  (d / "testdev_balanced_questions.json").write_text(json.dumps({
      "10": {"imageId": "n1", "question": "Is it red?", "answer": "yes"},
      "11": {"imageId": "n2", "question": "What is it?", "answer": "car"}}))
  preds = preds_file(tmp_path, [{"questionId": 0, "question_id": "10", "prediction": "Yes."},
                                {"question_id": "11", "prediction": "truck"}])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "m3_jax.cli", "score", "gqa", "--data", str(d), "--predictions",
                         preds], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  # "Yes." -> "yes" right; "truck" != "car"
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"task": "gqa", "accuracy": 0.5, "count": 2.0}


def test_match_lists_twenty_ids_then_counts_the_rest():
  from m3_jax.eval import scoring
  from m3_jax.eval.tasks import Sample
  samples = [Sample("a", "?", "x"), Sample("b", "?", "y")]
  rows = [{"question_id": f"u{i}", "scale": None, "prediction": "x"} for i in range(25)]
  rows.append({"question_id": "a", "scale": None, "prediction": "x"})
  with pytest.raises(scoring.PredictionError) as e:
    scoring.match(samples, rows, allow_missing=True)
  assert str(e.value) == "25 ids not in the task file: " + ", ".join(f"u{i}" for i in range(20)) + " ... and 5 more"
  scored, preds, missing = scoring.match(samples, rows[-1:], allow_missing=True)
  assert [s.question_id for s in scored] == ["a"] and preds == {"a": "x"} and missing == ["b"]
