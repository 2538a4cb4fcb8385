"""Building blocks shared by the vision encoder and the decoder: partitioned initialisers, norms, attention
masking, and a layer stack whose parameters are stacked on a leading "layers" axis.

Einsum letters: B batch, T query length, S key length, H heads, K key/value heads, D head dim.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m3_jax.sharding import LAYERS, NORM

Dtype = Any


def partitioned(init: Callable, *names: str | None) -> Callable:
  """An initialiser whose parameter carries logical axis names (`m3_jax.sharding`; mapped to mesh axes by the
  run's `mesh.rules`)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str | None, str | None], *, bias: bool, dtype: Dtype,
          name: str | None = None) -> nn.Dense:
  """A Dense layer with a float32 [in, out] kernel named by logical axes (PyTorch Linear stores [out, in])."""
  return nn.Dense(
      features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=partitioned(nn.initializers.lecun_normal(), *names),
      bias_init=partitioned(nn.initializers.zeros_init(), names[1]))


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalised in float32, cast back, then scaled (as transformers' LlamaRMSNorm)."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), NORM), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(x.dtype) * x32.astype(x.dtype)) if x.dtype != jnp.float32 else scale * x32


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=partitioned(nn.initializers.ones_init(), NORM),
      bias_init=partitioned(nn.initializers.zeros_init(), NORM))


def attention(q, k, v, allowed, dtype: Dtype):
  """Softmax attention in float32 with grouped key/value heads.

  q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; allowed: bool[B, T, S] (or broadcastable).
  Returns [B, T, H, D]. A row with no allowed key (a padding query) yields finite values, never NaN.
  Computed as `cached_attention` (keys and values moved to its layout: copies of [B, S, K, D], small beside the
  [B, H, T, S] scores, which then need no transpose; an einsum let XLA:CPU transpose the scores in every pass).
  """
  return cached_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2), allowed, dtype)


def cached_attention(q, k_t, v, allowed, dtype: Dtype):
  """`attention` over a KV cache laid out for plain batched matmuls: q [B, T, H, D]; k_t [B, K, D, S] (keys
  transposed); v [B, K, S, D]; allowed bool[B, T, S] -> [B, T, H, D].

  Both products are [B, K] batches of [G*T, D] @ [D, S] and [G*T, S] @ [S, D], with no transpose of the cache
  (XLA:CPU's dot against the cache's minor axis, the [B, K, S, D] key layout, took 4x as long at batch 8)."""
  b, t, h, d = q.shape
  kh, s = k_t.shape[1], k_t.shape[3]
  groups = h // kh
  q = jnp.transpose(q.reshape(b, t, kh, groups, d), (0, 2, 3, 1, 4)).reshape(b, kh, groups * t, d)
  batch = ((0, 1), (0, 1))
  scores = jax.lax.dot_general(q, k_t, (((3,), (2,)), batch), preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(allowed[:, None, None, :, :], scores.reshape(b, kh, groups, t, s), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kh, groups * t, s)
  out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch))                       # [B, K, G*T, D]
  return jnp.transpose(out.reshape(b, kh, groups, t, d), (0, 3, 1, 2, 4)).reshape(b, t, h, d)


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scanned(block: type[nn.Module], depth: int) -> type[nn.Module]:
  """`block` repeated `depth` times with parameters stacked on a leading axis named LAYERS."""
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                 metadata_params={nn.PARTITION_NAME: LAYERS})


def run_stack(module: nn.Module, block: type[nn.Module], block_kwargs: dict, *, depth: int, used: int,
              remat: str, carry, xs=None, name: str = "layers", layers: nn.Module | None = None):
  """Runs the first `used` of `depth` layers whose parameters are stacked on a leading axis named "layers".

  Initialisation declares all `depth` layers (a checkpoint holds them all, e.g. CLIP's last layer that LLaVA
  never uses); applying runs only the first `used`, so unused layers cost nothing. `block(**block_kwargs)` is
  called as `block(carry, x) -> (carry, y)`; `xs` are per-layer inputs with a leading axis.
  A setup-style module passes its `scanned(...)` submodule as `layers`; a compact one lets it be made here.
  """
  if module.is_initializing():
    layers = layers or scanned(block, depth)(**block_kwargs, name=name)
    return layers(carry, xs)

  params = nn.unbox(module.variables["params"][name])
  if used < depth:
    params = jax.tree.map(lambda p: p[:used], params)
  layer = block(**block_kwargs, parent=None)

  def body(carry, inputs):
    layer_params, x = inputs
    return layer.apply({"params": layer_params}, carry, x)

  if remat != "none":
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}: expected one of 'none', {', '.join(map(repr, REMAT_POLICIES))}")
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, carry, (params, xs))
