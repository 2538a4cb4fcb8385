"""`--scale auto` against the fixed-scale frontier on probes of two seeds: the router fitted on each probe's
validation split, measured on its test split, beside routers that see only the question, only the image, or both.

    python -m benchmarks.router_seeds --ckpt runs/demo/train --workdir /tmp/router_seeds [--seeds 0,1]

For each seed S, as subprocesses (the commands are printed; every step resumes):
  m3 data probe --out WORKDIR/probeS --seed S --train 4           (2000 validation, 400 test questions)
  m3 eval --ckpt CKPT --task probe --data WORKDIR/probeS --task-option split=validation --out WORKDIR/sS/validation
  m3 eval ... (split test) --out WORKDIR/sS/fixed                 (every scale)
  m3 router fit --ckpt CKPT --runs WORKDIR/sS/validation --features K --out WORKDIR/sS/router_K
  m3 eval ... (split test) --scale auto --router WORKDIR/sS/router_K --out WORKDIR/sS/auto_K
  m3 analyze WORKDIR/sS/fixed WORKDIR/sS/auto_* --out WORKDIR/sS/analysis
for K in auto (the default: the kind that routes the calibration split best out of fold), joint, image, text.
Prints one table: accuracy, mean visual tokens (routing pass included), F(t), auto - F(t), the oracle and the gap
closed, from `m3 analyze`'s analysis.json. The claim checked: the default router beats F(t) by >= 5 points on both.
Beside them, "family routing": each test question sent to its family's best scale on the validation split (the
smallest within 2 points of the family's best), the probe's true family known in hindsight plus the same 1-token
routing pass: the most a router that reads the family perfectly can reach (the rest of the oracle's gap is coarse
scales answering by luck, which no feature foresees).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

KINDS = ("auto", "joint", "image", "text")


def m3(*argv: str):
  print("$ m3 " + " ".join(argv), flush=True)
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "m3_jax", *argv], check=True, stdout=subprocess.DEVNULL)
  print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ckpt", required=True, help="a tiny M3 checkpoint trained on the probe (e.g. m3 demo's train/)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", default="0,1")
  args = p.parse_args(argv)
  wd = pathlib.Path(args.workdir)
  rows = []
  for seed in map(int, args.seeds.split(",")):
    data, out = wd / f"probe{seed}", wd / f"s{seed}"
    m3("data", "probe", "--out", str(data), "--seed", str(seed), "--train", "4")
    ev = ["eval", "--ckpt", args.ckpt, "--task", "probe", "--data", str(data), "--max-new-tokens", "4",
          "--no-progress"]
    m3(*ev, "--task-option", "split=validation", "--out", str(out / "validation"))
    ev_test = [*ev, "--task-option", "split=test"]
    m3(*ev_test, "--out", str(out / "fixed"))
    for kind in KINDS:
      router = out / f"router_{kind}"
      if not (router / "router.json").exists():
        m3("router", "fit", "--ckpt", args.ckpt, "--runs", str(out / "validation"), "--features", kind,
           "--out", str(router))
      m3(*ev_test, "--scale", "auto", "--router", str(router), "--out", str(out / f"auto_{kind}"))
    m3("analyze", str(out / "fixed"), *(str(out / f"auto_{k}") for k in KINDS), "--out", str(out / "analysis"))
    result = json.loads((out / "analysis" / "analysis.json").read_text())
    for kind, auto in zip(KINDS, _autos(result)):
      meta = json.loads((out / f"router_{kind}" / "router.json").read_text())
      rows.append((seed, kind, meta["features"], auto))
    rows.append((seed, "family routing (hindsight)", "true family", _family_routing(out, auto)))
  print("\n| probe seed | router | features | accuracy | mean tokens | F(t) | auto - F(t) | oracle | gap closed |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|")
  for seed, kind, features, a in rows:
    print(f"| {seed} | {kind} | {features} | {100 * a['score']:.1f} | {a['mean_tokens']:.1f} | "
          f"{100 * a['frontier']:.1f} | {100 * (a['score'] - a['frontier']):+.1f} | {100 * a['oracle']:.1f} | "
          f"{100 * a['gap_closed']:.0f}% |")


def _family_routing(out: pathlib.Path, auto: dict) -> dict:
  """The family-routing row, in the shape of an analysis auto row (F(t) from the same fixed scales)."""
  from m3_jax.eval.analysis import frontier, read_run
  val, test = read_run(out / "validation"), read_run(out / "fixed")
  scales = sorted(val.scales)
  best = {}
  for fam in set(val.categories.values()):
    qids = [q for q in val.scores if val.categories[q] == fam]
    acc = {s: sum(val.scores[q][s] for q in qids) / len(qids) for s in scales}
    best[fam] = next(s for s in scales if acc[s] >= max(acc.values()) - 0.02)
  chosen = {q: best[test.categories[q]] for q in test.scores}
  score = sum(test.scores[q][c] for q, c in chosen.items()) / len(chosen)
  tokens = sum(chosen.values()) / len(chosen) + scales[0]  # + the routing pass at the smallest scale
  f = frontier({s: sum(per[s] for per in test.scores.values()) / len(test.scores) for s in scales}, tokens)
  return {"score": score, "mean_tokens": tokens, "frontier": f, "oracle": auto["oracle"],
          "gap_closed": (score - f) / (auto["oracle"] - f)}


def _autos(result: dict) -> list[dict]:
  """The auto rows of `m3 analyze`'s result, in the order of the folders given to it (one per router)."""
  return [a for r in result["runs"] for a in r["auto"]]


if __name__ == "__main__":
  main()
