"""Bad inputs stop `m3 convert` with a message naming what is wrong; odd-but-valid inputs (sharded, bfloat16,
pickle with the flag) convert exactly."""
from __future__ import annotations

import json
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from m3_jax.checkpoint import m3dir
from m3_jax.cli import main
from m3_jax.convert.convert import convert
from m3_jax.convert.hf import ConversionError
from m3_jax.convert.reader import ReaderError

HF15 = "transformers-4.57.1/llava-1.5"


def copy(fixtures_dir, name, tmp_path, weights=True):
  dst = tmp_path / "src"
  shutil.copytree(fixtures_dir / name, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
  return dst


def test_unknown_layout(fixtures_dir, tmp_path):
  src = copy(fixtures_dir, HF15, tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  cfg.update(model_type="bert", architectures=["BertModel"])
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match=r"unknown checkpoint layout: config.json has model_type='bert'.*"
                                            r"expected a llava-hf checkpoint.*original LLaVA"):
    convert(src, tmp_path / "out", progress=False)


def test_misshaped_unknown_and_missing_keys_are_each_named(fixtures_dir, tmp_path):
  src = copy(fixtures_dir, HF15, tmp_path)
  sd = load_file(src / "model.safetensors")
  sd["vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(128, 33)
  sd["language_model.model.layers.0.extra.weight"] = sd.pop("language_model.model.norm.weight")
  save_file(sd, src / "model.safetensors")
  with pytest.raises(ConversionError) as e:
    convert(src, tmp_path / "out", progress=False)
  msg = str(e.value)
  assert "1 mis-shaped, 1 missing, 1 unknown" in msg
  assert ("mis-shaped key vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight: expected [128, 32], "
          "found [128, 33]") in msg
  assert "missing key language_model.model.norm.weight (expected shape [64])" in msg
  assert "unknown key language_model.model.layers.0.extra.weight (shape [64])" in msg
  assert not (tmp_path / "out").exists()


def test_truncated_safetensors(fixtures_dir, tmp_path):
  src = copy(fixtures_dir, HF15, tmp_path)
  f = src / "model.safetensors"
  f.write_bytes(f.read_bytes()[:300_000])
  with pytest.raises(ReaderError, match=r"model.safetensors: not a complete safetensors file .*300000 bytes.*"
                                        r"truncated"):
    convert(src, tmp_path / "out", progress=False)


def test_a_tensor_in_two_weight_files_without_an_index_is_named(fixtures_dir, tmp_path):
  """A stale single file beside shards (the index deleted): which copy is the checkpoint's is not guessed."""
  src = copy(fixtures_dir, HF15, tmp_path)
  sd = load_file(src / "model.safetensors")
  save_file({"language_model.model.norm.weight": sd["language_model.model.norm.weight"]},
            src / "model-00002-of-00002.safetensors")
  with pytest.raises(ReaderError, match=r"tensor 'language_model.model.norm.weight' is in both model-00002-of-00002"
                                        r".safetensors and model.safetensors|tensor 'language_model.model.norm.weight'"
                                        r" is in both model.safetensors and model-00002-of-00002.safetensors"):
    convert(src, tmp_path / "out", progress=False)


def test_an_original_checkpoint_with_a_linear_projector_converts(fixtures_dir, tmp_path):
  """mm_projector_type "linear": LLaVA's one nn.Linear, `model.mm_projector.{weight,bias}`."""
  src = copy(fixtures_dir, "original/llava-v1.5-m3-original", tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
  sd = load_file(src / "model.safetensors")
  first = {k: sd.pop(f"model.mm_projector.0.{k}") for k in ("weight", "bias")}
  for k in ("weight", "bias"):
    del sd[f"model.mm_projector.2.{k}"]
  sd.update({f"model.mm_projector.{k}": v for k, v in first.items()})
  save_file(sd, src / "model.safetensors")
  convert(src, tmp_path / "out", vision_from=src / "clip", progress=False)
  params = m3dir.load(tmp_path / "out")[1]
  assert set(params["projector"]) == {"linear_1"}
  np.testing.assert_array_equal(np.asarray(params["projector"]["linear_1"]["kernel"]), first["weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(params["projector"]["linear_1"]["bias"]), first["bias"].numpy())


def _to_pickle(src):
  sd = load_file(src / "model.safetensors")
  (src / "model.safetensors").unlink()
  torch.save(sd, src / "pytorch_model.bin")


def test_pickle_refused_without_flag_and_converted_with_it(fixtures_dir, tmp_path, logits_of, capsys):
  src = copy(fixtures_dir, HF15, tmp_path)
  _to_pickle(src)
  assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "pytorch_model.bin" in err and "refused" in err and "--allow-pickle" in err
  assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress", "--allow-pickle"]) == 0
  ref = np.load(src / "reference.npz")
  np.testing.assert_allclose(logits_of(tmp_path / "out", ref), ref["logits"], atol=1e-4, rtol=0)


def test_pickle_without_torch_is_a_clear_error(fixtures_dir, tmp_path, monkeypatch):
  src = copy(fixtures_dir, HF15, tmp_path)
  _to_pickle(src)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(ReaderError, match=r"needs PyTorch, which is not installed"):
    convert(src, tmp_path / "out", allow_pickle=True, progress=False)


def test_original_without_vision_weights_needs_vision_from(fixtures_dir, tmp_path):
  src = fixtures_dir / "original/llava-v1.5-m3-original"
  with pytest.raises(ConversionError, match=r"original LLaVA checkpoint without vision weights.*--vision-from DIR"):
    convert(src, tmp_path / "out", progress=False)
  # A NeXT checkpoint carries a tower, but without unfreeze_mm_vision_tower LLaVA's loader does not use it.
  with pytest.raises(ConversionError, match=r"holds vision weights, but its config.json does not set "
                                            r"unfreeze_mm_vision_tower: true.*--vision-from DIR"):
    convert(fixtures_dir / "original/llava-next-m3-original", tmp_path / "out", progress=False)


def test_known_tower_name_needs_no_download(fixtures_dir, tmp_path):
  from m3_jax.convert import hf
  cfg = json.loads((fixtures_dir / "original/llava-v1.5-m3-original/config.json").read_text())
  cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
  cfg["matryoshka_vis_token_scale"] = [576, 144, 36, 9, 1]
  mc = hf.model_config(cfg, "original", dict(hf.KNOWN_TOWERS[cfg["mm_vision_tower"]]))
  assert (mc.vision.image_size, mc.vision.patch_size, mc.vision.width, mc.vision.depth) == (336, 14, 1024, 24)


def test_sharded_bfloat16_source_stored_as_bfloat16(fixtures_dir, tmp_path, logits_of, capfd):
  src = copy(fixtures_dir, HF15, tmp_path)
  sd = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
  (src / "model.safetensors").unlink()
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[:40], "model-00002-of-00002.safetensors": names[40:]}
  for fname, keys in shards.items():
    save_file({k: sd[k] for k in keys}, src / fname, metadata={"format": "pt"})
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
  assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
  assert "80/80" in capfd.readouterr().err  # the progress bar counts tensors
  cfg, params, extras = m3dir.load(tmp_path / "out")
  assert extras["param_dtype"] == "bfloat16" and cfg.dtype == "bfloat16"
  q = np.asarray(params["llm"]["layers"]["attn"]["q"]["kernel"])
  assert q.dtype == ml_dtypes.bfloat16 and q.shape == (2, 64, 64)
  want = sd["language_model.model.layers.1.self_attn.q_proj.weight"].float().numpy().T
  np.testing.assert_array_equal(q[1].astype(np.float32), want)  # exact: bf16 -> bf16, transposed
  ref = np.load(src / "reference.npz")
  np.testing.assert_allclose(logits_of(tmp_path / "out", ref), ref["logits"], atol=0.25, rtol=0)


def test_output_directory_must_be_new(fixtures_dir, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("keep me")
  with pytest.raises(ConversionError, match="exists and is not empty"):
    convert(fixtures_dir / HF15, tmp_path / "out", progress=False)


def test_vision_from_a_full_clip_model_directory(fixtures_dir, tmp_path, logits_of):
  """openai/clip-vit-large-patch14-336 is a CLIPModel: its text tower and projections are skipped."""
  clip = tmp_path / "clip"
  clip.mkdir()
  sd = load_file(fixtures_dir / "original/llava-v1.5-m3-original/clip/model.safetensors")
  sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.zeros(()),
             "visual_projection.weight": torch.zeros(32, 32), "text_projection.weight": torch.zeros(32, 8)})
  save_file(sd, clip / "model.safetensors")
  vision = json.loads((fixtures_dir / "original/llava-v1.5-m3-original/clip/config.json").read_text())
  (clip / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"],
                                                "vision_config": vision, "text_config": {"hidden_size": 8}}))
  src = fixtures_dir / "original/llava-v1.5-m3-original"
  assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress", "--vision-from", str(clip)]) == 0
  ref = np.load(src / "reference.npz")
  np.testing.assert_allclose(logits_of(tmp_path / "out", ref), ref["logits"], atol=1e-4, rtol=0)
