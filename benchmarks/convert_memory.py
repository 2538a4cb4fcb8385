"""Peak host memory of `m3 convert` against the size of what it writes.

Builds a llava-hf LLaVA-1.5 checkpoint of a few hundred MB (random float16 weights, sharded safetensors: LLM width
1024 x 8 layers with the 32064-token vocabulary, CLIP 512 x 6 on 336-pixel images), converts it in a fresh
process for each --dtype, and reports that process's peak RSS (getrusage of the child) next to the source and
output sizes. A tiny conversion gives the baseline (Python + JAX + transformers + orbax imported).

  python benchmarks/convert_memory.py [--workdir DIR] [--out benchmarks/convert_memory.md]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from m3_jax.convert import hf
from m3_jax.convert.export import write_safetensors
from m3_jax.models.config import LLMConfig, ModelConfig, VisionConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def build_source(directory: pathlib.Path) -> ModelConfig:
  from transformers import LlavaConfig
  cfg = ModelConfig(vision=VisionConfig(image_size=336, patch_size=14, width=512, depth=6, heads=8, mlp_dim=2048),
                    llm=LLMConfig(vocab_size=32064, width=1024, depth=8, heads=16, kv_heads=16, mlp_dim=2816))
  rng = np.random.default_rng(0)
  flat = {}
  for rule in hf.rules(cfg):
    shape = ((rule.layers,) if rule.layers else ()) + rule.shape
    flat[rule.m3] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
  directory.mkdir(parents=True)
  write_safetensors(directory, cfg, flat, shard_bytes=150 << 20)
  d = hf.hf_config(cfg)
  d.pop("model_type")
  d.pop("pad_token_id")
  LlavaConfig(**d).save_pretrained(str(directory))
  return cfg


def du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
  """(peak RSS MiB, seconds) of a child process: run each measured command in its own helper process so that
  RUSAGE_CHILDREN holds exactly that one child."""
  code = ("import resource, subprocess, sys, time, json; t = time.time(); "
          f"subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL); "
          "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t]))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  rss, secs = json.loads(out.stdout.strip().splitlines()[-1])
  return rss, secs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None)
  p.add_argument("--out", default=str(REPO / "benchmarks" / "convert_memory.md"))
  args = p.parse_args(argv)
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="m3_convert_mem_"))
  src = work / "src"
  cfg = build_source(src)
  n = hf.count(cfg)
  m3 = [sys.executable, "-m", "m3_jax.cli", "convert", "--no-progress"]
  tiny = REPO.parent / "shared" / "fixtures" / "transformers-5.23.0" / "llava-1.5"
  rows = []
  base_rss, _ = peak_rss_of(m3 + [str(tiny), str(work / "tiny")])
  rows.append(("tiny fixture (baseline: imports)", du(tiny), 0, du(work / "tiny"), base_rss, 0.0))
  for dtype in ("bfloat16", "float32"):
    out = work / f"out_{dtype}"
    rss, secs = peak_rss_of(m3 + [str(src), str(out), "--dtype", dtype])
    params_bytes = n * (2 if dtype == "bfloat16" else 4)
    rows.append((f"{n / 1e6:.0f}M params, float16 shards -> {dtype}", du(src), params_bytes, du(out), rss, secs))
  mib = 1 << 20
  lines = ["| conversion | source MiB | output params in memory MiB | output on disk MiB (orbax) | peak RSS MiB | "
           "peak RSS - baseline MiB | seconds |", "|---|---|---|---|---|---|---|"]
  for name, s, pb, o, rss, secs in rows:
    lines.append(f"| {name} | {s / mib:.0f} | {pb / mib:.0f} | {o / mib:.0f} | {rss:.0f} | {rss - base_rss:.0f} | "
                 f"{secs:.1f} |")
  table = "\n".join(lines)
  pathlib.Path(args.out).write_text(
      f"# m3 convert peak memory\n\n`python benchmarks/convert_memory.py` ({time.strftime('%Y-%m-%d')}, "
      f"{os.cpu_count()} CPUs)\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  main()
