"""Train-step cost of the two scale-loss implementations (`train.scale_loss`: loop vs vmap).

    python -m benchmarks.train_step [--configs tiny,small] [--batch 8] [--steps 5] [--max-length 64]

For each config and implementation: the AOT compile time, XLA's temporary memory for the step, and the median
wall time of a full train step (forward over every scale, backward, AdamW) on one device, on synthetic batches.
Prints a markdown table. `loop` runs each scale's decoder at its own length T + scale - 1; `vmap` pads every
scale to the largest and runs one vmapped pass (M x (T + S_max - 1) tokens).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax

from m3_jax.configs import base as m3_config
from m3_jax.train import objective as obj
from m3_jax import sharding as shd
from m3_jax.train.loop import make_batches
from m3_jax.train.state import TrainStep

REPO = pathlib.Path(__file__).resolve().parents[1]


def measure(name: str, impl: str, batch: int, steps: int, max_length: int, label_budget: bool = True) -> dict:
  config = m3_config.load(str(REPO / "configs" / f"{name}.py"), [
      "data.source='synthetic'", f"data.max_length={max_length}", f"train.batch_size={batch}",
      f"train.scale_loss='{impl}'", "mesh.shape=(1, 1, 1)"])
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  batches = make_batches(config, None)
  state = trainer.init_state()
  host = next(batches)
  budget = obj.label_budget(host["labels"]) if label_budget else None   # None: every text position
  b = shd.shard_batch(host, trainer.mesh)
  start = time.perf_counter()
  step = trainer.compiled_step(b, budget)
  compile_s = time.perf_counter() - start
  temp = step.memory_analysis().temp_size_in_bytes / 2**20
  state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    b = shd.shard_batch(next(batches), trainer.mesh)
    start = time.perf_counter()
    state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return dict(config=name, impl=impl, scales=trainer.scales, batch=batch, text=max_length, budget=budget or max_length,
              compile_s=compile_s,
              temp_mib=temp, step_s=statistics.median(times), loss=float(metrics["loss"]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="tiny,small")
  p.add_argument("--impls", default="loop,vmap")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--max-length", type=int, default=64, help="text tokens per row (before visual tokens)")
  p.add_argument("--all-positions", action="store_true",
                 help="logits at every text position instead of the per-batch label budget")
  args = p.parse_args(argv)
  rows = []
  for name in args.configs.split(","):
    for impl in args.impls.split(","):
      r = measure(name, impl, args.batch, args.steps, args.max_length, not args.all_positions)
      rows.append(r)
      print(f"# {r}", flush=True)
  print(f"\nTrain step on {jax.devices()[0].device_kind} (1 device), batch {args.batch}, {args.max_length} text "
        f"tokens per row, logits at {rows[0]['budget']} positions per row, all scales per step:\n")
  print("| config | scales | scale_loss | step (s) | vs loop | compile (s) | XLA temp memory (MiB) | loss |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    base = next(x for x in rows if x["config"] == r["config"] and x["impl"] == "loop")["step_s"]
    print(f"| {r['config']} | {','.join(map(str, r['scales']))} | {r['impl']} | {r['step_s']:.3f} | "
          f"{r['step_s'] / base:.2f}x | {r['compile_s']:.1f} | {r['temp_mib']:.0f} | {r['loss']:.4f} |")


if __name__ == "__main__":
  main()
