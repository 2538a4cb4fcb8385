"""Either kind of checkpoint, an m3 checkpoint directory or a step of a training workdir, as one record (what a
model loader needs) and as one identity string (what eval caches and scale routers record)."""
from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from m3_jax.checkpoint import identity as identity_lib, m3dir, workdir
from m3_jax.models.config import ModelConfig


@dataclasses.dataclass
class Checkpoint:
  config: ModelConfig
  params: Any
  template: str
  tokenizer_dir: str
  preprocessor: dict | None
  aspect: str  # LLaVA-1.5 "pad" (original LLaVA eval) or "crop" (transformers' processor)


def _neither(path) -> FileNotFoundError:
  return FileNotFoundError(f"{path} is neither an m3 checkpoint directory ({m3dir.CONFIG}, written by `m3 convert`) "
                           f"nor a training workdir ({workdir.CONFIG} + {workdir.CHECKPOINTS}/, written by `m3 train`)")


def read_checkpoint(ckpt: str | epath.PathLike, step: int | None = None, shardings=None) -> Checkpoint:
  """Loads an m3 checkpoint directory, or a training workdir's step (the latest when `step` is None); params are
  verified against their checksums and laid out per `shardings` (a tree of jax.sharding.Sharding) when given."""
  path = epath.Path(ckpt)
  if m3dir.is_m3dir(path):
    cfg, params, extras = m3dir.load(path, shardings)
    template = extras.get("template", "llava_hf")
    return Checkpoint(cfg, params, template, extras["tokenizer_dir"], extras.get("preprocessor_config"),
                      extras.get("image_aspect", "pad" if template == "vicuna_v1" else "crop"))
  if workdir.is_workdir(path):
    run = workdir.read_config(path)
    params = workdir.load_params(path, step, target_shardings=shardings)
    return Checkpoint(_workdir_model(run), params, run["data"]["template"], str(workdir.tokenizer_dir(path)),
                      workdir.read_preprocessor(path), run["data"].get("image_aspect", "pad"))
  raise _neither(path)


def _workdir_model(run: dict) -> ModelConfig:
  import ml_collections
  return ModelConfig.from_config(ml_collections.ConfigDict(run["model"]))


def model_config(ckpt: str | epath.PathLike) -> ModelConfig | None:
  """The model config stored in an m3 checkpoint directory or a training workdir's config.json; None when `ckpt`
  is neither (e.g. a tokenizer directory, whose config.json, if any, has no run config)."""
  path = epath.Path(ckpt)
  if m3dir.is_m3dir(path):
    return ModelConfig.from_dict(m3dir.read_model_config(path))
  if (path / workdir.CONFIG).exists():
    run = workdir.read_config(path)
    return _workdir_model(run) if isinstance(run.get("model"), dict) else None
  return None


def home(ckpt: str | epath.PathLike, step: int | None = None) -> epath.Path:
  """The folder of the checkpoint itself, where files fitted for it live (its scale router): an m3 checkpoint
  directory, or a training workdir's step folder (the latest step when None)."""
  path = epath.Path(ckpt)
  if m3dir.is_m3dir(path):
    return path
  if workdir.is_workdir(path):
    return path / workdir.CHECKPOINTS / str(workdir.resolve_step(path, step))
  raise _neither(path)


def identity(ckpt: str | epath.PathLike, step: int | None = None) -> str:
  """The identity string of an m3 checkpoint directory or of a training workdir's step (the latest when None):
  identity.fingerprint of the model config and the params' checksums recorded at save time. The same params
  and architecture give the same string in either layout. A checkpoint written before checksums were recorded
  has its params read and checksummed here."""
  path = epath.Path(ckpt)
  if m3dir.is_m3dir(path):
    model, sums = m3dir.model_dict(path), m3dir.read_checksums(path)
  elif workdir.is_workdir(path):
    step = workdir.resolve_step(path, step)
    model, sums = _workdir_model(workdir.read_config(path)).to_dict(), workdir.params_checksums(path, step)
  else:
    raise _neither(path)
  if sums is None:
    sums = identity_lib.checksums(read_checkpoint(path, step).params)
  return identity_lib.fingerprint(model, sums)
