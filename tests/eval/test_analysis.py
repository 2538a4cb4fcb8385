"""`m3 analyze` on constructed predictions whose granularity numbers are worked out by hand."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from m3_jax import cli
from m3_jax.eval import analysis
from m3_jax.eval.stats import bootstrap_ci

# question_id -> (category, {scale: score}); the expected oracle scale is in the comment (threshold 0.5).
TABLE = {
    "q1": ("color", {144: 1, 36: 1, 9: 1, 1: 1}),           # 1 (answered with one token)
    "q2": ("color", {144: 1, 36: 1, 9: 1, 1: 0}),           # 9
    "q3": ("ocr", {144: 1, 36: 0, 9: 0, 1: 0}),             # 144
    "q4": ("ocr", {144: 0, 36: 0, 9: 0, 1: 0}),             # wrong at every scale: 1 token, not answered
    "q5": ("ocr", {144: 0.3, 36: 0.6, 9: 0.5, 1: 0.49}),    # 9 (0.5 >= 0.5 at 9; 0.49 at 1 is not)
    "q6": (None, {144: 0, 36: 1, 9: 0, 1: 0}),              # 36 (non-monotone: only the middle scale answers)
}


def write_run(folder, table, task="probe", extra_lines=()):
  folder.mkdir(parents=True)
  with open(folder / "predictions.jsonl", "w") as f:
    for qid, (cat, scores) in table.items():
      for scale, score in scores.items():
        f.write(json.dumps({"question_id": qid, "scale": scale, "prediction": "x", "score": score,
                            "category": cat}) + "\n")
    for line in extra_lines:
      f.write(json.dumps(line) + "\n")
  (folder / "summary.json").write_text(json.dumps({"task": task}))
  return folder


def test_per_scale_and_oracle_hand_worked(tmp_path):
  run = analysis.read_run(write_run(tmp_path / "a", TABLE))
  ps = analysis.per_scale(run)
  assert ps[144]["score"] == pytest.approx(3.3 / 6)
  assert ps[36]["score"] == pytest.approx(3.6 / 6)
  assert ps[9]["score"] == pytest.approx(2.5 / 6)
  assert ps[1]["score"] == pytest.approx(1.49 / 6)
  o = analysis.oracle(run)
  assert o["chosen"] == {"q1": 1, "q2": 9, "q3": 144, "q4": 1, "q5": 9, "q6": 36}
  assert o["score"] == pytest.approx(5 / 6)
  assert o["mean_tokens"] == pytest.approx(200 / 6)
  assert o["histogram"] == {144: 1, 36: 1, 9: 2, 1: 2}


@pytest.mark.parametrize("threshold, q5, score", [(0.6, 36, 5 / 6), (0.7, 1, 4 / 6), (0.3, 1, 5 / 6)])
def test_oracle_threshold(tmp_path, threshold, q5, score):
  run = analysis.read_run(write_run(tmp_path / "a", TABLE))
  o = analysis.oracle(run, threshold)
  assert o["chosen"]["q5"] == q5
  assert o["score"] == pytest.approx(score)
  # 0.6: only 36 reaches it; 0.7: no scale does (1 token, unanswered); 0.3: even 0.49 at scale 1 answers
  expected = {"q1": 1, "q2": 9, "q3": 144, "q4": 1, "q6": 36, "q5": q5}
  assert o["chosen"] == expected


def test_categories_resume_and_incomplete(tmp_path):
  # A resumed eval appends a later line for q3 @ 36: it wins. q7 lacks scales 9 and 1: left out of the oracle.
  extra = [{"question_id": "q3", "scale": 36, "prediction": "y", "score": 1.0, "category": "ocr"},
           {"question_id": "q7", "scale": 144, "prediction": "y", "score": 1.0, "category": "ocr"},
           {"question_id": "q7", "scale": 36, "prediction": "y", "score": 1.0, "category": "ocr"}]
  result = analysis.analyze([analysis.read_run(write_run(tmp_path / "a", TABLE, extra_lines=extra))])
  r = result["runs"][0]
  assert r["oracle"]["incomplete"] == 1 and r["oracle"]["count"] == 6
  color, ocr = r["categories"]["color"], r["categories"]["ocr"]
  assert color["oracle"] == {"score": 1.0, "ci": [1.0, 1.0], "mean_tokens": 5.0, "count": 2}
  # ocr, threshold variant: q3 now answered at 36, q4 unanswered (1), q5 at 9
  assert ocr["oracle_threshold"]["score"] == pytest.approx(2 / 3)
  assert ocr["oracle_threshold"]["mean_tokens"] == pytest.approx((36 + 1 + 9) / 3)
  # ocr, best score: q3 1 at 36, q4 0 (1 token), q5 its best 0.6 at 36
  assert ocr["oracle"]["score"] == pytest.approx(1.6 / 3)
  assert ocr["oracle"]["mean_tokens"] == pytest.approx((36 + 1 + 36) / 3)
  # per-scale means include q7 where it has predictions: 144 over q3,q4,q5,q7 = (1+0+0.3+1)/4
  assert ocr["per_scale"][144]["score"] == pytest.approx(2.3 / 4)
  assert ocr["per_scale"][9]["count"] == 3


def test_bad_records_are_named(tmp_path):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "predictions.jsonl").write_text(json.dumps({"question_id": "q1", "prediction": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"predictions.jsonl, line 1: record lacks \['scale', 'score'\]"):
    analysis.read_run(d)
  with pytest.raises(FileNotFoundError, match="no predictions.jsonl"):
    analysis.read_run(tmp_path / "nowhere")
  # An auto line without its visual tokens, a score that is not a number, a line without a scale: named, not a
  # bare KeyError / ValueError / TypeError.
  for line, message in [({"scale": "auto", "score": 1.0}, "question_id='q1' at scale auto: visual_tokens "
                                                          "'\\(missing\\)' is not a number"),
                        ({"scale": 9, "score": "high"}, "question_id='q1' at scale 9: score 'high' is not a number"),
                        ({"scale": None, "score": 1.0}, "question_id='q1' has no scale")]:
    (d / "predictions.jsonl").write_text(json.dumps({"question_id": "q1", "prediction": "a", **line}) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl: " + message):
      analysis.read_run(d)


def test_cli_writes_report_and_plot(tmp_path, capsys):
  a = write_run(tmp_path / "m3", TABLE)
  # A second model on the same task: all correct at 144 and 36 only.
  b = write_run(tmp_path / "baseline", {q: (c, {144: 1, 36: 1, 9: 0, 1: 0}) for q, (c, _) in TABLE.items()})
  out = tmp_path / "report"
  assert cli.main(["analyze", str(a), str(b), "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  assert "## m3 (task `probe`)" in md and "## baseline (task `probe`)" in md
  # oracle = mean best score (q5: 0.6 at 36) = 4.6 / 6 at (1+9+144+1+36+36)/6 tokens; >= 0.5: 5 / 6 at 200 / 6
  assert "| **all** (6) | 55.0 | 60.0 | 41.7 | 24.8 | 76.7 | 37.83 | 83.3 | 33.33 |" in md
  assert "| **all** (6) | 100.0 | 100.0 | 0.0 | 0.0 | 100.0 | 36.00 | 100.0 | 36.00 |" in md
  data = json.loads((out / "analysis.json").read_text())
  assert data["runs"][1]["oracle"]["mean_tokens"] == 36.0
  img = Image.open(out / "score_vs_tokens.png")
  assert img.size[0] > 400 and img.size[1] > 300
  assert (out / "score_vs_tokens.pdf").read_bytes().startswith(b"%PDF")
  svg = (out / "score_vs_tokens.svg").read_text()
  # one curve per category as well as overall, named in the legend (SVG text stays text)
  for label in ("m3 (all)", "m3: color", "m3: ocr", "baseline (all)", "baseline: color", "m3 oracle: 76.7 at 37.8"):
    assert label in svg
  assert "wrote" in capsys.readouterr().out


def test_intervals_are_bootstrap_over_questions(tmp_path):
  """Per-scale and oracle intervals are `stats.bootstrap_ci` of the per-question values they average."""
  result = analysis.analyze([analysis.read_run(write_run(tmp_path / "a", TABLE))])
  r = result["runs"][0]
  scores_at_36 = [TABLE[q][1][36] for q in sorted(TABLE)]
  assert r["per_scale"][36]["ci"] == list(bootstrap_ci(scores_at_36))
  assert r["oracle_threshold"]["ci"] == list(bootstrap_ci([1, 1, 1, 0, 1, 1]))  # q4 alone is unanswered
  assert r["oracle"]["ci"] == list(bootstrap_ci([1, 1, 1, 0, 0.6, 1]))  # the best score of each question
  # color: q1 and q2 are right at 144, so the band there has zero width
  assert r["categories"]["color"]["per_scale"][144]["ci"] == [1.0, 1.0]
  lo, hi = r["per_scale"][9]["ci"]
  assert lo < r["per_scale"][9]["score"] < hi
