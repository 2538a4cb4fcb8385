"""benchmarks/paper_findings.py on hand-made eval folders: the paired differences, their intervals, the verdicts,
the report lines and the resume check (no model, no JAX)."""
from __future__ import annotations

import json

import pytest

from benchmarks import paper_findings as pf
from m3_jax.eval import predictions

Q = ("q0", "q1", "q2", "q3")
# M3: every question right at 144; q3 needs 144, q2 36, q1 9, q0 is right even at 1 token.
M3 = {144: (1, 1, 1, 1), 36: (1, 1, 1, 0), 9: (1, 1, 0, 0), 1: (1, 0, 0, 0)}


def _folder(root, name, scores, qids=Q, step=4):
  out = root / name
  out.mkdir(parents=True)
  predictions.write(out / predictions.PREDICTIONS, [predictions.record(q, s, "x", float(v)) for s, vals in
                                                    scores.items() for q, v in zip(qids, vals)])
  predictions.write_summary(out, {"task": "probe", "scales": {}})
  (out / predictions.RUN).write_text(json.dumps({"format": "m3-eval-run/1", "key": {}, "step": step}))
  return out


@pytest.fixture
def evals(tmp_path):
  _folder(tmp_path, "m3", M3)
  _folder(tmp_path, "ss144_avg", {144: (1, 1, 1, 1), 36: (.5, .5, .5, .5), 9: (0, 0, 0, 0), 1: (0, 0, 0, 0)})
  _folder(tmp_path, "ss144_spatial", {36: (0, 0, 0, 0), 9: (0, 0, 0, 0), 1: (0, 0, 0, 0)})
  _folder(tmp_path, "ss144_sequential", {36: (1, 1, 1, 0), 9: (0, 1, 0, 0), 1: (0, 0, 0, 0)})
  _folder(tmp_path, "ss9", {9: (1, 1)}, qids=("q2", "q3"))  # only two questions: paired over those
  return tmp_path


def _row(rows, **match):
  return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def test_findings_numbers_and_verdicts(evals):
  f = pf.findings(evals, (144, 9))
  assert f["scales"] == [144, 36, 9, 1]
  assert f["m3_finest"] == {"score": 1.0, "ci": [1.0, 1.0], "count": 4}
  # SS at 144: the same answers -> 0 with a zero-width interval; SS at 9: on q2, q3 M3 0 vs 1 -> -1 everywhere.
  ss144, ss9 = _row(f["ss"], scale=144), _row(f["ss"], scale=9)
  assert (ss144["diff"], ss144["ci"], ss144["count"]) == (0.0, [0.0, 0.0], 4)
  assert ss144["verdict"].startswith("within noise")
  assert (ss9["m3"], ss9["other"], ss9["diff"], ss9["ci"], ss9["count"]) == (0.0, 1.0, -1.0, [-1.0, -1.0], 2)
  assert ss9["verdict"] == "does not hold"
  # avg at 36: M3 (1, 1, 1, 0) - 0.5 each = (.5, .5, .5, -.5) -> .25; at 9 (1, 1, 0, 0) -> .5; at 1 -> .25.
  assert [_row(f["pool"], pool="avg", scale=s)["diff"] for s in (36, 9, 1)] == [0.25, 0.5, 0.25]
  # sequential at 36 answers as M3 -> 0 (zero width); at 9 M3 - (0, 1, 0, 0) = (1, 0, 0, 0) -> .25.
  seq36 = _row(f["pool"], pool="sequential", scale=36)
  assert (seq36["diff"], seq36["ci"], seq36["verdict"].startswith("within noise")) == (0.0, [0.0, 0.0], True)
  assert _row(f["pool"], pool="sequential", scale=9)["diff"] == 0.25
  # Table 6: avg - spatial at 36 is 0.5 on every question -> [.5, .5].
  sp36 = _row(f["sampler_vs_avg"], pool="spatial", scale=36)
  assert (sp36["diff"], sp36["ci"]) == (0.5, [0.5, 0.5])
  # Oracle: every question right somewhere -> 1.0, at 1, 9, 36, 144 tokens -> mean 47.5.
  o = f["oracle"]
  assert (o["score"], o["ci"], o["mean_tokens"], o["count"]) == (1.0, [1.0, 1.0], 47.5, 4)
  vs144, vs1 = _row(o["vs"], scale=144), _row(o["vs"], scale=1)
  assert (vs144["diff"], vs144["ci"]) == (0.0, [0.0, 0.0])
  # Oracle - 1 token = (0, 1, 1, 1): a resample of four questions averages 0 only when all four are q0,
  # (1/4)^4 = 0.4% < 2.5% of resamples, so the interval's lower end is above 0.
  assert vs1["diff"] == 0.75 and vs1["ci"][0] > 0 and vs1["verdict"] == "holds"


def test_report_lines(evals):
  f = pf.findings(evals, (144, 9))
  text = pf.report_markdown(f, ["`the command`"])
  assert "| 9 | 2 | 0.0 | 100.0 | -100.0 [-100.0, -100.0] | does not hold |" in text
  assert "| avg | 9 | 4 | 50.0 | 0.0 | 50.0 [" in text
  assert "avg: the gap does not grow as the scale shrinks (25.0 -> 50.0 -> 25.0 points)." in text
  assert "sequential: the gap grows as the scale shrinks (0.0 -> 25.0 -> 25.0 points)." in text
  assert "100.0 [100.0, 100.0] at 47.5 mean tokens on 4 questions" in text
  assert "67.35 vs 45.45 at 9 tokens" in text and "Caveat" not in text
  f["m3_finest"] = {"score": 0.0, "ci": [0.0, 0.0], "count": 4}
  assert "**Caveat: M3 is not above chance" in pf.report_markdown(f, [])


def test_eval_complete_needs_the_step_and_every_question(evals):
  folder = evals / "m3"
  assert pf.eval_complete(folder, (144, 36, 9, 1), 4, step=4)
  assert not pf.eval_complete(folder, (144, 36, 9, 1), 5, step=4)   # a larger --eval-limit
  assert not pf.eval_complete(folder, (144, 36, 9, 1), 4, step=900)  # answers of a shorter training
  assert not pf.eval_complete(evals / "ss9", (9,), 4, step=4)        # two questions only
