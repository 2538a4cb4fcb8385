"""Launchers: TPU-pod and SLURM commands rendered in a dry run (two processes on loopback, launch/local.py, train
in tests/train/test_reliability_multiprocess.py)."""
from __future__ import annotations

import shlex
import subprocess
import sys

from train_testlib import REPO


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
