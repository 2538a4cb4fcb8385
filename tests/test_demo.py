"""`m3 demo`, the main job, end to end at a few steps: probe -> training -> eval at every scale -> report."""
import json

from m3_jax import cli


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
  work = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(work), "--steps", "2", "--eval-limit", "8", "--no-progress"]) == 0
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert summary["task"] == "probe" and summary["num_samples"] == 8
  assert sorted(summary["scales"], key=int) == ["1", "9", "36", "144"]
  preds = (work / "eval" / "predictions.jsonl").read_text().splitlines()
  assert len(preds) == 8 * 4
  report = (work / "eval" / "report.md").read_text()
  for family in ("whole", "blocks", "tiles", "patches"):  # --limit keeps the families balanced: 2 each
    assert f"| {family} (2) |" in report
  assert (work / "eval" / "score_vs_tokens.png").stat().st_size > 10_000
  steps = [json.loads(x)["step"] for x in (work / "train" / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 2
  # A second run finds everything done: no new training steps, no new predictions.
  assert cli.main(["demo", "--workdir", str(work), "--steps", "2", "--eval-limit", "8", "--no-progress"]) == 0
  assert (work / "eval" / "predictions.jsonl").read_text().splitlines() == preds
  assert [json.loads(x)["step"] for x in (work / "train" / "metrics.jsonl").read_text().splitlines()] == steps
