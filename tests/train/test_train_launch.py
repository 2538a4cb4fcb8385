"""Launchers: TPU-pod and SLURM commands rendered in a dry run; two processes on loopback (gloo) train with the
losses of one process on the same number of devices."""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys

import jax

from m3_jax import sharding as shd
from m3_jax.train.metrics import read_metrics
from m3_jax.train import loop
from m3_jax.train.state import TrainStep

from train_testlib import FAST_COMPILE, REPO, small_config, small_overrides, subprocess_env


def run_launcher(*argv: str) -> str:
  out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_tpu_dry_run_renders_gcloud_ssh_to_all_workers():
  out = run_launcher("launch/tpu.py", "--tpu", "m3-v5p-64", "--zone", "us-east5-a", "--config",
                     "configs/llava15_7b_m3.py:init=gs://b/llava15", "--workdir", "gs://b/runs/m3",
                     "--config.train.batch_size=256", "--dry-run")
  argv = shlex.split(out.strip())
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "m3-v5p-64"]
  assert "--zone=us-east5-a" in argv and "--worker=all" in argv
  remote = next(a for a in argv if a.startswith("--command="))
  assert "-m m3_jax.cli train --config configs/llava15_7b_m3.py:init=gs://b/llava15 --workdir gs://b/runs/m3" in remote
  assert "--config.train.batch_size=256" in remote
  assert "--coordinator" not in remote   # jax.distributed.initialize() finds the pod by itself


def test_slurm_dry_run_renders_one_task_per_node():
  out = run_launcher("launch/slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100",
                     "--config", "configs/llava15_7b_m3.py", "--workdir", "/shared/runs/m3", "--config.train.lr", "2e-5",
                     "--set", "train.seed=1", "--dry-run")   # --set: the deprecated alias
  assert out.startswith("#!/bin/bash\n")
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=a100", "#SBATCH --signal=TERM@300", "#SBATCH --requeue"):
    assert line in out.splitlines()
  srun = [l for l in out.splitlines() if l.startswith("srun ")]
  assert len(srun) == 1
  assert ("m3_jax.cli train --config configs/llava15_7b_m3.py --workdir /shared/runs/m3 --config.train.seed=1 "
          "--config.train.lr=2e-5") in srun[0]


def test_two_processes_on_loopback_match_one_process(tmp_path, compile_cache, caplog):
  overrides = small_overrides(**{"train.num_steps": 3, "checkpoint.every": 2, "train.scales": "(1,)"})
  two = tmp_path / "two"
  env = subprocess_env(compile_cache, devices=2)
  env.pop("XLA_FLAGS")   # launch/local.py sets each process's device count
  argv = [sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process", "2",
          "--xla-flags=--xla_backend_optimization_level=0", "--config", str(REPO / "configs/tiny.py"),
          "--workdir", str(two), *[f"--config.{o}" for o in overrides]]
  multi = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # Meanwhile, the reference: one process (this one) on 4 devices, the same global mesh and batches.
  config = small_config(**dict(o.split("=", 1) for o in overrides))
  trainer = TrainStep(config, mesh=shd.make_mesh((1, -1, 1), jax.devices()[:4]), compiler_options=FAST_COMPILE)
  with caplog.at_level(logging.INFO, logger="m3_jax.train.loop"):
    loop.fit(trainer, tmp_path / "one", progress=False)
  assert "scale curriculum: steps 0-2 train scales 1 (the loss averaged over them)" in caplog.text
  _, err = multi.communicate(timeout=400)
  logs = "".join(p.read_text() for p in two.glob("process_*.log"))
  assert multi.returncode == 0, err[-3000:] + logs[-3000:]
  a, b = read_metrics(tmp_path / "one"), read_metrics(two)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * abs(a[step]["loss"]), (step, a[step], b[step])
  assert (two / "checkpoints" / "3").exists()
