"""A training run becomes a model: `m3 export --ckpt WORKDIR --step N OUT` writes a llava-hf directory whose
transformers logits equal m3's on the step's params, and `m3 convert WORKDIR OUT --step N` an m3 checkpoint
directory with the run's tokenizer and preprocessor and the same identity as the workdir step."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.checkpoint import m3dir, reader, workdir as workdir_lib
from m3_jax.cli import main
from m3_jax.configs import base as m3_config
from m3_jax.models.llava import LlavaM3

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["model.vision.depth=2", "model.llm.depth=1", "train.scales=(9, 1)", "mesh.shape=(1, -1, 1)"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with steps 1 and 2 (random params: export does not care how they were reached), the probe tokenizer
  and preprocessor the data pipeline writes."""
  from m3_jax.data.tokenizer import probe_tokenizer
  from m3_jax.train.state import TrainStep
  wd = tmp_path_factory.mktemp("run")
  config = m3_config.load(str(REPO / "configs/tiny.py"), OVERRIDES)
  workdir_lib.write_config(wd, config.to_json_best_effort(indent=2, sort_keys=True))
  workdir_lib.write_processor(wd, probe_tokenizer(), m3dir.default_preprocessor(
      reader.model_config(wd)) | {"crop_size": {"height": 48, "width": 48}})
  trainer = TrainStep(config)
  ckpts = workdir_lib.Checkpoints(wd, async_save=False)
  for step, seed in ((1, 1), (2, 2)):
    ckpts.save(step, trainer.init_state(seed=seed), force=True)
  ckpts.close()
  return wd


def test_export_of_a_workdir_step_reloads_in_transformers_with_the_same_logits(run, tmp_path):
  import torch
  from transformers import AutoTokenizer, LlavaForConditionalGeneration
  assert main(["export", "--ckpt", str(run), "--step", "1", str(tmp_path / "hf")]) == 0
  model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                        dtype=torch.float32).eval()
  ckpt = reader.read_checkpoint(run, 1)
  cfg = ckpt.config
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(1, 48, 48, 3)).astype(np.float32)
  text = rng.integers(5, cfg.llm.vocab_size, size=6)
  m3_ids = np.concatenate([[cfg.bos_token_id], text[:3], [cfg.image_token_id], text[3:]])[None].astype(np.int32)
  hf_ids = np.concatenate([[cfg.bos_token_id], text[:3], [cfg.image_token_id] * cfg.full_scale, text[3:]])[None]
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ckpt.params)
  want = np.asarray(LlavaM3(cfg).apply({"params": params}, jnp.asarray(m3_ids), jnp.asarray(pixels),
                                       scale=cfg.full_scale))
  with torch.no_grad():
    got = model(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits
  got = got.numpy()
  n_text = m3_ids.shape[1] - 1
  assert got.shape[1] == n_text + cfg.full_scale
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert tok.get_vocab() == AutoTokenizer.from_pretrained(ckpt.tokenizer_dir).get_vocab()
  assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["crop_size"] == {"height": 48,
                                                                                                 "width": 48}


def test_convert_of_a_workdir_step_is_an_m3_checkpoint_with_the_same_identity(run, tmp_path):
  out = tmp_path / "m3"
  assert main(["convert", str(run), str(out), "--step", "1"]) == 0
  assert reader.identity(out) == reader.identity(run, 1) != reader.identity(run, 2)
  meta = m3dir.read_meta(out)
  assert meta["template"] == "vicuna_v1" and meta["image_aspect"] == "pad"
  assert meta["source"] == {"format": "m3-workdir", "workdir": str(run), "step": 1}
  assert m3dir.has_tokenizer(out)
  assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 48, "width": 48}
  a, b = reader.read_checkpoint(out), reader.read_checkpoint(run, 1)
  assert (a.template, a.aspect, a.preprocessor) == (b.template, b.aspect, b.preprocessor)
  # --step names a workdir's step: with an m3 checkpoint directory as SRC it is refused.
  assert main(["convert", str(out), str(tmp_path / "again"), "--step", "1"]) == 2


def test_convert_of_a_workdir_step_takes_dtype_and_refuses_the_hf_only_flags(run, tmp_path, capsys):
  half = tmp_path / "bf16"
  assert main(["convert", str(run), str(half), "--step", "1", "--dtype", "bfloat16"]) == 0
  got, want = reader.read_checkpoint(half).params, reader.read_checkpoint(run, 1).params
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
  capsys.readouterr()
  assert main(["convert", str(run), str(tmp_path / "x"), "--allow-pickle"]) == 2
  assert capsys.readouterr().err.strip().endswith(
      f"--allow-pickle applies to HF and original LLaVA sources; SRC {run} is a training workdir, whose steps hold "
      "every weight in its own format")
  assert not (tmp_path / "x").exists()
