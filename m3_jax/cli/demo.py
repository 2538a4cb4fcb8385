"""`m3 demo`: the whole M3 loop on the embedded tiny default, on a CPU, with nothing downloaded.

1. builds the granularity probe (procedural VQA whose question families need 1, 9, 36 or 144 visual tokens),
2. trains the tiny LLaVA with the M3 objective (the loss averaged over scales 144, 36, 9, 1),
3. evaluates the checkpoint at every scale, and
4. analyses which scale each question family needs (granularity table, oracle, report.md, score_vs_tokens.png).

Every step resumes: run it again and finished work is skipped. The same steps by hand:
  m3 train --config configs/tiny.py --workdir DIR/train
  m3 eval --ckpt DIR/train --task probe --data DIR/train/probe --out DIR/eval
  m3 analyze DIR/eval
"""
from __future__ import annotations

import argparse
import pathlib
import time


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--workdir", default="runs/demo", help="where the run goes (default: runs/demo)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.py's)")
  p.add_argument("--eval-limit", type=int, default=200, help="probe test questions evaluated per scale")
  p.add_argument("--no-progress", action="store_true")


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
  print(f"[3/4] evaluating every scale -> {evaldir}", flush=True)
  code = cli.main(["eval", "--ckpt", str(train), "--task", "probe", "--data", str(train / "probe"),
                   "--out", str(evaldir), "--limit", str(args.eval_limit), "--max-new-tokens", "4", *quiet])
  if code:
    return code
  print(f"[4/4] granularity analysis -> {evaldir}/report.md, {evaldir}/score_vs_tokens.png", flush=True)
  code = cli.main(["analyze", str(evaldir)])
  print(f"demo done in {time.perf_counter() - clock:.0f} s (training {trained - clock:.0f} s)")
  return code


def _trained_steps(workdir: pathlib.Path) -> tuple[int, int]:
  """(latest checkpointed step, train.num_steps) of a training workdir."""
  import json
  wanted = int(json.loads((workdir / "config.json").read_text())["train"]["num_steps"])
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  return max(steps, default=0), wanted


def _config() -> pathlib.Path:
  """The packaged tiny config (the demo's default is the tests' default)."""
  from m3_jax.configs import base
  return base.resolve("tiny")
