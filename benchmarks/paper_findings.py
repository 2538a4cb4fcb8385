"""The paper's findings, in miniature, from one command: trains tiny models on the granularity probe, evaluates
them, and prints each finding with 95% confidence intervals beside the shape the paper reports, and a verdict.

    .venv/bin/python -m benchmarks.paper_findings --workdir runs/findings [--steps N] [--eval-limit K] [--dry-run]

Findings (paper: Matryoshka Multimodal Models, Cai et al. 2024):
1. M3 vs a specific scale (Table 2, "SS"): M3 (configs/tiny.py as `m3 demo` trains it) against a model trained at
   one scale only (`train.scales=(s,)`, the same schedule), for the finest scale and a coarse one, each evaluated
   at its own scale. The paper: M3 is at least as good.
2. M3 vs inference-time pooling (Table 4) and samplers (Table 6): the model trained at the finest scale only,
   evaluated at every coarser scale with `m3 eval --pool avg|spatial|sequential`. The paper: M3 far above each,
   the gap growing as the scale shrinks (MMBench 67.35 vs 45.45 at 9 tokens, 62.97 vs 19.33 at 1).
3. Oracle vs fixed scales (Table 2, Figure 2): M3's oracle (per question the best score over scales, `m3 analyze`)
   against each fixed scale. The paper: a large gap above every fixed scale, at far fewer tokens than the finest.

Differences M3 - X are paired over questions: `m3_jax.eval.stats.bootstrap_ci` of the per-question differences
(the questions are resampled, each keeping both of its scores). Every stage resumes: a trained model (its latest
step = --steps) and a complete eval folder are skipped, so a second run trains and evaluates nothing; a partial
one continues (`m3 train`'s resume, `m3 eval`'s cache). Writes DIR/findings.md, findings.json,
score_vs_tokens.{png,pdf,svg} (every model's score per scale, M3's oracle) and analysis/ (`m3 analyze` of M3).
Layout: DIR/probe (the shared probe data), DIR/train/{m3,ss144,ss9}, DIR/eval/{m3,ss144_avg,...,ss9}.
A benchmark, not part of CI. Expected output: benchmarks/paper_findings.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

CONFIG = "tiny"
POOLS = ("avg", "spatial", "sequential")
MAX_NEW_TOKENS = 4  # the probe's answer is one word (as `m3 demo`)
CHANCE = 1 / 6      # the probe's six answer words

EXPECT = {
    "ss": "M3 >= the model trained at that scale only, within noise (Table 2: M3 matches or beats the "
          "specific-scale models at their own scale)",
    "pool": "M3 above inference-time pooling of the finest-scale model, the gap growing as the scale shrinks "
            "(Table 4, MMBench: 67.35 vs 45.45 at 9 tokens, 62.97 vs 19.33 at 1); the spatial and sequential "
            "samplers no better than average pooling (Table 6)",
    "oracle": "the oracle above every fixed scale, at far fewer mean tokens than the finest scale (Table 2, "
              "Figure 2: a large gap between the oracle and the fixed scales)",
}


@dataclasses.dataclass
class Stage:
  """One `m3` command: `argv` for m3_jax.cli.main; `done` says whether its work is already there."""
  name: str
  argv: list[str]
  done: bool


def scales_of_config() -> tuple[int, ...]:
  from m3_jax.configs import base
  return tuple(sorted(base.load(CONFIG).model.m3.scales, reverse=True))


def trained_step(workdir: pathlib.Path) -> int:
  from m3_jax.checkpoint import workdir as workdir_lib
  return (workdir_lib.latest_step(workdir) or 0) if workdir_lib.is_workdir(workdir) else 0


def eval_complete(folder: pathlib.Path, scales, limit: int, step: int) -> bool:
  """The folder holds predictions of `step` for `limit` questions at every one of `scales`."""
  from m3_jax.eval import cache, predictions
  run = cache.read(folder)
  file = folder / "predictions.jsonl"
  if run is None or run.get("step") != step or not file.exists():
    return False
  keys = predictions.latest(predictions.read(file, ("question_id", "scale", "score"))).keys()
  return all(sum(1 for _, s in keys if s == scale) >= limit for scale in scales)


def wanted_steps(steps: int | None) -> int:
  from m3_jax.configs import base
  return steps or int(base.load(CONFIG).train.num_steps)


def plan_train(work: pathlib.Path, steps: int | None, single_scales: tuple[int, ...], progress: bool) -> list[Stage]:
  """The trainings: M3, then one model per single scale (`train.scales=(s,)`), all on the one probe folder."""
  common = ["--config.data.path=" + str(work / "probe"), *([f"--config.train.num_steps={steps}"] if steps else []),
            *([] if progress else ["--no-progress"])]
  models = {"m3": []} | {f"ss{s}": [f"--config.train.scales=({s},)"] for s in single_scales}
  return [Stage(f"train {name}", ["train", "--config", CONFIG, "--workdir", str(work / "train" / name), *common,
                                  *extra], trained_step(work / "train" / name) >= wanted_steps(steps))
          for name, extra in models.items()]


def plan_eval(work: pathlib.Path, steps: int | None, limit: int, single_scales: tuple[int, ...],
              progress: bool) -> list[Stage]:
  """The evals, planned after the trainings (each is done when its folder holds the trained step's answers)."""
  from m3_jax.eval import cache
  scales = scales_of_config()
  finest = scales[0]
  out = []

  def evaluate(name, model, eval_scales, pool=None):
    folder, wd = work / "eval" / name, work / "train" / model
    step = trained_step(wd)
    done = step >= wanted_steps(steps) and eval_complete(folder, eval_scales, limit, step)
    stale = (cache.read(folder) or {}).get("step") not in (None, step)  # answers of a shorter training
    out.append(Stage(f"eval {name}", [
        "eval", "--ckpt", str(wd), "--task", "probe", "--data", str(work / "probe"), "--limit", str(limit),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--scale", ",".join(map(str, eval_scales)), "--out", str(folder),
        *(["--pool", pool] if pool else []), *(["--overwrite"] if stale else []),
        *([] if progress else ["--no-progress"])], done))

  evaluate("m3", "m3", scales)
  if finest in single_scales:
    # The finest-scale model: its own scale and every coarser one under each inference-time pooling (the finest
    # scale is the same under every method, so only the avg run answers it).
    for pool in POOLS:
      evaluate(f"ss{finest}_{pool}", f"ss{finest}", scales if pool == "avg" else scales[1:], pool)
  for s in single_scales:
    if s != finest:
      evaluate(f"ss{s}", f"ss{s}", (s,))
  return out


# --- the findings, from eval folders (no JAX) ---------------------------------------------------------------------

def paired(a: dict[str, float], b: dict[str, float]) -> dict:
  """mean(a - b) over the questions both answer, with the paired bootstrap 95% interval (the questions resampled)."""
  from m3_jax.eval.stats import bootstrap_ci
  qids = sorted(set(a) & set(b))
  diffs = [a[q] - b[q] for q in qids]
  lo, hi = bootstrap_ci(diffs)
  return {"m3": _mean([a[q] for q in qids]), "other": _mean([b[q] for q in qids]),
          "diff": _mean(diffs), "ci": [lo, hi], "count": len(qids)}


def _mean(xs) -> float:
  return sum(xs) / len(xs) if xs else float("nan")


def verdict(ci: tuple[float, float], what: str) -> str:
  """A difference expected > 0: its interval above 0 holds, below 0 does not hold, across 0 is within noise."""
  lo, hi = ci
  if math.isnan(lo):
    return "no data"
  if lo > 0:
    return "holds"
  if hi < 0:
    return "does not hold"
  return f"within noise ({what})"


def at_scale(run, scale: int) -> dict[str, float]:
  return {q: per[scale] for q, per in run.scores.items() if scale in per}


def findings(eval_root: pathlib.Path, single_scales: tuple[int, ...]) -> dict:
  """The three findings from the eval folders under `eval_root` (m3, ss<finest>_<pool>, ss<s>), as plain data."""
  from m3_jax.eval import analysis
  from m3_jax.eval.stats import bootstrap_ci
  m3 = analysis.read_run(eval_root / "m3", "M3")
  scales = m3.scales
  finest = scales[0]
  top = list(at_scale(m3, finest).values())
  out = {"scales": scales, "m3_finest": {"score": _mean(top), "ci": list(bootstrap_ci(top)), "count": len(top)},
         "ss": [], "pool": [], "oracle": {}}
  for s in single_scales:
    folder = eval_root / (f"ss{s}_avg" if s == finest else f"ss{s}")
    if (folder / "predictions.jsonl").exists():
      d = paired(at_scale(m3, s), at_scale(analysis.read_run(folder), s))
      out["ss"].append({"scale": s, **d, "verdict": verdict(d["ci"], "M3 at least as good within noise")})
  avg = eval_root / f"ss{finest}_avg"
  for pool in POOLS:
    folder = eval_root / f"ss{finest}_{pool}"
    if not (folder / "predictions.jsonl").exists():
      continue
    run = analysis.read_run(folder)
    for s in scales[1:]:
      d = paired(at_scale(m3, s), at_scale(run, s))
      out["pool"].append({"pool": pool, "scale": s, **d, "verdict": verdict(d["ci"], "no gap detected")})
    if pool == "avg" or not avg.exists():
      continue
    for s in scales[1:]:  # Table 6: the sampler against average pooling of the same model
      d = paired(at_scale(analysis.read_run(avg), s), at_scale(run, s))
      out.setdefault("sampler_vs_avg", []).append({"pool": pool, "scale": s, **d})
  best = analysis.best_oracle(m3)
  oracle_scores = {q: max(m3.scores[q].values()) for q in best["chosen"]}
  out["oracle"] = {"score": best["score"], "ci": best["ci"], "mean_tokens": best["mean_tokens"],
                   "count": best["count"], "threshold": {k: v for k, v in analysis.oracle(m3).items()
                                                         if k in ("score", "ci", "mean_tokens")},
                   "vs": []}
  for s in scales:
    d = paired(oracle_scores, at_scale(m3, s))
    out["oracle"]["vs"].append({"scale": s, **d, "verdict": verdict(d["ci"], "no gap detected")})
  return out


def _pct(x: float) -> str:
  return "nan" if x != x else f"{100 * x:.1f}"


def _ci(ci) -> str:
  return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def report_markdown(f: dict, header: list[str]) -> str:
  """findings.md: scores in percent, M3 - X with its paired 95% bootstrap interval, the verdict per row."""
  m = f["m3_finest"]
  lines = ["# The paper's findings, in miniature", "", *header, "",
           f"M3 at its finest scale ({f['scales'][0]} tokens): {_pct(m['score'])} {_ci(m['ci'])} on {m['count']} "
           f"questions; chance is {_pct(CHANCE)}."]
  if not m["ci"][0] > CHANCE:
    lines.append("**Caveat: M3 is not above chance at its finest scale, so no finding below says anything (train "
                 "longer: --steps).**")
  lines += ["", "## 1. M3 vs a specific scale (Table 2, SS)", "", f"Paper: {EXPECT['ss']}.", "",
            "| scale | questions | M3 | trained at this scale only | M3 - SS [95% CI] | verdict |",
            "|---:|---:|---:|---:|---|---|"]
  for r in f["ss"]:
    lines.append(f"| {r['scale']} | {r['count']} | {_pct(r['m3'])} | {_pct(r['other'])} | {_pct(r['diff'])} "
                 f"{_ci(r['ci'])} | {r['verdict']} |")
  lines += ["", f"## 2. M3 vs inference-time pooling (Table 4) and samplers (Table 6) of the model trained at "
            f"{f['scales'][0]} only", "", f"Paper: {EXPECT['pool']}.", "",
            "| pooling | scale | questions | M3 | pooled | M3 - pooled [95% CI] | verdict |",
            "|---|---:|---:|---:|---:|---|---|"]
  for r in f["pool"]:
    lines.append(f"| {r['pool']} | {r['scale']} | {r['count']} | {_pct(r['m3'])} | {_pct(r['other'])} | "
                 f"{_pct(r['diff'])} {_ci(r['ci'])} | {r['verdict']} |")
  by_pool = {}
  for r in f["pool"]:
    by_pool.setdefault(r["pool"], []).append(r)
  for pool, rows in by_pool.items():
    gaps = [r["diff"] for r in sorted(rows, key=lambda r: -r["scale"])]
    grows = gaps[-1] > gaps[0] and all(b >= a for a, b in zip(gaps, gaps[1:]))
    lines.append(f"\n{pool}: the gap {'grows' if grows else 'does not grow'} as the scale shrinks "
                 f"({' -> '.join(_pct(g) for g in gaps)} points).")
  if f.get("sampler_vs_avg"):
    lines += ["", "Samplers against average pooling of the same model (avg - sampler; Table 6 expects >= 0):", "",
              "| sampler | scale | avg - sampler [95% CI] | verdict |", "|---|---:|---|---|"]
    for r in f["sampler_vs_avg"]:
      lines.append(f"| {r['pool']} | {r['scale']} | {_pct(r['diff'])} {_ci(r['ci'])} | "
                   f"{verdict(r['ci'], 'no difference detected')} |")
  o = f["oracle"]
  t = o["threshold"]
  lines += ["", "## 3. Oracle vs fixed scales (Table 2, Figure 2)", "", f"Paper: {EXPECT['oracle']}.", "",
            f"Oracle (per question the best score over scales, at the smallest scale reaching it): {_pct(o['score'])} "
            f"{_ci(o['ci'])} at {o['mean_tokens']:.1f} mean tokens on {o['count']} questions (finest scale: "
            f"{f['scales'][0]}); oracle_threshold (score >= 0.5): {_pct(t['score'])} at {t['mean_tokens']:.1f} "
            "tokens.", "",
            "| fixed scale | M3 | oracle - fixed [95% CI] | verdict |", "|---:|---:|---|---|"]
  for r in o["vs"]:
    lines.append(f"| {r['scale']} | {_pct(r['other'])} | {_pct(r['diff'])} {_ci(r['ci'])} | {r['verdict']} |")
  fewer = o["mean_tokens"] < f["scales"][0]
  best = max(o["vs"], key=lambda r: r["other"]) if o["vs"] else None
  if best:
    lines.append(f"\nAgainst the best fixed scale ({best['scale']}): {best['verdict']}; the oracle's mean tokens are "
                 f"{'below' if fewer else 'not below'} the finest scale's.")
  lines += ["", "![score vs visual tokens](score_vs_tokens.png) (M3, the single-scale models and the finest-scale "
            "model under each inference-time pooling; M3's oracle as a star; bands: 95% bootstrap intervals)", "",
            "Per question family: [analysis/report.md](analysis/report.md).", ""]
  return "\n".join(lines)


def label(folder: str) -> str:
  """An eval folder's name in the plot: m3 -> M3, ss144_spatial -> "trained at 144 only, spatial pooling"."""
  if folder == "m3":
    return "M3"
  scale, _, pool = folder.removeprefix("ss").partition("_")
  return f"trained at {scale} only" + (f", {pool} pooling" if pool else "")


def plot(eval_root: pathlib.Path, out: pathlib.Path) -> None:
  """score_vs_tokens.{png,pdf,svg}: `m3 analyze`'s plot of every model's overall score per scale (no families),
  M3's oracle as its star; the samplers' curves borrow the avg run's finest-scale point (the same answers)."""
  from m3_jax.eval import analysis
  folders = sorted(p for p in eval_root.iterdir() if (p / "predictions.jsonl").exists())
  runs = [analysis.read_run(p, label(p.name)) for p in folders]
  avg = next((r for r in runs if r.name.endswith(", avg pooling")), None)
  for r in runs:
    if avg and r.name.startswith(avg.name.removesuffix("avg pooling")):
      for q, per in r.scores.items():
        per.update({s: v for s, v in avg.scores.get(q, {}).items() if s not in per})
  result = analysis.analyze(runs)
  for r in result["runs"]:
    r["categories"] = {}
    if r["name"] != "M3":
      r["oracle"] = {**r["oracle"], "count": 0}
  analysis.plot_score_vs_tokens(result, out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="where every model, eval and the report go (resumable)")
  ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: configs/tiny.py's)")
  ap.add_argument("--eval-limit", type=int, default=400, help="probe test questions per scale (the split has 400)")
  ap.add_argument("--single-scales", default="144,9",
                  help="comma list: a model trained at each scale only (the finest one also gives the pooling runs)")
  ap.add_argument("--dry-run", action="store_true", help="print the stages and whether each is done; run nothing")
  ap.add_argument("--no-progress", action="store_true", help="no progress bars")
  a = ap.parse_args(argv)
  work = pathlib.Path(a.workdir)
  single = tuple(int(s) for s in a.single_scales.split(","))
  from m3_jax.data import probe
  if not 1 <= a.eval_limit <= probe.DEFAULT_SIZES["test"]:  # a larger limit would leave every eval "not done"
    ap.error(f"--eval-limit {a.eval_limit}: expected 1 to {probe.DEFAULT_SIZES['test']} (the probe's test split)")
  bad = [s for s in single if s not in scales_of_config()]
  if bad:
    ap.error(f"--single-scales {bad}: not scales of configs/{CONFIG}.py ({scales_of_config()})")
  progress = not a.no_progress
  trains = plan_train(work, a.steps, single, progress)
  if a.dry_run:  # the evals as they stand now (a training still to run makes its evals "to run")
    stages = trains + plan_eval(work, a.steps, a.eval_limit, single, progress)
    for i, st in enumerate(stages, 1):
      print(f"[{i}/{len(stages)}] {'done  ' if st.done else 'to run'} {st.name}: m3 {' '.join(st.argv)}")
    return 0
  from m3_jax import cli
  work.mkdir(parents=True, exist_ok=True)
  timings_file = work / "timings.json"
  timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
  total = len(trains) + len(plan_eval(work, a.steps, a.eval_limit, single, progress))
  i = 0
  for batch in (lambda: trains, lambda: plan_eval(work, a.steps, a.eval_limit, single, progress)):
    for st in batch():
      i += 1
      if st.done:
        print(f"[{i}/{total}] {st.name}: done, skipped", flush=True)
        continue
      print(f"[{i}/{total}] {st.name}: m3 {' '.join(st.argv)}", flush=True)
      start = time.perf_counter()
      code = cli.main(st.argv)
      if code:
        print(f"{st.name} failed (exit {code}); run the same command again to resume", flush=True)
        return code
      timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - start
      timings_file.write_text(json.dumps(timings, indent=1))
      workdir = pathlib.Path(st.argv[st.argv.index("--workdir") + 1]) if st.name.startswith("train") else None
      if workdir and trained_step(workdir) < wanted_steps(a.steps):  # SIGTERM saved a checkpoint and returned
        print(f"{st.name} stopped early; run the same command again to resume", flush=True)
        return 1

  from m3_jax.eval import analysis
  analysis.write_report([str(work / "eval" / "m3")], work / "analysis")
  f = findings(work / "eval", single)
  train_s = sum(v for k, v in timings.items() if k.startswith("train"))
  eval_s = sum(v for k, v in timings.items() if k.startswith("eval"))
  header = [f"`python -m benchmarks.paper_findings --workdir {a.workdir}"
            + (f" --steps {a.steps}" if a.steps else "") + f" --eval-limit {a.eval_limit}"
            + (f" --single-scales {a.single_scales}" if a.single_scales != "144,9" else "") + "`",
            "", f"configs/{CONFIG}.py on the granularity probe; wall time {train_s + eval_s:.0f} s (training "
            f"{train_s:.0f} s, evaluation {eval_s:.0f} s, summed over the runs that did the work). Scores in percent; "
            "M3 - X is paired over questions (bootstrap over questions, 1000 resamples)."]
  text = report_markdown(f, header)
  (work / "findings.md").write_text(text)
  (work / "findings.json").write_text(json.dumps(f, indent=1))
  plot(work / "eval", work)
  print(text)
  print(f"wrote {work}/findings.md, findings.json, score_vs_tokens.png (.pdf, .svg), analysis/report.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
