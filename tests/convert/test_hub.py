"""`m3 convert` takes a HuggingFace hub id from the local cache (never downloading) and stores float16."""
from __future__ import annotations

import json

import numpy as np
import pytest

from m3_jax.cli import main
from m3_jax.convert import hub
from m3_jax.convert.hf import ConversionError


def fake_cache(root, repo_id, src):
  """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/<files>}."""
  repo = root / f"models--{repo_id.replace('/', '--')}"
  commit = "0123456789abcdef0123456789abcdef01234567"
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  for f in src.iterdir():
    (snap / f.name).symlink_to(f.absolute())
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  return snap


def test_a_cached_hub_id_converts_in_float16(fixtures_dir, tmp_path, logits_of, monkeypatch, capsys):
  from huggingface_hub import constants
  src = fixtures_dir / "transformers-4.57.1" / "llava-1.5"
  snap = fake_cache(tmp_path / "hub", "llava-hf/tiny-llava", src)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  assert hub.resolve("llava-hf/tiny-llava") == str(snap.resolve())
  out = tmp_path / "m3"
  assert main(["convert", "llava-hf/tiny-llava", str(out), "--dtype", "float16", "--no-progress"]) == 0
  meta = json.loads((out / "m3_config.json").read_text())
  assert meta["param_dtype"] == "float16" and meta["model"]["dtype"] == "float16"
  ref = np.load(src / "reference.npz")
  np.testing.assert_allclose(logits_of(out, ref), ref["logits"], atol=3e-2, rtol=0)
  assert "(float16)" in capsys.readouterr().out


def test_an_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
  assert main(["convert", "llava-hf/not-here", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "llava-hf/not-here is neither a directory nor in the local HuggingFace cache" in err
  assert str(tmp_path / "empty") in err and "never downloads" in err and "huggingface-cli download" in err
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConversionError, match="does not exist: give a checkpoint directory"):
    hub.resolve(str(tmp_path / "missing" / "dir" / "x"))


def test_a_directory_is_taken_as_it_is(tmp_path):
  assert hub.resolve(str(tmp_path)) == str(tmp_path)
