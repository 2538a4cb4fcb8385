"""`m3 demo`, the main job, end to end at a few steps: probe -> training -> eval at every scale -> report."""
import json

from m3_jax import cli

SMALL = ("--eval-limit", "8", "--calibration-limit", "12", "--no-progress")  # 8 test, 12 validation questions


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
  work = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(work), "--steps", "2", *SMALL]) == 0
  summary = json.loads((work / "eval" / "summary.json").read_text())
  assert summary["task"] == "probe" and summary["num_samples"] == 8
  assert list(summary["scales"]) == ["auto", "144", "36", "9", "1"]
  # --features auto: the kind kept is the one of the three that routed the calibration split best out of fold
  meta = json.loads((work / "train" / "checkpoints" / "2" / "router" / "router.json").read_text())
  assert set(meta["selection"]) == {"joint", "image", "text"} and summary["router"]["features"] == meta["features"]
  assert meta["calibration"]["num_samples"] == 12
  assert summary["scales"]["auto"]["routing_visual_tokens"] == (0.0 if meta["features"] == "text" else 1.0)
  preds = (work / "eval" / "predictions.jsonl").read_text().splitlines()
  assert len(preds) == 8 * 5  # every scale and the router's choice
  report = (work / "eval" / "report.md").read_text()
  for family in ("whole", "blocks", "tiles", "patches"):  # --limit keeps the families balanced: 2 each
    assert f"| {family} (2) |" in report
  for router in ("auto", "auto (eval_auto_text)", "auto (eval_auto_image)"):  # the router and its two baselines
    assert f"| {router} | 8 |" in report
  assert (work / "train" / "checkpoints" / "2" / "router" / "router.json").exists()
  assert (work / "eval" / "score_vs_tokens.png").stat().st_size > 10_000
  steps = [json.loads(x)["step"] for x in (work / "train" / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 2
  # A second run finds everything done: no new training steps, no new predictions.
  assert cli.main(["demo", "--workdir", str(work), "--steps", "2", *SMALL]) == 0
  assert (work / "eval" / "predictions.jsonl").read_text().splitlines() == preds
  assert [json.loads(x)["step"] for x in (work / "train" / "metrics.jsonl").read_text().splitlines()] == steps
  # More training later (a smoke run, then a longer one): the demo answers again for the new step, never mixing
  # the earlier step's answers in (the eval cache would refuse them).
  assert cli.main(["demo", "--workdir", str(work), "--steps", "3", *SMALL]) == 0
  again = [json.loads(x) for x in (work / "eval" / "predictions.jsonl").read_text().splitlines()]
  assert len(again) == 8 * 5
  from m3_jax.checkpoint import reader
  assert json.loads((work / "eval" / "summary.json").read_text())["ckpt_identity"] == reader.identity(work / "train")
  assert (work / "train" / "checkpoints" / "3" / "router" / "router.json").exists()
