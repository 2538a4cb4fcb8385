"""The wheel is the product: it carries the configs and the CLI, so an installed m3-jax runs `m3 demo` and
`m3 train --config tiny` from any directory (the full fresh-virtualenv run is in the README's Testing section)."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_configs_and_runs_from_an_empty_directory(tmp_path):
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(dist)], check=True,
                 capture_output=True)
  (wheel,) = dist.glob("m3_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  for config in ("tiny", "small", "llava15_7b_m3", "llava_next_7b_m3", "base"):
    assert f"m3_jax/configs/{config}.py" in names
  assert not any(n.startswith(("tests/", "benchmarks/", "configs/")) for n in names)

  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  empty = tmp_path / "empty"
  empty.mkdir()
  env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  code = ("from m3_jax.configs import base; c = base.load('tiny'); "
          "print(base.resolve('tiny')); print(c.model.m3.scales)")
  out = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True, check=True)
  path, scales = out.stdout.split("\n")[:2]
  assert pathlib.Path(path).is_relative_to(site), path
  assert scales == "(144, 36, 9, 1)"
  out = subprocess.run([sys.executable, "-m", "m3_jax", "demo", "--help"], cwd=empty, env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr
  assert "m3 demo" in out.stdout
