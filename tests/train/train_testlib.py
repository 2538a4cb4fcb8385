"""Helpers shared by the training tests: a small run config, synthetic batches, fast CPU compiles, and the
environment for `m3 train` subprocesses (their own device count, a shared persistent compilation cache)."""
from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
# Optimisation level 0 halves XLA:CPU compile time; these tests compare numbers, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def small_overrides(**kw) -> list[str]:
  """configs/tiny.py trimmed for tests: one ViT layer used (of 2), one LLM layer (XLA:CPU compile time grows with
  depth), synthetic batches of 4 x 24 tokens, scales 9 and 1."""
  base = {"model.vision.depth": "2", "model.llm.depth": "1", "data.source": "'synthetic'", "data.max_length": "24", "train.batch_size": "4",
          "train.scales": "(9, 1)", "train.num_steps": "6", "train.log_every": "1", "train.warmup_ratio": "0.0",
          "train.finest_first_steps": "0",
          "checkpoint.every": "2", "checkpoint.keep": "3", "mesh.shape": "(1, -1, 1)"}
  base.update({k: str(v) for k, v in kw.items()})
  return [f"{k}={v}" for k, v in base.items()]


def small_config(**kw):
  from m3_jax.configs import base as m3_config
  return m3_config.load(str(REPO / "configs/tiny.py"), small_overrides(**kw))


def batch_of(config, index: int = 0) -> dict:
  from m3_jax.train.loop import make_batches
  it = make_batches(config, None)
  it.set_state({"index": index, "seed": int(config.data.seed)})
  return next(it)


def subprocess_env(tmp: pathlib.Path, devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_command(workdir, overrides: list[str], *extra: str) -> list[str]:
  return [sys.executable, "-m", "m3_jax.cli.train", "--config", str(REPO / "configs/tiny.py"), "--workdir",
          str(workdir), "--no-progress", *extra, *[f"--config.{o}" for o in overrides]]
