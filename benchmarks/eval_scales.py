"""A five-scale `m3 eval`: the image encoded once per chunk for every scale against once per scale.

    python -m benchmarks.eval_scales [--config tiny:grid24] [--samples 16] [--batch 8] [--new-tokens 8]
                                     [--repeats 3]

A random float32 checkpoint of the config (the probe tokenizer) answers `--samples` questions about random
48-pixel images at every scale of the config through `evaluator.evaluate` + `evaluator.model_functions`, the code
`m3 eval` runs:
  per-scale  `model_functions(..., scales=[])`: each (chunk, scale) call encodes its images at that scale (the
             engine's one-scale program: vision tower + projector + pool), the cost before images were shared.
  once       `model_functions(..., scales=SCALES)`: one encoder pass per chunk pools every scale
             (`Engine.visual_tokens_scales`).
Both write predictions into a fresh folder per run; the answers are checked equal. Warm-up (compilation) is one
untimed run of each; then the two alternate `--repeats` times so a change of machine load hits both, and the
median seconds per run, the speedup and the encoder programs run per eval are printed with /proc/loadavg.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import evaluator, predictions
from m3_jax.eval.loader import load
from m3_jax.eval.tasks import Sample, Task
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig


class _Exact(Task):
  name = "exact"

  def samples(self, path):
    raise NotImplementedError

  def score(self, sample, prediction):
    return float(prediction == sample.answers)


def loadavg() -> str:
  try:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
  except OSError:
    return "n/a"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="tiny:grid24")
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args(argv)

  cfg = ModelConfig.from_config(m3_config.load(a.config).model)
  scales = list(cfg.m3.scales)
  work = Path(tempfile.mkdtemp(prefix="m3_eval_scales_"))
  m3dir.save(work / "ckpt", cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
             template="vicuna_v1")
  model = load(work / "ckpt")
  rng = np.random.default_rng(0)
  samples = []
  for i in range(a.samples):
    path = work / f"{i}.png"
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    samples.append(Sample(f"q{i}", "what colour is the picture?", "red", image=str(path)))

  calls = {"_visual": 0, "_visual_scales": 0}
  for name in calls:
    real = getattr(model.engine, name)
    setattr(model.engine, name, lambda *x, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1)
            or _real(*x, **k))

  runs = {"per-scale": [], "once": []}
  answers, encoder = {}, {}

  def run(kind: str, timed: bool) -> None:
    out = Path(tempfile.mkdtemp(dir=work))
    generate, _ = evaluator.model_functions(model, max_new_tokens=a.new_tokens, batch_size=a.batch,
                                            scales=[] if kind == "per-scale" else scales)
    before = dict(calls)
    start = time.perf_counter()
    evaluator.evaluate(generate, _Exact(), samples, scales, out, batch_size=a.batch, progress=False)
    if timed:
      runs[kind].append(time.perf_counter() - start)
    encoder[kind] = sum(calls.values()) - sum(before.values())
    answers[kind] = {(r["question_id"], r["scale"]): r["prediction"]
                     for r in predictions.read(out / predictions.PREDICTIONS)}

  print(f"config {a.config}: scales {scales}, {a.samples} samples, batch {a.batch}, {a.new_tokens} new tokens; "
        f"devices {jax.devices()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; loadavg {loadavg()}")
  for kind in runs:
    run(kind, timed=False)
  for _ in range(a.repeats):
    for kind in runs:
      run(kind, timed=True)
  if answers["per-scale"] != answers["once"]:
    raise SystemExit("the two paths answered differently")
  med = {k: statistics.median(v) for k, v in runs.items()}
  print("| path | encoder programs per eval | s per eval (median) | runs |")
  print("|---|---:|---:|---|")
  for k in runs:
    print(f"| {k} | {encoder[k]} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in runs[k])} |")
  print(f"speedup {med['per-scale'] / med['once']:.2f}x; answers identical; loadavg {loadavg()}")


if __name__ == "__main__":
  main()
