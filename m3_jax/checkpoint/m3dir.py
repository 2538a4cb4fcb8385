"""The m3 checkpoint directory (`m3 convert` writes it; eval, generate, export and `checkpoint.init_from` read it):

  m3_config.json            {"format": "m3", "format_version": 1, "model": ModelConfig.to_dict(), "template": NAME,
                             "param_dtype": "float32" | "bfloat16" | ..., "source": {...how it was made},
                             optional "image_aspect": "pad" | "crop" | "anyres" (default: "pad" for the vicuna_v1
                             template, else "crop"; a training workdir's step records its data.image_aspect)}
  params/                   orbax (StandardCheckpointer) pytree of the params ([L]-stacked layers)
  params.checksums.json     {"algorithm": identity.ALGORITHM, "arrays": {tree path: "DTYPE:CHECKSUM"}}, written with
                            params/ and verified on every load (directories written before it load unverified)
  tokenizer files           as transformers' `save_pretrained` writes them
  preprocessor_config.json  the image-processor settings, HF's schema (pinpoints there are (h, w))

m3_config.json is written last: a directory that has it is complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import numpy as np
from etils import epath

from m3_jax.checkpoint import identity, params as params_io
from m3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

CONFIG = "m3_config.json"
PARAMS = "params"
CHECKSUMS = "params.checksums.json"
PREPROCESSOR = "preprocessor_config.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# Fields that are run choices, not architecture: they may differ between the init checkpoint and the run. The
# pooling chain (`m3`) is what M3 training sets up on top of a plain LLaVA checkpoint.
_RUN_CHOICES = ("dtype", "remat", "m3")


def is_m3dir(directory: str | epath.PathLike) -> bool:
  return (epath.Path(directory) / CONFIG).exists()


def default_preprocessor(cfg: ModelConfig) -> dict[str, Any]:
  """HF image-processor settings for a model whose source had none (original LLaVA loads CLIP's)."""
  s = cfg.vision.image_size
  d = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": s},
       "crop_size": {"height": s, "width": s}, "do_resize": True, "do_center_crop": True, "do_rescale": True,
       "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
       "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True, "resample": 3}
  if cfg.type == "llava_next":
    pins = cfg.anyres.grid_pinpoints
    if cfg.anyres.pinpoint_order != "hw":
      pins = tuple((b, a) for a, b in pins)
    d.update(image_processor_type="LlavaNextImageProcessor", do_pad=True, image_grid_pinpoints=[list(p) for p in pins])
  return d


# ---- params ----------------------------------------------------------------------------------------------------
def save_params(directory: str | epath.PathLike, params: Any) -> dict[str, str]:
  """Writes `params` to `<directory>/params` (replacing what is there) and their checksums beside it; the caller
  (`save`) writes m3_config.json and the tokenizer files. -> the checksums."""
  directory = params_io.absolute(directory)
  sums = params_io.save(directory / PARAMS, params)
  (directory / CHECKSUMS).write_text(json.dumps({"algorithm": identity.ALGORITHM, "arrays": sums}, indent=1) + "\n")
  return sums


def read_checksums(directory: str | epath.PathLike) -> dict[str, str] | None:
  """The params' checksums recorded at save time, or None for a directory written before they were."""
  path = epath.Path(directory) / CHECKSUMS
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  if stored.get("algorithm") != identity.ALGORITHM:
    raise ValueError(f"{path}: checksum algorithm {stored.get('algorithm')!r}, this m3-jax reads "
                     f"{identity.ALGORITHM!r}")
  return stored["arrays"]


def load_params(directory: str | epath.PathLike, target_shardings: Any = None, abstract: Any = None) -> Any:
  """Reads `<directory>/params` (see params.restore for `target_shardings` and `abstract`), verifying every
  array's checksum (identity.ChecksumError names an array whose stored bytes changed)."""
  directory = params_io.absolute(directory)
  if not (directory / PARAMS).exists():
    raise FileNotFoundError(f"{directory / PARAMS} does not exist: an m3 checkpoint holds its parameters in "
                            "params/ (orbax)")
  sums = read_checksums(directory)
  if sums is None:
    log.warning("%s has no %s (written before per-array checksums): its params are not verified", directory,
                CHECKSUMS)
  return params_io.restore(directory / PARAMS, target_shardings=target_shardings, abstract=abstract,
                           checksums=sums)


# ---- the whole directory ---------------------------------------------------------------------------------------
def save(out_dir: str | epath.PathLike, cfg: ModelConfig, params: Any, tokenizer_src=None, preprocessor_cfg=None,
         template: str = "llava_hf", **extra) -> epath.Path:
  """Writes an m3 checkpoint directory.

  params: the params tree (numpy or jax arrays, any float dtype; stored as given).
  tokenizer_src: a directory holding tokenizer files, a transformers tokenizer, or None (no tokenizer saved).
  preprocessor_cfg: an HF preprocessor_config dict (or an object with `to_dict()`), None = CLIP defaults for cfg.
  template: the chat template name `--template auto` resolves to (one of data.conversation.TEMPLATES; the
  callers pass a name they chose from it). extra: more JSON fields (e.g. source=...).
  """
  out = params_io.absolute(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)})
  meta = {"format": "m3", "format_version": FORMAT_VERSION, "model": cfg.to_dict(), "template": template,
          "param_dtype": dtypes[0] if len(dtypes) == 1 else dtypes, **extra}
  save_params(out, params)
  _save_tokenizer(tokenizer_src, out)
  if preprocessor_cfg is None:
    preprocessor_cfg = default_preprocessor(cfg)
  elif hasattr(preprocessor_cfg, "to_dict"):
    preprocessor_cfg = preprocessor_cfg.to_dict()
  (out / PREPROCESSOR).write_text(json.dumps(preprocessor_cfg, indent=2, sort_keys=True) + "\n")
  (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")  # last: a directory with it is complete
  return out


def _save_tokenizer(src, out: epath.Path):
  if src is None:
    return
  if hasattr(src, "save_pretrained"):
    src.save_pretrained(str(out))
    return
  src = epath.Path(src)
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
        (src / f).copy(out / f)
    return
  finally:
    hf_logging.set_verbosity(verbosity)
  tok.save_pretrained(str(out))


def has_tokenizer(directory: str | epath.PathLike) -> bool:
  d = epath.Path(directory)
  return (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists()


def read_meta(ckpt_dir: str | epath.PathLike) -> dict[str, Any]:
  """m3_config.json as a dict with the ModelConfig dict under "model" (a bare ModelConfig dict, as written by
  hand or by older code, is wrapped)."""
  path = epath.Path(ckpt_dir) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f"{ckpt_dir} is not an m3 checkpoint directory: it has no {CONFIG} "
                            "(`m3 convert SRC OUT` writes one)")
  meta = json.loads(path.read_text())
  if "model" not in meta:
    meta = {"model": meta}
  return meta


def load(ckpt_dir: str | epath.PathLike, shardings=None) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """-> (cfg, params, extras). params are jax arrays, on the default device or laid out per `shardings` (a tree of
  jax.sharding.Sharding like the params), their checksums verified. extras: template, param_dtype,
  preprocessor_config (dict or None), tokenizer_dir (the directory, for AutoTokenizer.from_pretrained), and any
  other m3_config.json fields."""
  d = params_io.absolute(ckpt_dir)
  meta = read_meta(d)
  cfg = ModelConfig.from_dict(meta["model"])
  params = load_params(d, target_shardings=shardings)
  pre = d / PREPROCESSOR
  extras = {k: v for k, v in meta.items() if k != "model"}
  extras.setdefault("template", "llava_hf")
  extras["preprocessor_config"] = json.loads(pre.read_text()) if pre.exists() else None
  extras["tokenizer_dir"] = str(d)
  return cfg, params, extras


# ---- identity and checkpoint.init_from -------------------------------------------------------------------------
def model_dict(directory: str | epath.PathLike) -> dict:
  """The stored model config, normalised through ModelConfig (defaults filled in)."""
  return ModelConfig.from_dict(read_model_config(directory)).to_dict()


def read_model_config(directory: str | epath.PathLike) -> dict:
  """The model config dict stored in `<directory>/m3_config.json` (either the ModelConfig dict itself or under a
  "model" key), without keys that are not ModelConfig fields (e.g. the chat template name)."""
  path = epath.Path(directory) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f"checkpoint.init_from={str(directory)!r} has no {CONFIG}: expected an m3 "
                            "checkpoint directory (`m3 convert SRC OUT` writes one)")
  stored = json.loads(path.read_text())
  stored = stored.get("model", stored)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return {k: v for k, v in stored.items() if k in fields}


def check_init_from(directory: str | epath.PathLike, model_config: ModelConfig) -> None:
  """Raises a ValueError naming every architecture field where `<directory>/m3_config.json` differs from the
  run's ModelConfig (ignoring run choices: dtype, remat and the M3 scale chain)."""
  stored = model_dict(directory)
  ours = model_config.to_dict()
  diffs = []
  for key in sorted(set(stored) | set(ours)):
    if key in _RUN_CHOICES:
      continue
    a, b = stored.get(key), ours.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"model.{key}.{k}: checkpoint {a.get(k)!r}, run config {b.get(k)!r}"
                for k in sorted(set(a) | set(b)) if _norm(a.get(k)) != _norm(b.get(k))]
    elif _norm(a) != _norm(b):
      diffs.append(f"model.{key}: checkpoint {a!r}, run config {b!r}")
  if diffs:
    raise ValueError(f"checkpoint.init_from={str(directory)!r} was written for a different model:\n  "
                     + "\n  ".join(diffs) + "\nfix the run config (or --config.model...=) to match the checkpoint")


def _norm(v):
  if isinstance(v, (list, tuple)):
    return tuple(_norm(x) for x in v)
  return v
