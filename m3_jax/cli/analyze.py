"""`m3 analyze DIR...`: granularity table per scale / category, the oracle, report.md and the Figure-2 plot
score_vs_tokens.png / .pdf / .svg (per-category curves, 95% bootstrap bands: `m3_jax.eval.stats`)."""
from __future__ import annotations

import argparse
import pathlib

from m3_jax.eval import analysis


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("dirs", nargs="+", metavar="DIR", help="`m3 eval` output directories (or predictions.jsonl files)")
  p.add_argument("--out", default=None,
                 help="where report.md, analysis.json and score_vs_tokens.{png,pdf,svg} go (default: DIR when one is "
                      "given, else ./m3_analysis)")
  p.add_argument("--correct-threshold", type=float, default=analysis.DEFAULT_THRESHOLD,
                 help="a sample counts as answered at a scale when its score >= this (default 0.5)")
  p.epilog = "example:\n  m3 analyze runs/demo/eval"


def run(args: argparse.Namespace) -> int:
  from m3_jax.cli import checks
  for d in args.dirs:
    checks.existing(d, "DIR")
  if args.out is not None:
    checks.output_dir(args.out, "--out")
  out = args.out
  if out is None:
    only = pathlib.Path(args.dirs[0])
    out = (only.parent if only.is_file() else only) if len(args.dirs) == 1 else "m3_analysis"
  analysis.write_report(args.dirs, out, args.correct_threshold)
  print((pathlib.Path(out) / "report.md").read_text())
  print(f"wrote {out}/report.md, {out}/analysis.json, {out}/score_vs_tokens.png (.pdf, .svg)")
  return 0
