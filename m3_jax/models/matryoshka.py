"""Matryoshka visual tokens: nested sets of visual tokens from one token grid (paper Sec. 3, Table 6).

A scale is a number of visual tokens, a square s = side**2 whose side divides the grid side g. Every method is
nested: the tokens of a coarser scale are derived from (avg) or a subset of (spatial, sequential) a finer one.
- avg: average pooling with window and stride g/side (`jax.lax.reduce_window`). 2x2 pooling applied twice equals
  one 4x4 pooling, so pooling straight from the full grid gives the paper's sequential 2x2, 2x2, 2x2, 3x3 chain.
- spatial: the top-left token of each g/side window (strided sampling; a coarser set is a subset of a finer one
  when the windows nest).
- sequential: the first `scale` tokens in raster order.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp

POOL_METHODS = ("avg", "spatial", "sequential")
# Where the scales are pooled: the projector's output (the released M3 checkpoints) or the vision features.
POOL_POSITIONS = ("after_projector", "before_projector")


def nested_pool(tokens, scale: int, method: str = "avg"):
  """float[B, g*g, C] -> float[B, scale, C]: the `scale`-token set of a square token grid (row-major)."""
  n = tokens.shape[1]
  grid = math.isqrt(n)
  side = math.isqrt(scale)
  if grid * grid != n:
    raise ValueError(f"nested_pool needs a square token grid, got {n} tokens")
  if side == 0 or side * side != scale or grid % side:
    raise ValueError(f"scale {scale} is not a square whose side divides the {grid}x{grid} grid")
  if method not in POOL_METHODS:
    raise ValueError(f"pool method {method!r}: expected one of {', '.join(POOL_METHODS)}")
  if scale == n:
    return tokens
  if method == "sequential":
    return tokens[:, :scale]
  x = einops.rearrange(tokens, "b (h w) c -> b h w c", h=grid)
  k = grid // side
  if method == "avg":
    summed = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, k, k, 1), (1, k, k, 1), "VALID")
    x = (summed / (k * k)).astype(tokens.dtype)
  else:  # spatial
    x = x[:, ::k, ::k]
  return einops.rearrange(x, "b h w c -> b (h w) c")
