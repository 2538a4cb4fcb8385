"""`m3 train --no-progress` as a user runs it on CPU: periodic loss lines in the log, no TFDS dataset-building
notices or JAX backend notices, and the persistent compilation cache (M3_COMPILATION_CACHE) filled with the
run's programs, the train step among them."""
from __future__ import annotations

import os
import subprocess
import sys

from train_testlib import REPO


def test_no_progress_log_is_loss_lines_and_the_compilation_cache_fills(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", M3_COMPILATION_CACHE=str(tmp_path / "xla"),
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "m3_jax", "train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
         "--no-progress", "--config.train.num_steps=3", "--config.train.log_every=2", "--config.train.batch_size=4",
         "--config.model.vision.depth=2", "--config.model.llm.depth=1", "--config.data.probe_size=16",
         "--config.data.max_length=64", "--config.train.scales=(9, 1)", "--config.checkpoint.every=3"]
  done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  log = done.stdout + done.stderr
  assert done.returncode == 0, log[-3000:]
  loss_lines = [line for line in log.splitlines() if "m3_jax.train.loop: step " in line and ": loss " in line]
  assert [line.split("m3_jax.train.loop: ")[1].split(":")[0] for line in loss_lines] == ["step 2/3", "step 3/3"]
  for notice in ("Downloading and preparing", "downloaded and prepared", "Using custom data configuration",
                 "Unable to initialize backend", "TPU"):
    assert notice not in log, f"{notice!r} printed:\n{log[-3000:]}"
  cached = os.listdir(tmp_path / "xla")
  assert any(name.startswith("jit_train_step-") for name in cached), cached


def test_compilation_cache_location(monkeypatch, tmp_path):
  from m3_jax import compile_cache
  for var in ("M3_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.directory() == str(tmp_path / "m3_jax" / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere/jax")   # JAX's own variable is respected
  assert compile_cache.directory() == "/elsewhere/jax"
  monkeypatch.setenv("M3_COMPILATION_CACHE", "gs://bucket/xla")          # ours moves it, wherever it points
  assert compile_cache.directory() == "gs://bucket/xla"
  monkeypatch.setenv("M3_COMPILATION_CACHE", "off")
  assert compile_cache.directory() is None and compile_cache.enable() is None
