"""LLaVA-NeXT-M3 train steps: `all` scales, each scale alone, and `random_per_sample` (paper Table 8), interleaved.

    python -m benchmarks.next_train [--config small:next] [--batch 10] [--text-tokens 32] [--rounds 3]
                                    [--sides all,single,per_sample] [--config.KEY=VALUE ...]

One synthetic NeXT batch (non-square images cycling through 2:1, 1:2, 1:1 and 3:2 aspects, so the batch mixes crop
grids; BOS, placeholder, prompt, answer, EOS; answer and EOS labelled), the config's model, float32, one device.
Sides, each one compiled TrainStep (forward + backward + AdamW):
  all         every scale each step (Eq. 3.2);
  single:S    train.scales=(S,) for each scale S: one scale's decoder pass for every row;
  per_sample  train.scale_sampling=random_per_sample: one scale per row, M groups of B/M rows.
Each timed round runs every side once, in turn, so a change of machine load hits all; medians are printed with the
load average. per_sample's decoder work is the mean of the single-scale steps' by construction; the table shows its
time over the mean single-scale time (the claim: <= 1.25). Tokens/s counts decoder positions (text + each trained
scale's real visual tokens, per row), as the trainer's log does.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ASPECTS_HW = ((1, 2), (2, 1), (1, 1), (2, 3))   # (h, w) in units of the crop side


def next_batch(config, batch: int, text_tokens: int, seed: int = 0) -> dict:
  """A host batch in the pipeline's NeXT format (pipeline.next_pixels builds the crops' layout and plans)."""
  from PIL import Image
  from m3_jax import geometry
  from m3_jax.data import pipeline
  from m3_jax.data.anyres import anyres_crops
  from m3_jax.data.image import ImageProcessorConfig
  from m3_jax.labels import IGNORE
  m = config.model
  crop = int(m.vision.image_size)
  pins = tuple(tuple(int(x) for x in p) for p in m.anyres.grid_pinpoints)
  rng = np.random.default_rng(seed)
  pcfg = ImageProcessorConfig.for_size(crop)
  examples = []
  for i in range(batch):
    h, w = ASPECTS_HW[i % len(ASPECTS_HW)]
    img = Image.fromarray(rng.integers(0, 256, (h * crop, w * crop, 3), dtype=np.uint8))
    crops, hw = anyres_crops(img, pcfg, pins, str(m.anyres.pinpoint_order))
    n = int(rng.integers(text_tokens // 2, text_tokens - 4))
    ids = [int(m.bos_token_id), int(m.image_token_id), *rng.integers(16, int(m.llm.vocab_size) - 2, n).tolist(),
           7, int(m.eos_token_id)]
    labels = [IGNORE] * (len(ids) - 2) + ids[-2:]
    examples.append({"input_ids": np.array(ids, np.int32), "labels": np.array(labels, np.int32), "crops": crops,
                     "image_hw": np.array(hw, np.int32), "has_image": True})
  scales = tuple(int(s) for s in (config.train.scales or m.m3.scales))
  collate = pipeline.Collate((text_tokens,), int(m.pad_token_id), pcfg, anyres=dict(
      grid_pinpoints=pins, order=str(m.anyres.pinpoint_order), crop=crop, scales=scales,
      crop_buckets=geometry.crop_counts(pins, str(m.anyres.pinpoint_order), crop)))
  return collate(examples)


class Side:
  """One compiled TrainStep and its state; a call runs one step and returns seconds."""

  def __init__(self, name: str, config, host: dict):
    import jax
    from m3_jax import sharding as shd
    from m3_jax.train import objective as obj
    from m3_jax.train.state import TrainStep
    self.name = name
    self.trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    self.host = {k: v for k, v in host.items() if k in self.trainer.batch_ndim}
    self.batch = shd.shard_batch(self.host, self.trainer.mesh)
    self.budget = obj.label_budget(self.host["labels"])
    start = time.perf_counter()
    self.step = self.trainer.compiled_step(self.batch, self.budget)
    self.compile_s = time.perf_counter() - start
    self.state = self.trainer.init_state(seed=0)
    self.state, m = self.step(self.state, self.batch)   # warm-up
    jax.block_until_ready(m)
    text = int(self.host["attention_mask"].sum())
    visual = [int((self.host[obj.index_key(s)] >= 0).sum()) for s in self.trainer.scales]
    per_scale = [text + v for v in visual]
    self.tokens = sum(per_scale) if self.trainer.curriculum.sampling == "all" else sum(per_scale) / len(per_scale)

  def __call__(self) -> float:
    import jax
    start = time.perf_counter()
    self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready(m)
    return time.perf_counter() - start


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="small:next")
  p.add_argument("--batch", type=int, default=10)
  p.add_argument("--text-tokens", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--sides", default="all,single,per_sample")
  args = p.parse_args(argv)
  from m3_jax.configs import base as m3_config

  def config(*extra):
    return m3_config.load(args.config, [f"train.batch_size={args.batch}", *overrides, *extra])

  base = config()
  scales = tuple(int(s) for s in (base.train.scales or base.model.m3.scales))
  host = next_batch(base, args.batch, args.text_tokens)
  load_before = os.getloadavg()
  print(f"# NeXT train step: {args.config}, batch {args.batch}, text {args.text_tokens}, crops/row "
        f"{host['pixels'].shape[1]} (bucket), scales {scales}; /proc/loadavg {load_before}", flush=True)
  sides = []
  wanted = args.sides.split(",")
  if "all" in wanted:
    sides.append(Side("all", config(), host))
  if "single" in wanted:
    sides += [Side(f"single:{s}", config(f"train.scales=({s},)"), host) for s in scales]
  if "per_sample" in wanted:
    sides.append(Side("per_sample", config("train.scale_sampling=random_per_sample"), host))
  for s in sides:
    print(f"compiled {s.name} in {s.compile_s:.1f}s", flush=True)
  times = {s.name: [] for s in sides}
  for r in range(args.rounds):
    for s in sides:
      times[s.name].append(s())
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
          + f" (load {os.getloadavg()[0]:.1f})", flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  print("\n| side | median s/step | decoder tokens/step | tokens/s | programs compiled |")
  print("|---|---|---|---|---|")
  for s in sides:
    print(f"| {s.name} | {med[s.name]:.3f} | {s.tokens:.0f} | {s.tokens / med[s.name]:.0f} | "
          f"{len(s.trainer._compiled)} |")
  singles = [med[k] for k in med if k.startswith("single:")]
  if singles and "per_sample" in med:
    print(f"\nper_sample / mean single-scale step: {med['per_sample'] / statistics.mean(singles):.3f} "
          f"(claim: <= 1.25)")
  if singles and "all" in med:
    print(f"all / mean single-scale step: {med['all'] / statistics.mean(singles):.3f}")
  print(f"\n/proc/loadavg before: {' '.join(map(str, load_before))}; after: "
        f"{pathlib.Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
  main()
