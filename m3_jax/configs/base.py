"""Run configuration: one ml_collections schema shared by every config file, and config-file loading.

A config file is `get_config(arg=None) -> ConfigDict` (big_vision style). Files start from `base()` so every
field named in DESIGN.md exists everywhere, and override what differs. `load("configs/tiny.py:arg",
overrides=["train.lr=1e-3"])` is what `m3 train --config FILE[:ARGS] --config.KEY=VALUE` does.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

SCALES_LLAVA = (576, 144, 36, 9, 1)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.type = "llava15"  # "llava15" | "llava_next"
  m.vision = dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                  feature_layer=-2, select="patch", eps=1e-5)
  m.projector = dict(type="mlp2x_gelu")
  m.llm = dict(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008,
               rope_theta=10000.0, rms_eps=1e-5, max_len=4096)
  m.m3 = dict(scales=SCALES_LLAVA, pool="avg", pool_position="after_projector")
  m.anyres = dict(grid_pinpoints=(), pinpoint_order="hw")
  m.image_token_id = 32000
  m.pad_token_id = 32001
  m.bos_token_id = 1
  m.eos_token_id = 2
  m.dtype = "float32"        # compute dtype; parameters stay float32 (master weights)
  m.remat = "none"           # "none" | "full" | "dots"

  c.data = ml_collections.ConfigDict(dict(
      source="probe",            # "probe" | "llava_json" | "tfds"
      path="",                   # LLaVA JSON file, TFDS data dir, or probe dataset dir ("" = build in workdir)
      image_folder="",
      tokenizer="",              # directory transformers loads; "" = the tiny word-level probe tokenizer
      template="vicuna_v1",
      max_length=2048,
      on_bad_record="raise",     # "raise" | "skip"
      image_aspect="pad",        # LLaVA-1.5 "pad" | "crop"
      num_workers=0,
      seed=0,
      probe_families="binding",  # probe family set: "binding" | "presence" (m3_jax/data/probe.py)
      probe_size=0,              # probe train examples (validation/test: a tenth); 0 = 4000
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=128, log_every=10, seed=0,
      lr=2e-5, lr_vision=-1.0, lr_projector=-1.0, lr_llm=-1.0,   # <0: use lr
      warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999,
      freeze=(),                 # any of "vision", "projector", "llm"
      scale_loss="loop",         # "loop" | "vmap"
      scale_sampling="all",      # "all" | "random"
      finest_first_steps=0.0,    # the finest scale alone first: N steps, or a fraction < 1 of num_steps (curriculum.py)
      scales=(),                 # () = model.m3.scales
      grad_accum=1,
      dtype="float32",           # compute dtype ("bfloat16" keeps float32 master weights)
      remat="none",
      on_nonfinite="raise",      # "raise" | "skip"
      max_label_tokens=0,        # labelled positions per row that reach the logits (0 = per batch, a power of 2)
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, init_from="", async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),          # ("data", "fsdp", "tensor"); -1 takes the remaining devices
      rules=DEFAULT_RULES,
  ))
  return c


# Logical parameter/activation axis -> mesh axis (MaxText style). FSDP: shard the embedding dimension of
# every weight over "fsdp", the wide dimensions over "tensor".
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv", None),
)


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
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"config has no field {dotted!r} ({p!r} is not in {sorted(node.keys())})")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config has no field {dotted!r} (known in {'.'.join(parents) or 'root'}: {sorted(node.keys())})")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  old = node[leaf]
  if isinstance(old, tuple) and isinstance(parsed, list):
    parsed = tuple(parsed)
  if isinstance(old, float) and isinstance(parsed, int):
    parsed = float(parsed)
  node[leaf] = parsed
