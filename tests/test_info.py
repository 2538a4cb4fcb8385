"""`m3 info`: what a checkpoint is, for an m3 checkpoint directory and a training workdir step."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax import cli
from m3_jax.checkpoint import m3dir, reader, workdir
from m3_jax.configs import base as m3_config
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig


def info(capsys, *argv) -> tuple[int, str]:
  code = cli.main(["info", *argv])
  return code, capsys.readouterr().out


def test_m3_directory(tmp_path, capsys):
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  params = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), llava.init_params(cfg, jax.random.key(0)))
  ckpt = m3dir.save(tmp_path / "m3", cfg, params, template="vicuna_v1", source={"path": "/src/llava", "layout": "hf"})
  code, out = info(capsys, "--ckpt", str(ckpt), "--json")
  assert code == 0
  got = json.loads(out)
  assert got["kind"] == "m3 checkpoint directory" and got["step"] is None
  assert got["type"] == "llava15" and got["scales"] == [144, 36, 9, 1] and got["pool"] == "avg"
  assert got["parameters"] == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert got["param_dtype"] == "bfloat16" and got["template"] == "vicuna_v1"
  assert got["source"] == {"path": "/src/llava", "layout": "hf"}
  assert got["identity"] == reader.identity(ckpt) and got["router"] is None
  assert got["llm"] == {"depth": 2, "width": 128, "heads": 4, "kv_heads": 2, "vocab_size": 256}
  # a router folder (the scale router's) is shown with its metadata
  (ckpt / "router").mkdir()
  (ckpt / "router" / "router.json").write_text(json.dumps({"scales": [144, 36, 9, 1]}))
  assert json.loads(info(capsys, str(ckpt), "--json")[1])["router"] == {
      "path": str(ckpt / "router"), "router.json": {"scales": [144, 36, 9, 1]}}
  code, out = info(capsys, "--ckpt", str(ckpt))
  lines = dict(line.split(None, 1) for line in out.splitlines())
  assert lines["scales"] == "144, 36, 9, 1 (avg pooling, after_projector)"
  assert lines["parameters"] == f"{got['parameters']:,}"
  assert lines["dtype"] == "stored bfloat16, compute float32"
  assert lines["identity"] == got["identity"] and lines["router"] == str(ckpt / "router")


def test_workdir_step(tmp_path, capsys):
  cfg = ModelConfig()
  params = {"llm": {"w": jnp.arange(6.0)}, "projector": {"b": jnp.ones(3)}}
  run = {"model": cfg.to_dict(), "data": {"template": "vicuna_v1"}, "checkpoint": {"init_from": "ckpt/llava15"}}
  workdir.write_config(tmp_path / "run", json.dumps(run))
  ckpts = workdir.Checkpoints(tmp_path / "run")
  for step in (7, 8):
    ckpts.save(step, {"params": jax.tree.map(lambda x: x * step, params), "step": jnp.int32(step)})
  ckpts.close()
  latest = json.loads(info(capsys, "--ckpt", str(tmp_path / "run"), "--json")[1])
  seven = json.loads(info(capsys, "--ckpt", str(tmp_path / "run"), "--step", "7", "--json")[1])
  assert latest["step"] == 8 and seven["step"] == 7 and latest["kind"] == "training workdir"
  assert seven["identity"] == reader.identity(tmp_path / "run", 7) != latest["identity"]
  assert seven["source"] == {"trained_by": "m3 train", "init_from": "ckpt/llava15"}
  assert seven["param_dtype"] == "float32" and seven["template"] == "vicuna_v1"
  assert seven["scales"] == [576, 144, 36, 9, 1] and seven["parameters"] > 7e9  # LLaVA-1.5 7B's config
