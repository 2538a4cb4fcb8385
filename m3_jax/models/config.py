"""The model's static description: frozen dataclasses built from the ml_collections `model` config.

They are hashable (usable as Flax module fields and jit static arguments) and round-trip through
`m3_config.json` in an m3 checkpoint directory (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from m3_jax.models.matryoshka import POOL_METHODS, POOL_POSITIONS


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  feature_layer: int = -2      # hidden state index as HF counts them: 0 = embeddings, -1 = last layer
  select: str = "patch"        # "patch" drops CLS (LLaVA "default"), "cls_patch" keeps it ("full")
  eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_tokens(self) -> int:
    """Visual tokens the encoder hands on (before pooling)."""
    return self.num_patches + (self.select == "cls_patch")

  @property
  def layers_used(self) -> int:
    """Transformer layers that must run to produce `feature_layer` (HF index: hidden_states[0] = embeddings)."""
    return self.feature_layer % (self.depth + 1)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  type: str = "mlp2x_gelu"     # "mlp2x_gelu" | "linear"


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int = 32064
  width: int = 4096
  depth: int = 32
  heads: int = 32
  kv_heads: int = 32
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  max_len: int = 4096
  head_dim: int = 0            # 0: width // heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.width // self.heads


@dataclasses.dataclass(frozen=True)
class M3Config:
  scales: tuple[int, ...] = (576, 144, 36, 9, 1)
  pool: str = "avg"                        # "avg" | "spatial" | "sequential"  (paper Table 6)
  pool_position: str = "after_projector"   # "after_projector" (released checkpoints) | "before_projector"


@dataclasses.dataclass(frozen=True)
class AnyresConfig:
  grid_pinpoints: tuple[tuple[int, int], ...] = ()
  pinpoint_order: str = "hw"               # how grid_pinpoints are written: llava-hf (h, w), original LLaVA (w, h)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  type: str = "llava15"                    # "llava15" | "llava_next"
  vision: VisionConfig = VisionConfig()
  projector: ProjectorConfig = ProjectorConfig()
  llm: LLMConfig = LLMConfig()
  m3: M3Config = M3Config()
  anyres: AnyresConfig = AnyresConfig()
  image_token_id: int = 32000
  pad_token_id: int = 32001
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: str = "float32"                   # compute dtype
  remat: str = "none"                      # "none" | "full" | "dots"

  def __post_init__(self):
    check_scales(self.m3.scales, self.vision.grid)
    if self.m3.pool not in POOL_METHODS:
      raise ValueError(f"model.m3.pool={self.m3.pool!r}: expected one of {', '.join(POOL_METHODS)}")
    if self.m3.pool_position not in POOL_POSITIONS:
      raise ValueError(f"model.m3.pool_position={self.m3.pool_position!r}: expected one of "
                       f"{', '.join(POOL_POSITIONS)}")
    if self.type not in ("llava15", "llava_next"):
      raise ValueError(f"model.type={self.type!r}: expected 'llava15' or 'llava_next'")
    if self.vision.select not in ("patch", "cls_patch"):
      raise ValueError(f"model.vision.select={self.vision.select!r}: expected 'patch' or 'cls_patch'")

  @property
  def full_scale(self) -> int:
    return self.vision.num_patches

  def check_scale(self, scale: int) -> int:
    if scale not in self.m3.scales:
      chain = ", ".join(str(s) for s in sorted(self.m3.scales))
      raise ValueError(f"scale {scale} is not one of {chain} (the configured nested chain model.m3.scales)")
    return int(scale)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---- (de)serialisation -------------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    sub = dict(vision=VisionConfig, projector=ProjectorConfig, llm=LLMConfig, m3=M3Config, anyres=AnyresConfig)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
    for key, klass in sub.items():
      if key in d:
        fields = {f.name for f in dataclasses.fields(klass)}
        bad = sorted(set(d[key]) - fields)
        if bad:
          raise ValueError(f"unknown keys {bad} in model.{key}; expected a subset of {sorted(fields)}")
        d[key] = klass(**{k: _tuplify(v) for k, v in d[key].items()})
    return cls(**d)

  @classmethod
  def from_config(cls, model_config) -> "ModelConfig":
    """From the ml_collections `config.model` (or any nested mapping)."""
    to_dict = getattr(model_config, "to_dict", None)
    return cls.from_dict(to_dict() if to_dict else dict(model_config))


def _tuplify(v):
  if isinstance(v, list):
    return tuple(_tuplify(x) for x in v)
  return v


def check_scales(scales: tuple[int, ...], grid: int):
  """Every scale must be a square number whose side divides the token grid (nested pooling needs it)."""
  for s in scales:
    side = math.isqrt(s)
    if side == 0 or side * side != s or grid % side:
      raise ValueError(f"scale {s} in model.m3.scales is not a square whose side divides the {grid}x{grid} "
                       f"token grid; valid scales here are {valid_scales(grid)}")
  if len(set(scales)) != len(scales):
    raise ValueError(f"model.m3.scales {scales} has repeated entries")


def valid_scales(grid: int) -> list[int]:
  return sorted((side * side for side in range(1, grid + 1) if grid % side == 0), reverse=True)
