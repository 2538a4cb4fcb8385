"""Run configuration: one ml_collections schema shared by every config file, and config-file loading.

A config file is `get_config(arg=None) -> ConfigDict` (big_vision style). Files start from `base()` so every
field (docs/design.md lists them) exists everywhere, and override what differs. `load("configs/tiny.py:arg",
overrides=["train.lr=1e-3"])` is what `m3 train --config FILE[:ARGS] --config.KEY=VALUE` does.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import re

import ml_collections

from m3_jax import sharding
from m3_jax.models.config import ModelConfig


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Every ModelConfig field, with ModelConfig's defaults (the one place they are written).
  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())

  c.data = ml_collections.ConfigDict(dict(
      source="probe",            # "probe" | "llava_json" | "tfds"
      path="",                   # LLaVA JSON file, TFDS data dir, or probe dataset dir ("" = build in workdir)
      image_folder="",
      follow_symlinks=False,     # llava_json: allow symlinks out of image_folder (data/coco -> /mnt/coco)
      tokenizer="",              # directory transformers loads; "" = the tiny word-level probe tokenizer
      template="vicuna_v1",
      max_length=2048,
      on_bad_record="raise",     # "raise" | "skip"
      image_aspect="pad",        # LLaVA-1.5 "pad" | "crop"
      num_workers=0,
      seed=0,
      probe_families="binding",  # probe family set: "binding" | "presence" (m3_jax/data/probe.py)
      probe_size=0,              # probe train examples (validation/test: a tenth); 0 = the probe built in data.path, else 4000
      probe_aspects="1:1",       # probe image aspects W:H, e.g. "1:1,2:1,1:2" (non-square: LLaVA-NeXT crop grids)
      crop_buckets=(),           # LLaVA-NeXT: crops per image a batch pads to (() = every count the pinpoints give)
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=128, log_every=10, seed=0,
      lr=2e-5, lr_vision=-1.0, lr_projector=-1.0, lr_llm=-1.0,   # <0: use lr
      warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999,
      freeze=(),                 # any of "vision", "projector", "llm"
      scale_loss="loop",         # "loop" | "vmap" | "packed"
      scale_sampling="all",      # "all" | "random" (per step) | "random_per_sample" (paper Table 8)
      finest_first_steps=0.0,    # the finest scale alone first: N steps, or a fraction < 1 of num_steps (curriculum.py)
      scales=(),                 # () = model.m3.scales
      grad_accum=1,
      dtype="float32",           # compute dtype ("bfloat16" keeps float32 master weights)
      remat="none",
      on_nonfinite="raise",      # "raise" | "skip"
      max_label_tokens=0,        # labelled positions per row that reach the logits (0 = per batch, a power of 2)
      # Evaluation during training (cli/train.py; metrics eval/<task>/scale_<N>): every eval_every steps (0 = off)
      # and at the last step, the eval task at every trained scale on the current params, in-process.
      eval_every=0,
      eval_task="probe",         # a registered eval task (m3 eval --task)
      eval_data="",              # its --data; "" = the run's probe folder (data.path, or WORKDIR/probe)
      eval_options="split=validation",  # its --task-option KEY=VALUE list, comma-separated (the probe's held-out split)
      eval_limit=64,             # samples evaluated (the first N; 0 = all)
      eval_max_new_tokens=16,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, init_from="", async_save=True,
                                                lease_timeout=300.0))  # s: a trainer's lease.json outlives it so long
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),          # ("data", "fsdp", "tensor"); -1 takes the remaining devices
      rules=sharding.DEFAULT_RULES,  # logical axis -> mesh axis (m3_jax/sharding.py)
  ))
  return c



def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, applies `KEY=VALUE` overrides (values parsed as Python literals)."""
  path, _, arg = spec.partition(":")
  file = resolve(path)
  module_spec = importlib.util.spec_from_file_location(f"m3_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None) if arg else module.get_config()
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"config override {item!r} is not KEY=VALUE")
    set_field(config, key.removeprefix("config."), value)
  return config


def resolve(name_or_path: str) -> pathlib.Path:
  """A config file: a path (`configs/tiny.py`, `my/run.py`) or the name of one shipped with the package (`tiny`)."""
  file = pathlib.Path(name_or_path)
  if file.exists():
    return file
  shipped = pathlib.Path(__file__).parent / f"{name_or_path}.py"
  if "/" not in name_or_path and not name_or_path.endswith(".py") and shipped.exists():
    return shipped
  names = sorted(p.stem for p in pathlib.Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "base"))
  raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a shipped config name (one of "
                          f"{', '.join(names)}; or a path such as configs/tiny.py)")


def set_field(config: ml_collections.ConfigDict, dotted: str, value: str):
  """Sets `dotted` (e.g. "train.lr") from the text `value`, parsed as a Python literal (bare words stay strings).
  An unknown key is a KeyError naming the known ones; a value of the wrong type a TypeError naming the expected."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise KeyError(f"config has no field {dotted!r} ({p!r} is not in {known})")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config has no field {dotted!r} (known in {'.'.join(parents) or 'root'}: {sorted(node.keys())})")
  node[leaf] = _typed(dotted, node[leaf], value)


def _typed(dotted: str, old, value: str):
  """`value` parsed and converted to the type of the field's current value `old`."""
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  if old is None or isinstance(old, ml_collections.ConfigDict):
    return parsed
  if isinstance(old, str):
    return parsed if isinstance(parsed, str) else value   # --config.data.path=2024 is the string "2024"
  if isinstance(old, tuple) and isinstance(parsed, list):
    parsed = tuple(parsed)
  if isinstance(old, float) and isinstance(parsed, str) and re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", parsed):
    numerator, denominator = parsed.split("/")
    parsed = int(numerator) / int(denominator)   # a fraction such as train.finest_first_steps=2/3
  if isinstance(old, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
    parsed = float(parsed)
  if type(parsed) is not type(old):
    raise TypeError(f"config field {dotted}={value!r}: expected {type(old).__name__} (like the current value "
                    f"{old!r}), got {type(parsed).__name__}")
  return parsed
