"""The m3 checkpoint directory (DESIGN.md, Contracts):

  m3_config.json            {"format": "m3", "format_version": 1, "model": ModelConfig.to_dict(), "template": NAME,
                             "param_dtype": "float32" | "bfloat16" | ..., "source": {...how it was made}}
  params/                   orbax (StandardCheckpointer) pytree, the tree of CONTRACT.md ([L]-stacked layers)
  tokenizer files           as transformers' `save_pretrained` writes them
  preprocessor_config.json  the image-processor settings, HF's schema (pinpoints there are (h, w))

`save_checkpoint` / `load_checkpoint` are the only code that knows this layout.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from m3_jax.models.config import ModelConfig
from m3_jax.train.checkpoint import load_params, save_params

FORMAT_VERSION = 1
TEMPLATES = ("vicuna_v1", "llava_hf", "plain", "none")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def default_preprocessor(cfg: ModelConfig) -> dict[str, Any]:
  """HF image-processor settings for a model whose source had none (original LLaVA loads CLIP's)."""
  from m3_jax.convert.hf import hf_pinpoints
  s = cfg.vision.image_size
  d = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": s},
       "crop_size": {"height": s, "width": s}, "do_resize": True, "do_center_crop": True, "do_rescale": True,
       "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
       "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True, "resample": 3}
  if cfg.type == "llava_next":
    d.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
             image_grid_pinpoints=[list(p) for p in hf_pinpoints(cfg)])
  return d


def save_checkpoint(out_dir, cfg: ModelConfig, params, tokenizer_src=None, preprocessor_cfg=None,
                    template: str = "llava_hf", **extra) -> pathlib.Path:
  """Writes an m3 checkpoint directory.

  params: the CONTRACT.md tree (numpy or jax arrays, any float dtype; stored as given).
  tokenizer_src: a directory holding tokenizer files, a transformers tokenizer, or None (no tokenizer saved).
  preprocessor_cfg: an HF preprocessor_config dict (or an object with `to_dict()`), None = CLIP defaults for cfg.
  template: the chat template name `--template auto` resolves to. extra: more JSON fields (e.g. source=...).
  """
  if template not in TEMPLATES:
    raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
  out = pathlib.Path(out_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  leaves = jax.tree.leaves(params)
  dtypes = sorted({str(np.dtype(x.dtype)) for x in leaves})
  meta = {"format": "m3", "format_version": FORMAT_VERSION, "model": cfg.to_dict(), "template": template,
          "param_dtype": dtypes[0] if len(dtypes) == 1 else dtypes, **extra}
  save_params(out, params)
  _save_tokenizer(tokenizer_src, out)
  if preprocessor_cfg is None:
    preprocessor_cfg = default_preprocessor(cfg)
  elif hasattr(preprocessor_cfg, "to_dict"):
    preprocessor_cfg = preprocessor_cfg.to_dict()
  (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_cfg, indent=2, sort_keys=True) + "\n")
  # Written last: a directory with m3_config.json is a complete checkpoint.
  (out / "m3_config.json").write_text(json.dumps(meta, indent=2) + "\n")
  return out


def _save_tokenizer(src, out: pathlib.Path):
  if src is None:
    return
  if hasattr(src, "save_pretrained"):
    src.save_pretrained(str(out))
    return
  src = pathlib.Path(src)
  if not any((src / f).exists() for f in TOKENIZER_FILES):
    return
  from transformers import AutoTokenizer
  from transformers.utils import logging as hf_logging
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()  # original checkpoints' config.json (llava_llama) makes transformers chatter
  try:
    tok = AutoTokenizer.from_pretrained(str(src))
  except Exception as e:  # a tokenizer this transformers cannot load: keep the files as they are
    print(f"note: transformers cannot load the tokenizer in {src} ({type(e).__name__}: {e}); copying its files")
    for f in TOKENIZER_FILES:
      if (src / f).exists():
        shutil.copy(src / f, out / f)
    return
  finally:
    hf_logging.set_verbosity(verbosity)
  tok.save_pretrained(str(out))


def read_meta(ckpt_dir) -> dict[str, Any]:
  path = pathlib.Path(ckpt_dir) / "m3_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{ckpt_dir} is not an m3 checkpoint directory: it has no m3_config.json "
                            "(`m3 convert SRC OUT` writes one)")
  meta = json.loads(path.read_text())
  if "model" not in meta:  # a bare ModelConfig dict (written by hand or by older code)
    meta = {"model": meta}
  return meta


def load_checkpoint(ckpt_dir, shardings=None) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """-> (cfg, params, extras). params are jax arrays, on the default device or laid out per `shardings` (a tree of
  jax.sharding.Sharding like the params). extras: template, param_dtype, preprocessor_config (dict or None),
  tokenizer_dir (the directory, for AutoTokenizer.from_pretrained), and any other m3_config.json fields."""
  d = pathlib.Path(ckpt_dir).absolute()
  meta = read_meta(d)
  cfg = ModelConfig.from_dict(meta["model"])
  if not (d / "params").exists():
    raise FileNotFoundError(f"{d / 'params'} does not exist: an m3 checkpoint holds its parameters in params/ (orbax)")
  params = load_params(d, target_shardings=shardings)
  pre = d / "preprocessor_config.json"
  extras = {k: v for k, v in meta.items() if k != "model"}
  extras.setdefault("template", "llava_hf")
  extras["preprocessor_config"] = json.loads(pre.read_text()) if pre.exists() else None
  extras["tokenizer_dir"] = str(d)
  return cfg, params, extras
