"""Analytic cost of m3-jax's programs from the shapes alone: FLOPs, parameter, KV-cache and activation bytes
(`m3 cost`, and the model FLOPs every benchmark divides by its time for MFU).

Conventions (the paper's Table 9, made with LLM-Viewer, reproduces with them):
- A FLOP is a multiply or an add: an [m, k] x [k, n] matmul is 2*m*k*n FLOPs.
- Counted: every matmul (projections, MLPs, the patch embedding, the logits) and attention's two matmuls, QK^T and
  AV, over the real sequence: T queries x S keys each, 2*T*S*H*dh FLOPs. Causal attention is counted in full, as
  dense attention really computes it: the masked half of the scores is computed and then discarded.
- Not counted: norms, softmax, activations, RoPE, residual adds, pooling, embedding lookups (together 1-6% of
  XLA's count on the tiny config, less at 7B).
- "llm" is the decoder's transformer layers; the logits are reported apart. Table 9's FLOPs column is "llm" for one
  image and 30 text tokens: 8.04 / 2.27 / 0.86 / 0.51 / 0.40 TFLOPs at 576 / 144 / 36 / 9 / 1 (paper: 8.0 / 2.2 /
  0.9 / 0.5 / 0.4; its 144 row is 3% below this count under every convention tried).
- Prefill (the generation engine): the vision tower (every crop, CLS included, layers up to `feature_layer` only),
  the projector, the decoder over visual + text tokens, the logits at the last position only.
- Decode: one new token attending to the prompt and itself (context = prefill length + 1), logits included.
- Model FLOPs, not hardware FLOPs: a remat recomputation is not counted.
- Sizes assume no padding: the engine's and trainer's length buckets add padding that the caller counts by passing
  the padded lengths.

Shapes: T text tokens (the image's placeholder not counted), N visual tokens at a scale, L = N + T, D width,
F MLP width, H / K query / key-value heads, dh head dim, V vocabulary, W / M the vision width / MLP width.
"""
from __future__ import annotations

from typing import Sequence

from m3_jax import geometry
from m3_jax.models.config import LLMConfig, ModelConfig, VisionConfig

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
PARTS = ("vision", "projector", "llm")


# ------------------------------------------------------------------------------------------------ FLOPs
def llm_flops(llm: LLMConfig, tokens: int, context: int | None = None) -> dict[str, int]:
  """The decoder's transformer layers for `tokens` queries attending to `context` keys (default: themselves).

  -> {"matmul": q/k/v/o projections and the SwiGLU MLP, "attention": QK^T and AV}.
  """
  context = tokens if context is None else context
  d, dh = llm.width, llm.dim_per_head
  weights = d * llm.heads * dh + 2 * d * llm.kv_heads * dh + llm.heads * dh * d + 3 * d * llm.mlp_dim
  return {"matmul": 2 * tokens * weights * llm.depth,
          "attention": 2 * 2 * tokens * context * llm.heads * dh * llm.depth}


def logits_flops(llm: LLMConfig, positions: int) -> int:
  """The vocabulary projection at `positions` positions."""
  return 2 * positions * llm.width * llm.vocab_size


def vision_flops(vision: VisionConfig, crops: int = 1) -> dict[str, int]:
  """The CLIP tower on `crops` crops, CLS included, only the layers up to `feature_layer`.

  -> {"matmul": patch embedding, projections and MLPs, "attention": QK^T and AV}.
  """
  w, n, used = vision.width, vision.num_patches + 1, vision.layers_used
  patch = 2 * vision.num_patches * vision.patch_size ** 2 * 3 * w
  return {"matmul": crops * (patch + used * 2 * n * (4 * w * w + 2 * w * vision.mlp_dim)),
          "attention": crops * used * 2 * 2 * n * n * w}


def projector_flops(cfg: ModelConfig, scale: int, crops: int = 1) -> int:
  """The projector: on every encoder token of every crop when pooling after it (the released checkpoints), on the
  `scale` pooled tokens per crop when pooling before it."""
  tokens = cfg.vision.num_tokens if cfg.m3.pool_position == "after_projector" else scale
  w, d = cfg.vision.width, cfg.llm.width
  per_token = w * d + d * d if cfg.projector.type == "mlp2x_gelu" else w * d
  return 2 * crops * tokens * per_token


# ------------------------------------------------------------------------------------------ token counts
def crops(cfg: ModelConfig, image_hw: tuple[int, int] | None = None) -> int:
  """Crops the vision tower encodes for one image: 1 for LLaVA-1.5 (padded to a square), base + grid for NeXT."""
  if cfg.type != "llava_next":
    return 1
  rows, cols = geometry.grid_shape(_image(cfg, image_hw), cfg.anyres.grid_pinpoints, cfg.anyres.pinpoint_order,
                                   cfg.vision.image_size)
  return 1 + rows * cols


def visual_tokens(cfg: ModelConfig, scale: int, image_hw: tuple[int, int] | None = None) -> int:
  """Sequence positions one image occupies at `scale`: the scale for LLaVA-1.5; for NeXT `scale` per crop on the
  base crop plus the unpadded grid map with a newline closing every row."""
  cfg.check_scale(scale)
  if cfg.type != "llava_next":
    return int(scale)
  return geometry.visual_tokens(_image(cfg, image_hw), scale, cfg.anyres.grid_pinpoints, cfg.anyres.pinpoint_order,
                                cfg.vision.image_size)


def _image(cfg: ModelConfig, image_hw) -> tuple[int, int]:
  if image_hw is None:
    raise ValueError(f"a {cfg.type} model needs the image size (h, w) to count its crops and visual tokens")
  return tuple(int(x) for x in image_hw)


# ------------------------------------------------------------------------------------------------ bytes
def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameters per part ("vision", "projector", "llm"), as stored: every CLIP layer (also those LLaVA never runs),
  CLIP's post-norm, NeXT's image_newline with the projector."""
  v, p, l = cfg.vision, cfg.projector, cfg.llm
  w, d = v.width, l.width
  vision_layer = 4 * (w * w + w) + 2 * w * v.mlp_dim + v.mlp_dim + w + 2 * 2 * w
  vision = v.patch_size ** 2 * 3 * w + w + (v.num_patches + 1) * w + 2 * 2 * w + v.depth * vision_layer
  projector = w * d + d + (d * d + d if p.type == "mlp2x_gelu" else 0) + (d if cfg.type == "llava_next" else 0)
  dh = l.dim_per_head
  llm_layer = 2 * d * l.heads * dh + 2 * d * l.kv_heads * dh + 3 * d * l.mlp_dim + 2 * d
  llm = 2 * l.vocab_size * d + l.depth * llm_layer + d
  return {"vision": vision, "projector": projector, "llm": llm}


def kv_cache_bytes(llm: LLMConfig, context: int, itemsize: int) -> int:
  """Keys and values of `context` positions, every layer, one sample."""
  return 2 * llm.depth * context * llm.kv_heads * llm.dim_per_head * itemsize


def activation_bytes(llm: LLMConfig, tokens: int, itemsize: int) -> int:
  """Every tensor the decoder's layers write in a prefill of `tokens` tokens, summed over layers, one sample (what
  a forward pass without remat keeps for the backward pass). Per token and layer: the two norms' outputs, q, the
  attention output, o, down and the two residual sums (6D + 2*H*dh), gate, up and their product (3F), scores and
  probabilities (2*H*L); keys and values are the KV cache, counted there."""
  per_token = 6 * llm.width + 2 * llm.heads * llm.dim_per_head + 3 * llm.mlp_dim + 2 * llm.heads * tokens
  return tokens * per_token * llm.depth * itemsize


# ------------------------------------------------------------------------------------------------ reports
def prefill(cfg: ModelConfig, scale: int, text_tokens: int = 30, image_hw: tuple[int, int] | None = None,
            dtype: str = "float32") -> dict:
  """One sample's generation at `scale`: prefill FLOPs by part, decode FLOPs of the first new token, KV-cache and
  activation bytes."""
  itemsize = _itemsize(dtype)
  n_crops = crops(cfg, image_hw)
  n_vis = visual_tokens(cfg, scale, image_hw)
  length = n_vis + int(text_tokens)
  llm = llm_flops(cfg.llm, length)
  flops = {"vision": sum(vision_flops(cfg.vision, n_crops).values()), "projector": projector_flops(cfg, scale, n_crops),
           "llm": llm["matmul"] + llm["attention"], "llm_attention": llm["attention"],
           "logits": logits_flops(cfg.llm, 1)}
  flops["total"] = flops["vision"] + flops["projector"] + flops["llm"] + flops["logits"]
  step = llm_flops(cfg.llm, 1, length + 1)
  return {"scale": int(scale), "crops": n_crops, "visual_tokens": n_vis, "sequence": length, "prefill_flops": flops,
          "decode_flops_per_token": step["matmul"] + step["attention"] + logits_flops(cfg.llm, 1),
          "kv_cache_bytes": kv_cache_bytes(cfg.llm, length, itemsize),
          "activation_bytes": activation_bytes(cfg.llm, length, itemsize)}


def report(cfg: ModelConfig, text_tokens: int = 30, image_hw: tuple[int, int] | None = None,
           dtype: str = "float32", scales: Sequence[int] | None = None) -> dict:
  """`m3 cost`'s JSON object: parameters and one `prefill` row per scale (largest first)."""
  counts = param_counts(cfg)
  return {"model": cfg.type, "text_tokens": int(text_tokens),
          "image_hw": list(image_hw) if image_hw is not None and cfg.type == "llava_next" else None,
          "dtype": dtype, "params": {**counts, "total": sum(counts.values())},
          "param_bytes": sum(counts.values()) * _itemsize(dtype),
          "scales": [prefill(cfg, s, text_tokens, image_hw, dtype) for s in sorted(scales or cfg.m3.scales,
                                                                                  reverse=True)]}


def train_step_flops(cfg: ModelConfig, *, batch: int, text_tokens: int, label_positions: int,
                     scales: Sequence[int] | None = None, image_hw: tuple[int, int] | None = None,
                     freeze: Sequence[str] = (), impl: str = "loop") -> int:
  """Model FLOPs of one M3 train step (`m3_jax.train.objective`) on `batch` samples of one image each.

  Forward: the vision tower and projector once (per scale when pooling before the projector); each scale's decoder pass at its own length text_tokens + N_s
  (impl "loop"; "vmap" pads every scale to the largest N); the logits at `label_positions` gathered positions per
  row and scale (the label budget P). Backward: 2x the forward of a trained part (input and weight gradients);
  for a frozen part that gradients still cross (a trained part lies upstream), 1x its weight matmuls and 2x its
  attention; nothing for a frozen part with nothing trained upstream (the vision tower under
  `freeze=("vision",)`: XLA builds no backward for it). So an all-trained step is 3x its forward.
  """
  if impl not in ("loop", "vmap"):
    raise ValueError(f"impl={impl!r}: expected 'loop' or 'vmap' (train.scale_loss)")
  bad = sorted(set(freeze) - set(PARTS))
  if bad:
    raise ValueError(f"freeze={tuple(freeze)!r}: {bad} are not parts; expected any of {PARTS}")
  scales = tuple(scales or cfg.m3.scales)
  n_crops = crops(cfg, image_hw)
  longest = max(visual_tokens(cfg, s, image_hw) for s in scales)
  llm = {"matmul": 0, "attention": 0}
  for s in scales:
    f = llm_flops(cfg.llm, int(text_tokens) + (longest if impl == "vmap" else visual_tokens(cfg, s, image_hw)))
    llm["matmul"] += f["matmul"] + logits_flops(cfg.llm, label_positions)
    llm["attention"] += f["attention"]
  pooled = scales if cfg.m3.pool_position == "before_projector" else scales[:1]  # after: once, on the encoder grid
  forward = {"vision": vision_flops(cfg.vision, n_crops), "llm": llm,
             "projector": {"matmul": sum(projector_flops(cfg, s, n_crops) for s in pooled), "attention": 0}}
  total = 0
  for i, part in enumerate(PARTS):
    trained = part not in freeze
    crossed = trained or any(p not in freeze for p in PARTS[:i])
    # Backward: a weight matmul costs 2x its forward when trained (input and weight gradients), 1x when frozen but
    # crossed (input gradient only); attention's matmuls have no weights and cost 2x whenever crossed.
    total += forward[part]["matmul"] * (1 + (2 if trained else int(crossed)))
    total += forward[part]["attention"] * (1 + 2 * int(crossed))
  return batch * total


def _itemsize(dtype: str) -> int:
  try:
    return ITEMSIZE[dtype]
  except KeyError:
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(ITEMSIZE)}") from None
