"""HuggingFace <-> m3 parameter mapping: layout detection, config translation, declarative key tables.

Every source layout is first renamed to one canonical spelling (the llava-hf on-disk layout that transformers 4.5x
writes), then one table maps canonical names to m3 parameter paths with a small per-key transform:

  canonical HF name                                       m3 path                           transform
  vision_tower.vision_model.embeddings.patch_embedding.weight  vision/patch_embed/kernel    conv   [o,i,kh,kw] -> [kh,kw,i,o]
  vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj.weight  vision/layers/attn/q/kernel  linear [out,in] -> [in,out]
  language_model.model.layers.{i}.mlp.gate_proj.weight     llm/layers/mlp/gate/kernel       linear
  ...

Per-layer names (with `{i}`) fill a leading [L] axis (the model scans over layers).

Layouts (docs/design.md, "Facts that are easy to get wrong"):
  llava_hf        `vision_tower.vision_model.*` (4.5x) or `vision_tower.*` (fresh saves of transformers >= 5.6),
                  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`, `image_newline`
  llava_hf_model  the in-memory names on disk: `model.vision_tower.*`, `model.multi_modal_projector.*`,
                  `model.language_model.*`, `lm_head.weight`, `model.image_newline`
  original        LlavaLlamaForCausalLM (liuhaotian / mucai M3): `model.mm_projector.{0,2}`, `model.layers.*`,
                  `model.vision_tower.vision_tower.vision_model.*`, `model.image_newline`, `lm_head.weight`;
                  detected by its `mm_*` config keys
  clip            a CLIPVisionModel / CLIPModel directory (`--vision-from`): `vision_model.*`
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from m3_jax.errors import Incompatible
from m3_jax.models.config import (AnyresConfig, LLMConfig, M3Config, ModelConfig, ProjectorConfig, VisionConfig,
                                  check_scales)


class ConversionError(Incompatible):
  """A source checkpoint that cannot be converted; the message names what was wrong and what was expected."""


# ---- per-key transforms (HF tensor <-> m3 leaf) ------------------------------------------------------------------

def _linear(x):  # torch Linear [out, in] -> flax kernel [in, out]
  return np.swapaxes(x, 0, 1)


def _conv(x):  # torch Conv2d [out, in, kh, kw] -> flax [kh, kw, in, out]
  return np.transpose(x, (2, 3, 1, 0))


def _conv_inv(x):
  return np.transpose(x, (3, 2, 0, 1))


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {  # name -> (to m3, back to HF)
    "identity": (lambda x: x, lambda x: x),
    "linear": (_linear, _linear),
    "conv": (_conv, _conv_inv),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter: canonical HF name (`{i}` = layer index), m3 path, transform, m3 shape (per layer)."""
  hf: str
  m3: str
  transform: str
  shape: tuple[int, ...]       # the m3 leaf's shape without the [L] axis
  layers: int = 0              # >0: per-layer, stacked on a leading [layers] axis

  def hf_shape(self) -> tuple[int, ...]:
    """The shape the HF tensor must have (the inverse transform applied to the m3 shape)."""
    back = TRANSFORMS[self.transform][1]
    return tuple(back(np.empty(self.shape, np.int8)).shape)


V = "vision_tower.vision_model."
LM = "language_model.model."


def rules(cfg: ModelConfig) -> list[Rule]:
  """The full mapping table for a model config (each m3 leaf exactly once)."""
  v, l = cfg.vision, cfg.llm
  W, P, N = v.width, v.patch_size, v.num_patches
  D, F, H, Hkv, Dh, Vocab = l.width, l.mlp_dim, l.heads, l.kv_heads, l.dim_per_head, l.vocab_size
  out = [
      Rule(V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv", (P, P, 3, W)),
      Rule(V + "embeddings.class_embedding", "vision/cls_token", "identity", (W,)),
      Rule(V + "embeddings.position_embedding.weight", "vision/pos_embed", "identity", (N + 1, W)),
      Rule(V + "pre_layrnorm.weight", "vision/pre_norm/scale", "identity", (W,)),
      Rule(V + "pre_layrnorm.bias", "vision/pre_norm/bias", "identity", (W,)),
      Rule(V + "post_layernorm.weight", "vision/post_norm/scale", "identity", (W,)),
      Rule(V + "post_layernorm.bias", "vision/post_norm/bias", "identity", (W,)),
  ]
  vl = V + "encoder.layers.{i}."
  for hf, m3 in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
    out += [Rule(vl + hf + ".weight", f"vision/layers/{m3}/scale", "identity", (W,), v.depth),
            Rule(vl + hf + ".bias", f"vision/layers/{m3}/bias", "identity", (W,), v.depth)]
  for hf, m3 in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
    out += [Rule(vl + f"self_attn.{hf}.weight", f"vision/layers/attn/{m3}/kernel", "linear", (W, W), v.depth),
            Rule(vl + f"self_attn.{hf}.bias", f"vision/layers/attn/{m3}/bias", "identity", (W,), v.depth)]
  for name, shape in (("fc1", (W, v.mlp_dim)), ("fc2", (v.mlp_dim, W))):
    out += [Rule(vl + f"mlp.{name}.weight", f"vision/layers/mlp/{name}/kernel", "linear", shape, v.depth),
            Rule(vl + f"mlp.{name}.bias", f"vision/layers/mlp/{name}/bias", "identity", shape[1:], v.depth)]

  out += [Rule("multi_modal_projector.linear_1.weight", "projector/linear_1/kernel", "linear", (W, D)),
          Rule("multi_modal_projector.linear_1.bias", "projector/linear_1/bias", "identity", (D,))]
  if cfg.projector.type == "mlp2x_gelu":
    out += [Rule("multi_modal_projector.linear_2.weight", "projector/linear_2/kernel", "linear", (D, D)),
            Rule("multi_modal_projector.linear_2.bias", "projector/linear_2/bias", "identity", (D,))]

  ll = LM + "layers.{i}."
  out += [Rule(LM + "embed_tokens.weight", "llm/embed/embedding", "identity", (Vocab, D)),
          Rule(ll + "input_layernorm.weight", "llm/layers/attn_norm/scale", "identity", (D,), l.depth),
          Rule(ll + "post_attention_layernorm.weight", "llm/layers/mlp_norm/scale", "identity", (D,), l.depth)]
  for hf, m3, shape in (("q_proj", "q", (D, H * Dh)), ("k_proj", "k", (D, Hkv * Dh)), ("v_proj", "v", (D, Hkv * Dh)),
                        ("o_proj", "o", (H * Dh, D))):
    out.append(Rule(ll + f"self_attn.{hf}.weight", f"llm/layers/attn/{m3}/kernel", "linear", shape, l.depth))
  for name, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
    out.append(Rule(ll + f"mlp.{name}_proj.weight", f"llm/layers/mlp/{name}/kernel", "linear", shape, l.depth))
  out += [Rule(LM + "norm.weight", "llm/norm/scale", "identity", (D,)),
          Rule("language_model.lm_head.weight", "llm/lm_head/kernel", "linear", (D, Vocab))]
  if cfg.type == "llava_next":
    out.append(Rule("image_newline", "image_newline", "identity", (D,)))
  return out


def expand(rule: Rule) -> list[str]:
  """Canonical HF names of one rule (one per layer for per-layer rules)."""
  return [rule.hf.format(i=i) for i in range(rule.layers)] if rule.layers else [rule.hf]


# ---- layouts: source name -> canonical name -----------------------------------------------------------------------

# (source prefix, canonical prefix), first match wins.
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "llava_hf": (("vision_tower.vision_model.", V), ("vision_tower.", V),
                 ("multi_modal_projector.", "multi_modal_projector."), ("language_model.", "language_model."),
                 ("image_newline", "image_newline")),
    "llava_hf_model": (("model.vision_tower.vision_model.", V), ("model.vision_tower.", V),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", LM), ("lm_head.", "language_model.lm_head."),
                       ("model.image_newline", "image_newline")),
    "original": (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                 ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                 ("model.mm_projector.", "multi_modal_projector.linear_1."),   # mm_projector_type "linear"
                 ("model.vision_tower.vision_tower.vision_model.", V),
                 ("model.image_newline", "image_newline"), ("model.", LM), ("lm_head.", "language_model.lm_head.")),
    "clip": (("vision_model.", V), ("embeddings.", V + "embeddings."), ("encoder.", V + "encoder."),
             ("pre_layrnorm.", V + "pre_layrnorm."), ("post_layernorm.", V + "post_layernorm.")),
}

# Buffers and parts that carry no model parameters: skipped silently.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
IGNORED_PREFIXES = {"clip": ("text_model.", "text_projection.", "visual_projection.", "logit_scale")}


def canonical(layout: str, key: str) -> str | None:
  """The canonical name of a source key, or None when the key is a known non-parameter (ignored)."""
  if key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES.get(layout, ("\0",))):
    return None
  for src, dst in LAYOUTS[layout]:
    if key.startswith(src):
      return dst + key[len(src):]
  return "?" + key  # unknown: reported by the converter with the key's own name


def is_original(config: dict) -> bool:
  return any(k.startswith("mm_") for k in config)


def detect_layout(config: dict, keys) -> str:
  """llava_hf | llava_hf_model | original, from config.json (and the weight names for the two llava-hf spellings)."""
  if is_original(config):
    return "original"
  model_type = config.get("model_type")
  if model_type in ("llava", "llava_next"):
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
      return "llava_hf_model"
    if any(k.startswith("language_model.") for k in keys):
      return "llava_hf"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"config.json says model_type={model_type!r} but the weights have neither "
                          f"`language_model.*` nor `model.language_model.*` names (first keys: {sample})")
  raise ConversionError(
      f"unknown checkpoint layout: config.json has model_type={model_type!r}, architectures="
      f"{config.get('architectures')!r} and no `mm_*` keys; expected a llava-hf checkpoint (model_type 'llava' or "
      "'llava_next') or an original LLaVA / M3 one (LlavaLlamaForCausalLM with mm_vision_tower, mm_projector_type...)")


# ---- configs ------------------------------------------------------------------------------------------------------

# Vision towers whose config is known without a download (original checkpoints name them in `mm_vision_tower`).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def default_scales(grid: int) -> tuple[int, ...]:
  """The paper's chain for a token grid: halve the side while it is even, then 1 (24 -> 576, 144, 36, 9, 1)."""
  side, out = grid, [grid * grid]
  while side % 2 == 0 and side > 2:
    side //= 2
    out.append(side * side)
  if out[-1] != 1:
    out.append(1)
  return tuple(out)


def _get(d: dict, *names, default=None):
  for n in names:
    if d.get(n) is not None:
      return d[n]
  return default


# The vision fields that decide parameter shapes or the token grid: a source must give them (CLIPVisionConfig's
# defaults, e.g. patch_size 32, describe another model and would build a wrong one silently).
VISION_SHAPE_FIELDS = ("hidden_size", "image_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                       "patch_size")


def vision_config(v: dict, feature_layer: int, select: str, where: str = "config.json vision_config") -> VisionConfig:
  """`where` names the source of `v` in errors (the file and key)."""
  missing = [k for k in VISION_SHAPE_FIELDS if v.get(k) is None]
  if missing:
    raise ConversionError(f"{where} has no {', '.join(missing)}: these decide the vision tower's shapes, so they "
                          "are not filled with defaults; add them as the source model has them")
  from transformers import CLIPVisionConfig  # fills the defaults a minimal llava-hf vision_config leaves out
  c = CLIPVisionConfig(**{k: x for k, x in v.items() if k not in ("model_type", "architectures", "transformers_version")})
  if c.hidden_act != "quick_gelu":
    raise ConversionError(f"vision_config.hidden_act={c.hidden_act!r}: the m3 CLIP tower implements quick_gelu only")
  return VisionConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size, depth=c.num_hidden_layers,
                      heads=c.num_attention_heads, mlp_dim=c.intermediate_size, feature_layer=int(feature_layer),
                      select=select, eps=float(c.layer_norm_eps))


def llm_config(t: dict) -> LLMConfig:
  from transformers import LlamaConfig
  c = LlamaConfig(**{k: x for k, x in t.items() if k not in ("model_type", "architectures", "transformers_version")})
  if getattr(c, "hidden_act", "silu") != "silu":
    raise ConversionError(f"text_config.hidden_act={c.hidden_act!r}: the m3 decoder implements SwiGLU (silu) only")
  rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
  if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
    raise ConversionError(f"rope scaling {rope} is not supported (only default RoPE)")
  theta = rope.get("rope_theta") or getattr(c, "rope_theta", None) or 10000.0
  heads = c.num_attention_heads
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
  return LLMConfig(vocab_size=c.vocab_size, width=c.hidden_size, depth=c.num_hidden_layers, heads=heads,
                   kv_heads=c.num_key_value_heads or heads, mlp_dim=c.intermediate_size, rope_theta=float(theta),
                   rms_eps=float(c.rms_norm_eps), max_len=c.max_position_embeddings,
                   head_dim=0 if head_dim * heads == c.hidden_size else head_dim)


SELECT = {"default": "patch", "full": "cls_patch", "patch": "patch", "cls_patch": "cls_patch"}


def model_config(config: dict, layout: str, vision: dict | None = None, image_token_id: int | None = None,
                 where: str = "config.json") -> ModelConfig:
  """ModelConfig from config.json (`where` names it in errors). `vision`: the CLIP vision config dict (original
  layout; from --vision-from or a known tower name)."""
  if layout == "original":
    return _original_config(config, vision, image_token_id)
  text = config.get("text_config") or {}
  select = config.get("vision_feature_select_strategy", "default")
  if select not in SELECT:
    raise ConversionError(f"vision_feature_select_strategy={select!r}: expected 'default' or 'full'")
  layer = config.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConversionError(f"vision_feature_layer={layer!r}: m3 takes one layer (an int), not a list of layers")
  act = config.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ConversionError(f"projector_hidden_act={act!r}: the m3 projector is mlp2x_gelu (exact GELU)")
  if config.get("multimodal_projector_bias", True) is False:
    raise ConversionError("multimodal_projector_bias=false is not supported (the m3 projector has biases)")
  v = vision_config(config.get("vision_config") or {}, layer, SELECT[select], f"{where} vision_config")
  llm = llm_config(text)
  is_next = config.get("model_type") == "llava_next"
  anyres = AnyresConfig()
  if is_next:
    anyres = AnyresConfig(grid_pinpoints=_pinpoints(config.get("image_grid_pinpoints")), pinpoint_order="hw")
  return _finish(ModelConfig(
      type="llava_next" if is_next else "llava15", vision=v, projector=ProjectorConfig("mlp2x_gelu"), llm=llm,
      m3=M3Config(scales=default_scales(v.grid)), anyres=anyres,
      image_token_id=int(_get(config, "image_token_index", "image_token_id", default=32000)),
      pad_token_id=int(_get(text, "pad_token_id", default=_get(config, "pad_token_id", default=0))),
      bos_token_id=int(_get(text, "bos_token_id", default=_get(config, "bos_token_id", default=1))),
      eos_token_id=int(_get(text, "eos_token_id", default=_get(config, "eos_token_id", default=2)))))


def _pinpoints(p) -> tuple[tuple[int, int], ...]:
  if not isinstance(p, (list, tuple)) or not p or not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in p):
    raise ConversionError(f"image_grid_pinpoints={p!r}: expected a list of [a, b] resolutions")
  return tuple((int(a), int(b)) for a, b in p)


def _original_config(config: dict, vision: dict | None, image_token_id: int | None) -> ModelConfig:
  tower = config.get("mm_vision_tower")
  if vision is None:
    raise ConversionError(
        f"original LLaVA checkpoint with mm_vision_tower={tower!r}: its vision config is unknown without a download; "
        f"pass --vision-from DIR (a CLIP vision model directory); known tower names: {sorted(KNOWN_TOWERS)}")
  ptype = config.get("mm_projector_type", "linear")
  if ptype not in ("mlp2x_gelu", "linear"):
    raise ConversionError(f"mm_projector_type={ptype!r}: expected 'mlp2x_gelu' or 'linear'")
  select = config.get("mm_vision_select_feature", "patch")
  if select not in SELECT:
    raise ConversionError(f"mm_vision_select_feature={select!r}: expected 'patch' or 'cls_patch'")
  v = vision_config(vision, config.get("mm_vision_select_layer", -2), SELECT[select],
                    f"the CLIP vision config of {config.get('mm_vision_tower')!r} (--vision-from config.json)")
  llm = llm_config({k: x for k, x in config.items() if not k.startswith("mm_")})
  aspect = str(config.get("image_aspect_ratio", "pad"))
  is_next = "anyres" in aspect
  anyres = AnyresConfig()
  if is_next:
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
      raise ConversionError(f"mm_patch_merge_type={merge!r} with image_aspect_ratio={aspect!r}: m3 implements the "
                            "LLaVA-NeXT 'spatial_unpad' merge only")
    anyres = AnyresConfig(grid_pinpoints=_pinpoints(config.get("image_grid_pinpoints")), pinpoint_order="wh")
  scales = config.get("matryoshka_vis_token_scale")
  scales = tuple(int(s) for s in scales) if scales else default_scales(v.grid)
  try:
    check_scales(scales, v.grid)
  except ValueError as e:
    raise ConversionError(f"matryoshka_vis_token_scale={list(scales)}: {e}") from None
  sample = config.get("matryoshka_vis_token_sample", "avg_pooling")
  pool = {"avg_pooling": "avg", "avg": "avg", "spatial": "spatial", "sequential": "sequential"}.get(sample)
  if pool is None:
    raise ConversionError(f"matryoshka_vis_token_sample={sample!r}: expected 'avg_pooling'")
  return _finish(ModelConfig(
      type="llava_next" if is_next else "llava15", vision=v, projector=ProjectorConfig(ptype), llm=llm,
      m3=M3Config(scales=scales, pool=pool), anyres=anyres,
      # LLaVA marks images with IMAGE_TOKEN_INDEX=-200 in code; m3 needs an id: the tokenizer's <image> if it has
      # one, else the first id past the vocabulary (it only marks where image embeddings go).
      image_token_id=int(image_token_id if image_token_id is not None else llm.vocab_size),
      pad_token_id=int(_get(config, "pad_token_id", default=0)),
      bos_token_id=int(_get(config, "bos_token_id", default=1)),
      eos_token_id=int(_get(config, "eos_token_id", default=2))))


def _finish(cfg: ModelConfig) -> ModelConfig:
  if cfg.vision.image_size % cfg.vision.patch_size:
    raise ConversionError(f"vision image_size {cfg.vision.image_size} is not a multiple of patch_size "
                          f"{cfg.vision.patch_size}")
  for pin in cfg.anyres.grid_pinpoints:
    if any(x % cfg.vision.image_size for x in pin):
      raise ConversionError(f"image_grid_pinpoints entry {list(pin)} is not a multiple of the crop size "
                            f"{cfg.vision.image_size}")
  return cfg


def vision_dict_from_dir_config(config: dict) -> dict:
  """The vision part of a CLIP directory's config.json (CLIPVisionModel or a full CLIPModel)."""
  if config.get("model_type") == "clip" or "vision_config" in config:
    return dict(config.get("vision_config") or {})
  return dict(config)


# ---- m3 -> HF config (export) -------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """A llava-hf config.json for `cfg` (LlavaConfig or LlavaNextConfig kwargs). Pinpoints are written (h, w)."""
  v, l = cfg.vision, cfg.llm
  text = dict(model_type="llama", vocab_size=l.vocab_size, hidden_size=l.width, intermediate_size=l.mlp_dim,
              num_hidden_layers=l.depth, num_attention_heads=l.heads, num_key_value_heads=l.kv_heads,
              head_dim=l.dim_per_head, rms_norm_eps=l.rms_eps, max_position_embeddings=l.max_len,
              rope_theta=l.rope_theta, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
              mlp_bias=False, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
              pad_token_id=cfg.pad_token_id)
  vision = dict(model_type="clip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                patch_size=v.patch_size, hidden_act="quick_gelu", layer_norm_eps=v.eps, num_channels=3)
  if cfg.projector.type != "mlp2x_gelu":
    raise ConversionError(f"projector type {cfg.projector.type!r}: llava-hf has only the 2-layer GELU projector")
  out = dict(model_type="llava_next" if cfg.type == "llava_next" else "llava",
             architectures=["LlavaNextForConditionalGeneration" if cfg.type == "llava_next"
                            else "LlavaForConditionalGeneration"],
             text_config=text, vision_config=vision, image_token_index=cfg.image_token_id,
             vision_feature_layer=v.feature_layer,
             vision_feature_select_strategy="default" if v.select == "patch" else "full",
             projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=v.num_patches,
             tie_word_embeddings=False, pad_token_id=cfg.pad_token_id)
  if cfg.type == "llava_next":
    out["image_grid_pinpoints"] = [list(p) for p in hf_pinpoints(cfg)]
  return out


def hf_pinpoints(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
  """Pinpoints as (h, w), whatever order the checkpoint wrote them in."""
  pins = cfg.anyres.grid_pinpoints
  return pins if cfg.anyres.pinpoint_order == "hw" else tuple((b, a) for a, b in pins)


def shape_str(shape) -> str:
  return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def count(cfg: ModelConfig) -> int:
  return sum(math.prod(r.shape) * max(r.layers, 1) for r in rules(cfg))
