"""HF (llava-hf or original LLaVA / M3) directory -> m3 checkpoint, one tensor at a time.

Peak host memory is one output leaf (in the stored dtype) plus its source tensors: every m3 leaf is made only when
the checkpoint writer reaches it (`checkpoint.params.Deferred`), allocated once in its final dtype, filled slice by
slice ([L]-stacked layers) from the memory-mapped source, written and dropped; the whole tree is never in memory.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from m3_jax.checkpoint import m3dir
from m3_jax.convert import hf
from m3_jax.convert.hf import ConversionError
from m3_jax.convert.reader import ReaderError, TensorSource
from m3_jax.models.config import ModelConfig

DTYPES = ("float32", "bfloat16", "float16")


def read_config(directory: pathlib.Path) -> dict:
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    raise ConversionError(f"{directory} has no config.json: expected a llava-hf (LlavaForConditionalGeneration / "
                          "LlavaNextForConditionalGeneration) or original LLaVA (LlavaLlamaForCausalLM) directory")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from None


def np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if name not in DTYPES:
    raise ConversionError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
  return np.dtype(name)


def _image_token_from_tokenizer(src: pathlib.Path, vocab_size: int) -> int | None:
  """The `<image>` id of an original checkpoint's tokenizer, when it has one inside the vocabulary."""
  for name in ("tokenizer.json",):
    p = src / name
    if p.exists():
      try:
        tok = json.loads(p.read_text())
      except json.JSONDecodeError:
        return None
      ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
      ids.update((tok.get("model") or {}).get("vocab") or {})
      i = ids.get("<image>")
      return int(i) if isinstance(i, int) and i < vocab_size else None
  return None


def plan(cfg: ModelConfig, sources: list[tuple[TensorSource, str]]) -> dict[str, tuple[TensorSource, str]]:
  """canonical HF name -> (source, source key), checked: every expected key present once, none unknown, shapes
  as the table says. All problems are reported together, each naming the key with expected and found shapes.
  With a "clip" source the vision tower comes from it: vision keys of the checkpoint itself are passed over."""
  table = hf.rules(cfg)
  expected = {name: rule for rule in table for name in hf.expand(rule)}
  found: dict[str, tuple[TensorSource, str]] = {}
  unknown, misshaped, duplicate = [], [], []
  vision_from_clip = any(layout == "clip" for _, layout in sources)
  for source, layout in sources:
    for key in source.keys():
      name = hf.canonical(layout, key)
      if name is None:
        continue
      if layout == "clip" and not name.startswith(hf.V):
        name = "?" + key
      if layout != "clip" and vision_from_clip and name.startswith(hf.V):
        continue  # LLaVA's loader ignores these (see load_source)
      if name not in expected:
        if layout == "clip":
          continue  # a full CLIP checkpoint: only the vision tower is taken
        unknown.append(f"  unknown key {key} (shape {hf.shape_str(source.shape(key))}) in {source.file(key).name}: "
                       "no m3 parameter takes it")
        continue
      if name in found:
        duplicate.append(f"  duplicate key {key} (also {found[name][1]})")
        continue
      want, got = expected[name].hf_shape(), tuple(source.shape(key))
      if want != got:
        misshaped.append(f"  mis-shaped key {key}: expected {hf.shape_str(want)}, found {hf.shape_str(got)}")
      found[name] = (source, key)
  main_layout = sources[0][1]
  missing = [f"  missing key {spelled(main_layout, n, sources[0][0])} (expected shape "
             f"{hf.shape_str(expected[n].hf_shape())})" for n in expected if n not in found]
  problems = misshaped + missing + unknown + duplicate
  if problems:
    what = "LLaVA-NeXT" if cfg.type == "llava_next" else "LLaVA-1.5"
    shown = problems[:60] + ([f"  ... and {len(problems) - 60} more"] if len(problems) > 60 else [])
    raise ConversionError(
        f"{sources[0][0].directory} ({main_layout} layout, {what}: vision {cfg.vision.width}x{cfg.vision.depth}, "
        f"LLM {cfg.llm.width}x{cfg.llm.depth}) does not match its config.json: {len(misshaped)} mis-shaped, "
        f"{len(missing)} missing, {len(unknown)} unknown, {len(duplicate)} duplicate keys:\n" + "\n".join(shown))
  return found


def spelled(layout: str, name: str, source: TensorSource) -> str:
  """A canonical name as the source layout spells it (for messages): the spelling whose prefix the source uses."""
  keys = source.keys()
  options = [(src, src + name[len(dst):]) for src, dst in hf.LAYOUTS[layout] if name.startswith(dst)]
  for prefix, option in options:
    if any(k.startswith(prefix) for k in keys):
      return option
  return options[0][1] if options else name


def assemble(cfg: ModelConfig, found: dict[str, tuple[TensorSource, str]], dtype: str, progress: bool = True
             ) -> dict[str, Any]:
  """The m3 parameter tree as `Deferred` leaves: each is converted tensor by tensor when it is written (a tqdm bar
  counts tensors), and the source files it read are unmapped after it, so their pages leave this process's RSS."""
  from tqdm import tqdm
  from m3_jax.checkpoint.params import Deferred
  target = np_dtype(dtype)
  rules = hf.rules(cfg)
  bar = tqdm(total=sum(len(hf.expand(r)) for r in rules), desc="convert", unit="tensor", disable=not progress)

  def make(rule):
    def leaf() -> np.ndarray:
      out = np.empty(((rule.layers,) if rule.layers else ()) + rule.shape, target)
      jobs = sorted((str(found[name][0].file(found[name][1])), found[name][1], i) for i, name in
                    enumerate(hf.expand(rule)))  # file order: sequential reads of memory-mapped shards
      touched = set()
      for file, key, i in jobs:
        source = found[hf.expand(rule)[i]][0]
        touched.add((file, source))
        x = hf.TRANSFORMS[rule.transform][0](source.get(key))
        if rule.layers:
          out[i] = x.astype(target, copy=False)
        else:
          out[...] = x.astype(target, copy=False)
        del x
        bar.update()
      for file, source in touched:
        source.release(file)
      if bar.n == bar.total:
        bar.close()
      return out
    return leaf

  return unflatten({rule.m3: Deferred(((rule.layers,) if rule.layers else ()) + rule.shape, target, make(rule))
                    for rule in rules})


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, x in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def load_source(src, vision_from=None, allow_pickle: bool = False
                ) -> tuple[ModelConfig, str, list[tuple[TensorSource, str]], dict]:
  """Reads config and opens the weights: (cfg, layout, [(source, layout), ...], config.json)."""
  src = pathlib.Path(src)
  config = read_config(src)
  source = TensorSource(src, allow_pickle)
  layout = hf.detect_layout(config, source.keys())
  sources = [(source, layout)]
  if layout != "original":
    if vision_from is not None:
      print(f"note: --vision-from {vision_from} is ignored: {src} is a llava-hf checkpoint with its own vision tower")
    return hf.model_config(config, layout, where=str(src / "config.json")), layout, sources, config
  tower = config.get("mm_vision_tower")
  vision = None
  if vision_from is not None:
    vision = hf.vision_dict_from_dir_config(read_config(pathlib.Path(vision_from)))
  elif tower in hf.KNOWN_TOWERS:
    vision = dict(hf.KNOWN_TOWERS[tower])
  has_vision = any(k.startswith("model.vision_tower.") for k in source.keys())
  # LLaVA's loader (llava/model/multimodal_encoder/clip_encoder.py CLIPVisionTower, built with delay_load by
  # llava_arch.py; llava/model/builder.py load_pretrained_model) loads CLIP from `mm_vision_tower`; the checkpoint's
  # own vision weights are loaded over it only when the config says unfreeze_mm_vision_tower (LLaVA-NeXT's
  # training), otherwise the tower has no parameters when the checkpoint is read and they are dropped.
  own_vision = has_vision and bool(config.get("unfreeze_mm_vision_tower", False))
  if not own_vision:
    if vision_from is None:
      why = ("holds vision weights, but its config.json does not set unfreeze_mm_vision_tower: true, so LLaVA's "
             "loader ignores them" if has_vision else "is an original LLaVA checkpoint without vision weights")
      raise ConversionError(
          f"{src} {why} and loads its CLIP tower {tower!r} separately: pass --vision-from DIR, a local CLIP directory "
          "(CLIPVisionModel or CLIPModel safetensors + config.json), e.g. a copy of openai/clip-vit-large-patch14-336")
    try:
      vision_source = TensorSource(vision_from, allow_pickle)
      vision_keys = [k for k in vision_source.keys() if (hf.canonical("clip", k) or "").startswith(hf.V)]
    except ReaderError:
      vision_keys = []  # a config-only directory
    if not vision_keys:
      raise ConversionError(
          f"--vision-from {vision_from} holds no CLIP vision weights (`vision_model.*`), and LLaVA's loader takes "
          f"the tower from there: {src} " + ("has none" if not has_vision else
                                             "has its own, but its config.json does not set "
                                             "unfreeze_mm_vision_tower: true (so they are not used)"))
    if has_vision:
      print(f"note: {src}'s own vision weights are not used (its config.json does not set unfreeze_mm_vision_tower:"
            f" true, as LLaVA's loader reads it): the tower comes from --vision-from {vision_from}")
    sources.append((vision_source, "clip"))
  vocab = int(config.get("vocab_size", 32000))
  cfg = hf.model_config(config, layout, vision, _image_token_from_tokenizer(src, vocab))
  return cfg, layout, sources, config


def preprocessor_config(src: pathlib.Path, layout: str, cfg: ModelConfig, vision_from=None) -> dict | None:
  """The image-processor settings to write (None: m3dir's CLIP defaults for `cfg`). llava-hf: the checkpoint's own.
  Original layout: LLaVA's loader uses CLIPImageProcessor.from_pretrained(mm_vision_tower), so the CLIP
  directory's preprocessor_config.json when --vision-from has one; LLaVA-NeXT adds its anyres pinpoints (from the
  model config, written (h, w), HF's order)."""
  if layout != "original":
    pre = src / "preprocessor_config.json"
    return json.loads(pre.read_text()) if pre.exists() else None
  pre = pathlib.Path(vision_from) / "preprocessor_config.json" if vision_from is not None else None
  if pre is None or not pre.exists():
    return None
  try:
    d = json.loads(pre.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{pre} is not valid JSON: {e}") from None
  if cfg.type == "llava_next":
    anyres = m3dir.default_preprocessor(cfg)
    d.update({k: anyres[k] for k in ("image_processor_type", "do_pad", "image_grid_pinpoints")})
  return d


def _exported_by_m3(src: pathlib.Path) -> dict:
  """The m3_template / m3_image_aspect an `m3 export` wrote into config.json ({} for any other checkpoint)."""
  try:
    d = json.loads((src / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  from m3_jax.data.conversation import TEMPLATES
  known = {"m3_template": TEMPLATES, "m3_image_aspect": ("pad", "crop", "anyres")}
  return {k: d[k] for k, values in known.items() if d.get(k) in values}


def convert(src, out, dtype: str = "float32", vision_from=None, allow_pickle: bool = False,
            progress: bool = True) -> ModelConfig:
  """`m3 convert SRC OUT`: returns the ModelConfig written to OUT/m3_config.json."""
  src, out = pathlib.Path(src), pathlib.Path(out)
  np_dtype(dtype)
  if out.exists() and any(out.iterdir()):
    raise ConversionError(f"output directory {out} exists and is not empty: choose a new directory")
  cfg, layout, sources, _ = load_source(src, vision_from, allow_pickle)
  cfg = cfg.replace(dtype=dtype)
  found = plan(cfg, sources)
  params = assemble(cfg, found, dtype, progress)
  preprocessor = preprocessor_config(src, layout, cfg, vision_from)
  source_dtypes = sorted({s.dtype(k) for s, k in found.values()})
  exported = _exported_by_m3(src)   # an `m3 export`: its template and image aspect come back with it
  m3dir.save(out, cfg, params, tokenizer_src=src, preprocessor_cfg=preprocessor,
             template=exported.get("m3_template", "vicuna_v1" if layout == "original" else "llava_hf"),
             **({"image_aspect": exported["m3_image_aspect"]} if "m3_image_aspect" in exported else {}),
             source={"path": str(src.absolute()), "layout": layout, "dtypes": source_dtypes,
                     "vision_from": str(vision_from) if vision_from else None})
  for s, _ in sources:
    s.close()
  return cfg
