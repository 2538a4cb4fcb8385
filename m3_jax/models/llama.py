"""Vicuna / LLaMA decoder: float32 RMSNorm, RoPE (rotate_half, cat(freqs, freqs): HF weights need no
permutation), SwiGLU, grouped-query attention, causal + padding masks, a KV cache, untied head.

The KV cache is explicit state, not a Flax collection: a tuple with one {"k": float[B, K, Dh, S],
"v": float[B, K, S, Dh]} per layer (`init_cache`; keys stored transposed, so both attention products are plain
batched matmuls). A call with a cache writes its T new keys and values at slots [cache_index, cache_index + T) of
each layer, then attends over every slot j <= its own where `kv_mask[b, j]`: a prefill (cache_index a Python int,
0 or the length of a prefix already in the cache) reads its first cache_index + T slots, a decode step (cache_index
traced) all of them. The write comes before the read, so inside a decode loop XLA updates each
layer's cache in place (reading it first and writing it after, as a stacked [L, ...] cache did, made XLA copy the
cache every step).

Layers run as a `lax.scan` over parameters stacked on a "layers" axis (training, scoring), or unrolled: always
with a cache, and whenever the layers are given unscanned (`unscan`: a tuple of per-layer trees, the engine's
layout, as MaxText's unscanned inference checkpoints). Inside a decode loop a scan, or a slice of stacked
parameters, copies every layer's weights on every step (XLA:CPU); unscanned parameters are read where they lie.
Positions (for RoPE) are per token, so left padding works: pass cumsum(mask) - 1.
"""
from __future__ import annotations

from typing import Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from m3_jax.models.config import LLMConfig
from m3_jax.models.layers import Dtype, RMSNorm, attention, cached_attention, dense, partitioned, run_stack, scanned
from m3_jax.sharding import BATCH, EMBED, HEADS, KV, LENGTH, MLP, VOCAB, constrain


def rope(x, positions, theta: float):
  """Rotary embedding as transformers' LLaMA: x float[B, T, H, D], positions int[B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]           # [B, T, 1, D]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LlamaAttention(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv_mask, cache, cache_index):
    """x float[B, T, D]; kv_mask bool[B, S] (a key slot's validity) or bool[B, T, S] (per query: a packed pass's
    block-diagonal mask); cache: this layer's {"k": [B, K, Dh, S], "v": [B, K, S, Dh]} or None -> (float[B, T, D],
    the cache with this call's keys and values written at cache_index, or None)."""
    c = self.config
    dh = c.dim_per_head
    q = dense(c.heads * dh, (EMBED, HEADS), bias=False, dtype=self.dtype, name="q")(x)
    k = dense(c.kv_heads * dh, (EMBED, KV), bias=False, dtype=self.dtype, name="k")(x)
    v = dense(c.kv_heads * dh, (EMBED, KV), bias=False, dtype=self.dtype, name="v")(x)
    q, k, v = (einops.rearrange(t, "b t (h d) -> b t h d", d=dh) for t in (q, k, v))
    q = constrain(q, (BATCH, LENGTH, HEADS, None))
    k, v = (constrain(t, (BATCH, LENGTH, KV, None)) for t in (k, v))
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    t = x.shape[1]
    keys = (kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask).astype(bool)          # [B, 1 or T, S]
    if cache is None:
      causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]  # key i' <= query i: bool[1, T, T]
      o = attention(q, k, v, causal & keys, self.dtype)
    else:
      k_t, v_c = cache["k"], cache["v"]
      k_t = jax.lax.dynamic_update_slice(k_t, jnp.transpose(k.astype(k_t.dtype), (0, 2, 3, 1)), (0, 0, 0, cache_index))
      v_c = jax.lax.dynamic_update_slice(v_c, jnp.swapaxes(v.astype(v_c.dtype), 1, 2), (0, 0, cache_index, 0))
      cache = {"k": k_t, "v": v_c}
      # Read from the cache just written: slots up to each query's own (with a Python cache_index, a prefill's
      # first cache_index + T slots: its own and any prefix's before them).
      n = cache_index + t if isinstance(cache_index, int) else k_t.shape[3]
      own = jnp.arange(n)[None, :] <= cache_index + jnp.arange(t)[:, None]                    # [T, n]
      o = cached_attention(q, k_t[..., :n].astype(self.dtype), v_c[:, :, :n].astype(self.dtype),
                           keys[:, :, :n] & own[None], self.dtype)
    o = constrain(o, (BATCH, LENGTH, HEADS, None))
    o = dense(c.width, (HEADS, EMBED), bias=False, dtype=self.dtype, name="o")(
        einops.rearrange(o, "b t h d -> b t (h d)"))
    return o, cache


class LlamaMLP(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = dense(c.mlp_dim, (EMBED, MLP), bias=False, dtype=self.dtype, name="gate")(x)
    up = dense(c.mlp_dim, (EMBED, MLP), bias=False, dtype=self.dtype, name="up")(x)
    hidden = constrain(jax.nn.silu(gate) * up, (BATCH, LENGTH, MLP))
    return dense(c.width, (MLP, EMBED), bias=False, dtype=self.dtype, name="down")(hidden)


class LlamaBlock(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, cache):
    """carry = (x float[B,T,D], positions int[B,T], kv_mask bool[B,S], cache_index); cache: this layer's (see
    LlamaAttention) or None -> (carry, the updated cache or None)."""
    x, positions, kv_mask, cache_index = carry
    c = self.config
    x = constrain(x, (BATCH, LENGTH, EMBED))  # the residual stream
    h, cache = LlamaAttention(c, self.dtype, name="attn")(
        RMSNorm(c.rms_eps, name="attn_norm")(x), positions, kv_mask, cache, cache_index)
    x = constrain(x + h, (BATCH, LENGTH, EMBED))
    x = x + LlamaMLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_eps, name="mlp_norm")(x))
    return (constrain(x, (BATCH, LENGTH, EMBED)), positions, kv_mask, cache_index), cache


class Llama(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32,
                          embedding_init=partitioned(nn.initializers.normal(0.02), VOCAB, EMBED))
    self.layers = scanned(LlamaBlock, c.depth)(c, self.dtype)
    self.norm = RMSNorm(c.rms_eps)
    self.lm_head = dense(c.vocab_size, (EMBED, VOCAB), bias=False, dtype=self.dtype)

  def embed_tokens(self, ids):
    """int32[B, T] -> float[B, T, D]."""
    return self.embed(ids)

  def __call__(self, x, positions, kv_mask, cache=None, cache_index=0):
    """float[B, T, D] -> (final-normed hidden float[B, T, D], updated cache or None).
    cache: `init_cache`'s tuple or None; kv_mask bool[B, S] (or [B, T, S], per query); cache_index: int or
    int32[], the slot of the first of the T new tokens (a Python int is a prefill: it reads only the slots before
    cache_index + T; 0 reads no cached slot)."""
    c = self.config
    carry = (x, positions, kv_mask, cache_index)
    layers = None if self.is_initializing() else nn.unbox(self.variables["params"]["layers"])
    if layers is None or (cache is None and not isinstance(layers, tuple)):  # initialising declares the stack
      (x, *_), _ = run_stack(self, LlamaBlock, dict(config=c, dtype=self.dtype), depth=c.depth, used=c.depth,
                             remat=self.remat, carry=carry, layers=self.layers)
      return self.norm(x), cache
    block = LlamaBlock(c, self.dtype, parent=None)
    new = []
    for i in range(c.depth):
      p = layers[i] if isinstance(layers, tuple) else jax.tree.map(lambda a, i=i: a[i], layers)
      carry, layer_cache = block.apply({"params": p}, carry, None if cache is None else cache[i])
      new.append(layer_cache)
    return self.norm(carry[0]), None if cache is None else tuple(new)

  def logits(self, hidden):
    """float[..., D] -> float32[..., V]."""
    return self.lm_head(hidden).astype(jnp.float32)


def init_cache(config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[dict, ...]:
  """One {"k": zeros[B, K, Dh, S], "v": zeros[B, K, S, Dh]} per layer (see the module docstring)."""
  k, d = config.kv_heads, config.dim_per_head
  return tuple({"k": jnp.zeros((batch, k, d, length), dtype), "v": jnp.zeros((batch, k, length, d), dtype)}
               for _ in range(config.depth))


SLOT_AXIS = {"k": 3, "v": 2}  # the slot (sequence) axis of each cache array


def map_cache(fn: Callable, *caches) -> tuple[dict, ...]:
  """fn(the same array of each cache..., its slot axis) -> array, for each layer's "k" and "v"."""
  return tuple({n: fn(*(layer[n] for layer in layers), SLOT_AXIS[n]) for n in ("k", "v")} for layers in zip(*caches))


def unscan(params: dict) -> dict:
  """Llama params with the stacked "layers" split into a tuple of per-layer trees (the inference layout; a tuple
  is returned as it is). The split copies the layers' weights: the stacked arrays are freed once nothing else
  holds them."""
  layers = params["layers"]
  if isinstance(layers, tuple):
    return params
  depth = jax.tree.leaves(layers)[0].shape[0]
  flat, tree = jax.tree.flatten(layers)
  # Each stacked leaf split along its first axis by indexing, which keeps a sharded leaf's layout per layer
  # (iterating an array would gather it to one device); abstract leaves too, for lowering without weights.
  per_leaf = [[jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)] * depth if isinstance(leaf, jax.ShapeDtypeStruct)
              else [leaf[i] for i in range(depth)] for leaf in flat]
  return {**params, "layers": tuple(jax.tree.unflatten(tree, [p[i] for p in per_leaf]) for i in range(depth))}
