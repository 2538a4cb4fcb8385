"""The multimodal projector: CLIP features -> LLM embeddings (LLaVA `mlp2x_gelu` with the exact erf GELU)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m3_jax.models.layers import Dtype, dense
from m3_jax.sharding import EMBED, MLP, VIT_EMBED


class Projector(nn.Module):
  type: str
  width: int  # LLM width D
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """float[B, N, Cv] -> float[B, N, D]."""
    if self.type == "linear":
      return dense(self.width, (VIT_EMBED, EMBED), bias=True, dtype=self.dtype, name="linear_1")(x)
    if self.type != "mlp2x_gelu":
      raise ValueError(f"model.projector.type={self.type!r}: expected 'mlp2x_gelu' or 'linear'")
    x = dense(self.width, (VIT_EMBED, MLP), bias=True, dtype=self.dtype, name="linear_1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return dense(self.width, (MLP, EMBED), bias=True, dtype=self.dtype, name="linear_2")(x)
