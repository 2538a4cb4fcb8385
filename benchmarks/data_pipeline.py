"""Input-pipeline throughput: samples/s for 336-pixel LLaVA-1.5 preprocessing by number of grain workers.

Writes `--images` random JPEGs of COCO-like sizes (640x480 and 480x640) and a LLaVA JSON with a 2-turn
conversation each, then times the real pipeline (decode, pad to square, bicubic resize to 336, normalise,
vicuna_v1 tokenization with labels, bucketed batching) for each worker count.

  .venv/bin/python -m benchmarks.data_pipeline [--workers 0 1 2] [--batch 8] [--batches 12]

Prints a markdown table. A training step of batch B taking t seconds needs B / t samples/s.
"""
from __future__ import annotations

import argparse
import json
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


if __name__ == "__main__":
  main()
