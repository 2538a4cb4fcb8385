"""Input-pipeline throughput: samples/s for 336-pixel LLaVA-1.5 preprocessing by number of grain workers.

Writes `--images` random JPEGs of COCO-like sizes (640x480 and 480x640) and a LLaVA JSON with a 2-turn
conversation each, then times the real pipeline (decode, pad to square, bicubic resize to 336, normalise,
vicuna_v1 tokenization with labels, bucketed batching) for each worker count.

  .venv/bin/python -m benchmarks.data_pipeline [--workers 0 1 2] [--batch 8] [--batches 12]

Prints a markdown table. A training step of batch B taking t seconds needs B / t samples/s. Then CLIP
normalisation alone, side by side: the table lookup `image.normalize` makes of uint8 RGB against the float64
arithmetic it replaces (`image._normalized`, the same bits), on one 336 x 336 image (a served request) and on the
batch (the batcher), median of 50 calls each, interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image


def make_data(folder: pathlib.Path, n: int) -> pathlib.Path:
  rng = np.random.default_rng(0)
  recs = []
  for i in range(n):
    w, h = (640, 480) if i % 2 else (480, 640)
    # Smooth random content (JPEG of white noise would be unrealistically large and slow to decode).
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    recs.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the colour of the square in this picture?"},
        {"from": "gpt", "value": "The square is red."},
        {"from": "human", "value": "How many cats are there?"},
        {"from": "gpt", "value": "two cats"}]})
  path = folder / "data.json"
  path.write_text(json.dumps(recs))
  return path


def measure(path, workers: int, batch: int, batches: int, tokenizer) -> float:
  from m3_jax.data import image as image_lib
  from m3_jax.data import pipeline, sources
  pre = pipeline.Preprocess(tokenizer=tokenizer, image_cfg=image_lib.ImageProcessorConfig.for_size(336),
                            image_token_id=4, template="vicuna_v1", max_length=1024, max_scale=576)
  it = iter(pipeline.make_dataset(sources.LlavaJson(path), pre, batch_size=batch, pad_id=3, num_workers=workers))
  next(it)  # worker start-up and first batch are not throughput
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t
  assert b["pixels"].shape == (batch, 336, 336, 3)
  return batch * batches / dt


def normalize_side_by_side(batch: int, calls: int = 50) -> list[str]:
  from m3_jax.data import image as image_lib
  cfg = image_lib.ImageProcessorConfig.for_size(336)
  rng = np.random.default_rng(0)
  rows = ["| normalise | table lookup (ms) | float64 arithmetic (ms) | ratio |", "|---|---:|---:|---:|"]
  for label, a in (("one 336 x 336 image", rng.integers(0, 256, (336, 336, 3), np.uint8)),
                   (f"a batch of {batch}", rng.integers(0, 256, (batch, 336, 336, 3), np.uint8))):
    ways = (lambda: image_lib.normalize(a, cfg),
            lambda: image_lib._normalized(a, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.image_mean,
                                          cfg.image_std))
    assert np.array_equal(ways[0]().view(np.uint32), ways[1]().view(np.uint32))
    times = ([], [])
    for _ in range(calls):
      for way, out in zip(ways, times):
        t = time.perf_counter()
        way()
        out.append(time.perf_counter() - t)
    table, arithmetic = (1000 * float(np.median(t)) for t in times)
    rows.append(f"| {label} | {table:.2f} | {arithmetic:.2f} | {arithmetic / table:.1f}x |")
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--batches", type=int, default=12)
  ap.add_argument("--images", type=int, default=64)
  a = ap.parse_args(argv)
  from m3_jax.data.tokenizer import build_tokenizer
  tok = build_tokenizer("what is the colour of square in this picture red how many cats are there two".split())
  with tempfile.TemporaryDirectory() as d:
    path = make_data(pathlib.Path(d), a.images)
    print("| workers | samples/s |\n|---:|---:|")
    for w in a.workers:
      print(f"| {w} | {measure(path, w, a.batch, a.batches, tok):.1f} |", flush=True)
  print("\n" + "\n".join(normalize_side_by_side(a.batch)) + f"\n\nload average {os.getloadavg()}")


if __name__ == "__main__":
  main()
