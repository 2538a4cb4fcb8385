"""Helpers shared by the conversion tests: run an m3 checkpoint on a fixture's reference inputs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.checkpoint import m3dir
from m3_jax.models import anyres
from m3_jax.models.llava import LlavaM3


def one_placeholder(ids: np.ndarray, image_token_id: int) -> np.ndarray:
  """HF reference ids repeat the image token once per visual token; m3 takes one placeholder per image."""
  ids = np.asarray(ids)[0]
  is_img = ids == image_token_id
  keep = ~is_img
  keep[np.argmax(is_img)] = True
  return ids[keep][None].astype(np.int32)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  model = LlavaM3(cfg)
  return jax.jit(lambda p, ids, pix: model.apply({"params": p}, ids, pix, scale=cfg.full_scale))


def m3_logits(ckpt_dir, ref) -> np.ndarray:
  """float32 logits of the m3 checkpoint on a reference.npz's inputs (NeXT: through models.anyres)."""
  cfg, params, _ = m3dir.load(ckpt_dir)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  ids = one_placeholder(ref["input_ids"], cfg.image_token_id)
  if cfg.type == "llava_next":
    crops = jnp.asarray(ref["pixel_values"][0].transpose(0, 2, 3, 1))
    index = anyres.pack_indices(cfg, tuple(int(x) for x in ref["image_sizes"][0]), cfg.full_scale,
                                n_crops=len(crops))
    out = LlavaM3(cfg).apply({"params": params}, ids, crops[None], cfg.full_scale, anyres_index=index[None])
  else:
    out = _jitted(cfg)(params, ids, jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1)))
  return np.asarray(out, np.float32)


@pytest.fixture
def logits_of():
  return m3_logits


def checkpoint_variant(src, dst, config: dict | None = None, tensors: dict | None = None):
  """A copy of the checkpoint directory `src` at `dst`: config.json updated with `config`, model.safetensors
  with `tensors` added (numpy arrays), every other file linked."""
  import json
  import pathlib
  from safetensors.numpy import load_file, save_file
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  dst.mkdir(parents=True)
  for f in src.iterdir():
    if f.name not in ("config.json", "model.safetensors"):
      (dst / f.name).symlink_to(f.absolute())
  (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **(config or {})}))
  if tensors:
    save_file({**load_file(src / "model.safetensors"), **tensors}, dst / "model.safetensors", metadata={"format": "pt"})
  else:
    (dst / "model.safetensors").symlink_to((src / "model.safetensors").absolute())
  return dst


@pytest.fixture
def variant():
  return checkpoint_variant
