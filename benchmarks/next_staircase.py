"""The LLaVA-NeXT staircase: `m3 train --config tiny:next` on the non-square probe, then `m3 eval --task probe` at
every scale; one accuracy table per family and scale.

    python -m benchmarks.next_staircase --workdir /tmp/next [--steps 900] [--limit 400] [--train 4000] [--test 400]
        [--config.KEY=VALUE ...]

Runs, as subprocesses (the commands are printed):
  m3 data probe --out WORKDIR/probe --aspects 1:1,2:1,1:2 [--train N --test N]
  m3 train --config tiny:next --workdir WORKDIR/run --config.data.path=WORKDIR/probe --config.train.num_steps=STEPS
  m3 eval --ckpt WORKDIR/run --task probe --data WORKDIR/probe --scales 144,36,9,1 --out WORKDIR/eval
The claim checked: each detail family (blocks, tiles, patches) at the scale it needs is >= 20 points above its
1-token accuracy, and `whole` is flat across scales. Takes many CPU minutes (tiny:next's 900 steps).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

SCALES = (144, 36, 9, 1)
NEEDS = {"whole": 1, "blocks": 9, "tiles": 36, "patches": 144}


def m3(*argv: str):
  cmd = [sys.executable, "-m", "m3_jax", *argv]
  print("$ m3 " + " ".join(argv), flush=True)
  start = time.perf_counter()
  subprocess.run(cmd, check=True)
  print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def table(eval_dir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{family: {scale: accuracy %}} from m3 eval's predictions (one line per sample and scale)."""
  hits: dict[str, dict[int, list[float]]] = {}
  for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
    rec = json.loads(line)
    hits.setdefault(rec["category"], {}).setdefault(int(rec["scale"]), []).append(float(rec["score"]))
  return {f: {s: 100 * sum(v) / len(v) for s, v in by.items()} for f, by in hits.items()}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=900)
  p.add_argument("--limit", type=int, default=400, help="test questions evaluated (balanced over families)")
  p.add_argument("--train", type=int, default=None, help="probe train examples (m3 data probe's default if unset)")
  p.add_argument("--test", type=int, default=None, help="probe test examples (m3 data probe's default if unset)")
  args = p.parse_args(argv)
  wd = pathlib.Path(args.workdir)
  sizes = [a for k in ("train", "test") if getattr(args, k) is not None for a in (f"--{k}", str(getattr(args, k)))]
  m3("data", "probe", "--out", str(wd / "probe"), "--aspects", "1:1,2:1,1:2", *sizes)
  m3("train", "--config", "tiny:next", "--workdir", str(wd / "run"), "--no-progress",
     f"--config.data.path={wd / 'probe'}", f"--config.train.num_steps={args.steps}", *overrides)
  m3("eval", "--ckpt", str(wd / "run"), "--task", "probe", "--data", str(wd / "probe"), "--scales",
     ",".join(map(str, SCALES)), "--out", str(wd / "eval"), "--limit", str(args.limit), "--no-progress")
  acc = table(wd / "eval")
  print("\n| family (needs) | " + " | ".join(f"{s} tok" for s in reversed(SCALES)) + " |")
  print("|---|" + "---:|" * len(SCALES))
  for family, need in NEEDS.items():
    row = acc.get(family, {})
    print(f"| {family} ({need}) | " + " | ".join(f"{row.get(s, float('nan')):.0f}" for s in reversed(SCALES)) + " |")
  for family, need in NEEDS.items():
    row = acc.get(family, {})
    if family == "whole":
      print(f"whole: spread {max(row.values()) - min(row.values()):.0f} points across scales (claim: flat)")
    else:
      print(f"{family}: {row.get(need, 0) - row.get(1, 0):+.0f} points at {need} over 1 token (claim: >= +20)")


if __name__ == "__main__":
  main()
