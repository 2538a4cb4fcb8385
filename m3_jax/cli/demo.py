"""`m3 demo`: the whole M3 loop on the embedded tiny default, on a CPU, with nothing downloaded.

1. builds the granularity probe (procedural VQA whose question families need 1, 9, 36 or 144 visual tokens),
2. trains the tiny LLaVA with the M3 objective (the loss averaged over scales 144, 36, 9, 1),
3. evaluates the checkpoint at every scale on the probe's test split,
4. fits the scale router (`--scale auto`; its features chosen out of fold on the calibration split) on the
   validation split at every scale, and two baselines that see only the question / only the image, and evaluates
   each on the test split, and
5. analyses which scale each question family needs (granularity table, oracle, the routers against the fixed-scale
   frontier, report.md, score_vs_tokens.png).

Every step resumes: run it again and finished work is skipped. The same steps by hand:
  m3 train --config configs/tiny.py --workdir DIR/train
  m3 eval --ckpt DIR/train --task probe --data DIR/train/probe --out DIR/eval
  m3 eval --ckpt DIR/train --task probe --data DIR/train/probe --task-option split=validation --out DIR/eval_validation
  m3 router fit --ckpt DIR/train --runs DIR/eval_validation        (+ --features text|image --out DIR/routers/...)
  m3 eval --ckpt DIR/train --task probe --data DIR/train/probe --scale auto --out DIR/eval
  m3 analyze DIR/eval DIR/eval_auto_text DIR/eval_auto_image --out DIR/eval
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--workdir", default="runs/demo", help="where the run goes (default: runs/demo)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.py's)")
  p.add_argument("--eval-limit", type=int, default=200, help="probe test questions evaluated per scale")
  p.add_argument("--calibration-limit", type=int, default=None,
                 help="probe validation questions the router is fitted on (default: the whole split, 2000)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.epilog = "example:\n  m3 demo --workdir runs/demo --steps 2 --eval-limit 4   # a smoke run in about a minute"


def run(args) -> int:
  from m3_jax import cli
  work = pathlib.Path(args.workdir)
  train, evaldir = work / "train", work / "eval"
  quiet = ["--no-progress"] if args.no_progress else []
  steps = [f"--config.train.num_steps={args.steps}"] if args.steps else []
  clock = time.perf_counter()
  print(f"[1-2/4] probe dataset + M3 training -> {train}", flush=True)
  code = cli.main(["train", "--config", str(_config()), "--workdir", str(train), *steps, *quiet])
  if code:
    return code
  done, wanted = _trained_steps(train)
  if done < wanted:  # SIGTERM saved a checkpoint and returned: stop here, the next run resumes
    print(f"training stopped at step {done} of {wanted}; run the same command again to resume", flush=True)
    return 1
  trained = time.perf_counter()
  _forget_stale(work, train)
  print(f"[3/5] evaluating every scale -> {evaldir}", flush=True)
  probe_eval = ["eval", "--ckpt", str(train), "--task", "probe", "--data", str(train / "probe"),
                "--max-new-tokens", "4", *quiet]
  test = ["--limit", str(args.eval_limit)]
  code = cli.main([*probe_eval, *test, "--out", str(evaldir)])
  if code:
    return code
  calibration = [] if args.calibration_limit is None else ["--limit", str(args.calibration_limit)]
  code = _routers(cli, work, train, probe_eval, test, calibration)
  if code:
    return code
  print(f"[5/5] granularity analysis -> {evaldir}/report.md, {evaldir}/score_vs_tokens.png", flush=True)
  code = cli.main(["analyze", str(evaldir), *(str(work / f"eval_auto_{b}") for b in BASELINES), "--out",
                   str(evaldir)])
  print(f"demo done in {time.perf_counter() - clock:.0f} s (training {trained - clock:.0f} s)")
  return code


BASELINES = ("text", "image")  # routers that see only the question / only the image


def _routers(cli, work: pathlib.Path, train: pathlib.Path, probe_eval: list[str], test: list[str],
             calibration_limit: list[str]) -> int:
  """The scale router fitted on the validation split (saved in the step's folder; the baselines under
  work/routers/), each evaluated with --scale auto on the test split (the router beside the fixed scales in
  work/eval, the baselines in work/eval_auto_text and work/eval_auto_image). A router already fitted is kept."""
  from m3_jax.checkpoint import reader
  from m3_jax.eval.router import store
  calibration = work / "eval_validation"
  print(f"[4/5] scale router: every scale on the validation split -> {calibration}, fit, auto on test", flush=True)
  # The whole validation split by default: with 400 noisy labels the router's gain over F(t) on a second probe seed
  # fell from +5 to +2 points (README).
  code = cli.main([*probe_eval, *calibration_limit, "--task-option", "split=validation", "--out", str(calibration)])
  fits = [("auto", pathlib.Path(str(reader.home(train))) / store.FOLDER, work / "eval")]
  fits += [(b, work / "routers" / b, work / f"eval_auto_{b}") for b in BASELINES]
  for features, folder, out in fits:
    if code:
      return code
    if not (folder / store.META).exists():
      code = cli.main(["router", "fit", "--ckpt", str(train), "--runs", str(calibration), "--features", features,
                       "--out", str(folder)])
    # With the fixed scales (already answered, so resumed) in work/eval: its summary keeps every scale.
    scales = "auto" if features in BASELINES else ",".join(["auto", *map(str, reader.model_config(train).m3.scales)])
    code = code or cli.main([*probe_eval, *test, "--scale", scales, "--router", str(folder), "--out", str(out)])
  return code


def _forget_stale(work: pathlib.Path, train: pathlib.Path):
  """Training moved on since the last demo run (e.g. `--steps 2`, then the full run): the eval folders and the
  baseline routers made for the older step belong to another checkpoint identity, so they are removed and made
  again (the eval cache would rightly refuse them). The main router lives in the step's own folder."""
  import shutil
  from m3_jax.checkpoint import reader
  from m3_jax.eval import cache
  from m3_jax.eval.router import store
  identity = reader.identity(train)
  for folder in [work / "eval", work / "eval_validation", *(work / f"eval_auto_{b}" for b in BASELINES)]:
    run = cache.read(folder) if folder.exists() else None
    if run is not None and run.get("key", {}).get("ckpt_identity") != identity:
      print(f"{folder} holds answers of an earlier step: evaluating again", flush=True)
      shutil.rmtree(folder)
  for b in BASELINES:
    meta = work / "routers" / b / store.META
    if meta.exists() and json.loads(meta.read_text()).get("ckpt_identity") != identity:
      shutil.rmtree(meta.parent)


def _trained_steps(workdir: pathlib.Path) -> tuple[int, int]:
  """(latest checkpointed step, train.num_steps) of a training workdir."""
  from m3_jax.checkpoint import workdir as workdir_lib
  wanted = int(workdir_lib.read_config(workdir)["train"]["num_steps"])
  return workdir_lib.latest_step(workdir) or 0, wanted


def _config() -> pathlib.Path:
  """The packaged tiny config (the demo's default is the tests' default)."""
  from m3_jax.configs import base
  return base.resolve("tiny")
