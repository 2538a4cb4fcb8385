"""The generation engine: jitted batched prefill + decode with a KV cache, a visual-token scale per sample, and
log-likelihood scoring of answer options. `m3 generate`, `m3 eval` and `m3_jax.load(...).generate` all use it.

Prompts are left-padded to a bucketed length and visual tokens padded to a bucketed count, so a few shapes are
compiled once and reused. Every sample carries its own number of visual tokens (`n_vis`): padding slots are out
of attention and of the RoPE position count, so a sample's result does not depend on what it is batched with.
A batch may mix scales: samples are grouped by scale for the encoder, results come back in input order.

Prefix caching (`prefix_limit` > 0; `m3_jax.load` sets it to the chat template's header, its system prompt and
first role marker): the tokens a batch's prompts share before their first image, up to `prefix_limit`, in whole
blocks of `length_step` tokens, are prefilled once per engine and kept (a few prefixes, least recently used first
out); each batch copies their keys and values into the cache's first slots and prefills only the rest.

Shapes: B batch, T prompt length (bucketed), N visual tokens (bucketed), L = T + N - 1, K new tokens, D width.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from m3_jax import sharding
from m3_jax.errors import InputTooLong
from m3_jax.labels import IGNORE
from m3_jax.models import anyres, llama, llava
from m3_jax.models.config import ModelConfig


# The one default answer length: m3 generate / m3 eval --max-new-tokens, m3_jax.load().generate, m3 serve max_tokens.
MAX_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = MAX_NEW_TOKENS
  temperature: float = 0.0   # 0: greedy
  top_p: float = 1.0
  seed: int = 0


_row_keys = jax.jit(jax.vmap(jax.random.key))


def row_keys(seeds: Sequence[int]) -> jax.Array:
  """key[B]: row i's key equal to `jax.random.key(seeds[i])` (seeds in [0, 2**32)), made by one dispatch (a
  `jax.random.key` per row cost a server batch of 8 about 1.5 ms of host time)."""
  return _row_keys(np.asarray(seeds, np.uint32))


def bucket(n: int, step: int) -> int:
  return max(step, -(-n // step) * step)


def shared_prefix(seqs: Sequence[np.ndarray], visual: Sequence[np.ndarray | None], image_token_id: int,
                  block: int, most: int | None = None) -> int:
  """The prefix the prompts share and may take from a prefix cache: their longest common prefix, at `most` tokens,
  in whole `block`s, short of each prompt's last token (its logits start the answer) and of its image placeholder
  (the visual tokens go in after it); 0 when under one block."""
  limit = max(0, min(len(s) - 1 for s in seqs))
  if most is not None:
    limit = min(limit, most)
  for s, v in zip(seqs, visual):
    if v is not None:
      limit = min(limit, int(np.argmax(s == image_token_id)))
  for s in seqs[1:]:
    differ = np.flatnonzero(s[:limit] != seqs[0][:limit])
    limit = int(differ[0]) if len(differ) else limit
  return limit // block * block


def power_of_two(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1): batch rows and answer lengths share a few compilations."""
  return 1 << max(n - 1, 0).bit_length()


def new_tokens_bucket(n: int) -> int:
  """The compiled answer length for a request of `n` new tokens: a power of two >= 8 (the decode loop stops at `n`
  itself), so requests' lengths share a few compilations; the KV cache has room for the bucket."""
  return max(8, power_of_two(n))


def pick(logits, rng, temperature, top_p, *, greedy: bool, per_row: bool):
  """The next token of each row, int32[B], from logits float32[B, V]: argmax when greedy; else softmax at
  `temperature` within nucleus `top_p`, scalars and one key, or with per_row float32[B] and key[B] (one per row;
  temperature <= 0 is greedy for that row)."""
  b = logits.shape[0]
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # temperature, top_p: scalars, or float32[B] with per_row (then [B, 1] against the vocabulary).
  scaled = logits / jnp.maximum(jnp.reshape(temperature, (-1, 1)), 1e-6)
  probs = jax.nn.softmax(scaled, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  keep_sorted = jnp.cumsum(sorted_p, axis=-1) - sorted_p < jnp.reshape(top_p, (-1, 1))  # keeps the top token
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(b)[:, None], order].set(keep_sorted)
  masked = jnp.where(keep, scaled, -jnp.inf)
  if not per_row:
    return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
  # Each row draws from its own key: vmap gives row i the draw a batch of one with key i makes, wherever the
  # row sits in the batch (one key over [B, V] would make the draw depend on B and on the row's position).
  drawn = jax.vmap(jax.random.categorical)(rng, masked).astype(jnp.int32)
  return jnp.where(temperature <= 0, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


class Engine:
  """Generation and scoring for one LlavaM3 checkpoint.

  params may be sharded (`shard_params`); inputs are small and replicated, XLA partitions the rest. The engine
  holds them with the language model's layers unscanned (`llama.unscan`, done when `params` is set): its decode
  loop reads each layer's weights where they lie instead of copying them out of the stacked arrays every step.
  """

  def __init__(self, config: ModelConfig, params, *, stop_ids: Sequence[int] | None = None, length_step: int = 16,
               device: jax.Device | None = None, prefix_limit: int = 0, prefixes: int = 4):
    self.config = config
    self.device = device  # a replica's device (`on_device`): its random keys are put there
    self.model = llava.LlavaM3(config)
    self._prefix_lock = threading.Lock()  # params and the prefix cache change together (the params setter)
    self.params = params
    self.stop_ids = tuple(stop_ids) if stop_ids is not None else (config.eos_token_id,)
    self.length_step = length_step
    self._visual = jax.jit(self._visual_impl, static_argnames=("scale",))
    self._visual_scales = jax.jit(self._visual_scales_impl, static_argnames=("scales",))
    self._generate = jax.jit(self._generate_impl, static_argnames=("max_new", "greedy", "per_row", "stream"))
    self._on_token: Callable[[int, np.ndarray], None] | None = None
    self._stream_lock = threading.Lock()  # one streaming decode at a time: `_on_token` is the engine's
    self._score = jax.jit(self._score_impl)
    self._state = jax.jit(self._state_impl)
    self._prefix = jax.jit(self._prefix_impl)
    self.prefix_limit = prefix_limit  # the longest prefix taken from the prefix cache, in tokens (0: none)
    self.prefixes = prefixes  # how many prefixes' keys and values are kept

  def on_device(self, device) -> "Engine":
    """This engine with a copy of its params on `device`: a data-parallel replica (`replicas`)."""
    return Engine(self.config, jax.device_put(self.params, device), stop_ids=self.stop_ids,
                  length_step=self.length_step, device=device, prefix_limit=self.prefix_limit,
                  prefixes=self.prefixes)

  @property
  def params(self):
    """The checkpoint's params, with params["llm"]["layers"] a tuple of per-layer trees (`llama.unscan`)."""
    return self._params

  @params.setter
  def params(self, params):
    """Takes stacked or unscanned params; None frees them (training's evaluation sets them per evaluation)."""
    # Prefixes are made with the params they are kept with: new params start an empty prefix cache.
    with self._prefix_lock:
      self._params = None if params is None else {**params, "llm": llama.unscan(params["llm"])}
      self._prefix_cache: collections.OrderedDict[tuple[int, ...], tuple[dict, ...]] = collections.OrderedDict()

  # ---------------------------------------------------------------------------------------------- vision
  def _visual_impl(self, params, pixels, scale: int):
    m = self.model
    feats = m.apply({"params": params}, pixels, method=m.encode)
    return m.apply({"params": params}, feats, scale, method=m.image_embeds)

  def visual_tokens(self, pixels: np.ndarray, scales: int | Sequence[int], batch_size: int = 16) -> list[np.ndarray]:
    """float32[B, H, W, 3] (CLIP-normalised) -> per sample float[scale_b, D], grouped by scale for the encoder."""
    b = len(pixels)
    scales = [scales] * b if isinstance(scales, (int, np.integer)) else list(scales)
    if len(scales) != b:
      raise ValueError(f"{len(scales)} scales for {b} images: give one scale, or one per image")
    out: list[np.ndarray | None] = [None] * b
    for scale in sorted(set(scales)):
      self.config.check_scale(int(scale))
      rows = [i for i in range(b) if scales[i] == scale]
      for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        px = np.asarray(pixels)[chunk]
        pad = batch_size - len(chunk) if len(rows) > batch_size else 0  # one shape per scale across chunks
        if pad:
          px = np.concatenate([px, np.zeros((pad, *px.shape[1:]), px.dtype)])
        emb = np.asarray(self._visual(self.params, np.asarray(px), scale=int(scale)))
        for j, i in enumerate(chunk):
          out[i] = emb[j]
    return out

  def _visual_scales_impl(self, params, pixels, scales: tuple[int, ...]):
    m = self.model
    feats = m.apply({"params": params}, pixels, method=m.encode)
    return tuple(m.apply({"params": params}, feats, s, method=m.image_embeds) for s in scales)

  def visual_tokens_scales(self, pixels: np.ndarray, scales: Sequence[int], batch_size: int = 16
                           ) -> dict[int, list[np.ndarray]]:
    """float32[B, H, W, 3] (CLIP-normalised) -> {scale: per sample float[scale, D]} for every scale in `scales`.
    The encoder runs once per `batch_size` images and every scale is pooled from that one output, so a
    several-scale eval pays the vision tower once per image, not once per scale."""
    scales = tuple(sorted({int(s) for s in scales}, reverse=True))
    for scale in scales:
      self.config.check_scale(scale)
    pixels = np.asarray(pixels)
    b = len(pixels)
    out: dict[int, list[np.ndarray]] = {s: [] for s in scales}
    for start in range(0, b, batch_size):
      px = pixels[start:start + batch_size]
      n = len(px)
      pad = batch_size - n if b > batch_size else 0  # one shape across chunks
      if pad:
        px = np.concatenate([px, np.zeros((pad, *px.shape[1:]), px.dtype)])
      for scale, emb in zip(scales, self._visual_scales(self.params, np.asarray(px), scales=scales)):
        emb = np.asarray(emb)
        out[scale].extend(emb[j] for j in range(n))
    return out

  def anyres_tokens_scales(self, crops: np.ndarray, image_hw: tuple[int, int], scales: Sequence[int],
                           grid: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """`anyres_tokens` at every scale in `scales` from one pass of the encoder over the crops: {scale: float[n, D]}."""
    scales = tuple(sorted({int(s) for s in scales}, reverse=True))
    per_crop = self._visual_scales(self.params, np.asarray(crops), scales=scales)
    out = {}
    for scale, emb in zip(scales, per_crop):
      idx = anyres.pack_indices(self.config, image_hw, scale, grid, n_crops=int(crops.shape[0]))
      out[scale] = np.asarray(anyres.anyres_embeds(emb[None], self.params["image_newline"], idx[None])[0])
    return out

  def anyres_tokens(self, crops: np.ndarray, image_hw: tuple[int, int], scale: int,
                    grid: tuple[int, int] | None = None) -> np.ndarray:
    """LLaVA-NeXT: one image's crops float32[C, H, W, 3] (base first, `m3_jax.data.anyres.anyres_crops`) ->
    float[n, D], every crop pooled to `scale` tokens ("tokens per grid"), unpadded, a newline per row."""
    idx = anyres.pack_indices(self.config, image_hw, int(scale), grid, n_crops=int(crops.shape[0]))
    per_crop = self._visual(self.params, np.asarray(crops), scale=int(scale))
    return np.asarray(anyres.anyres_embeds(per_crop[None], self.params["image_newline"], idx[None])[0])

  # -------------------------------------------------------------------------------------------- batching
  def check_context(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None], max_new: int = 0):
    """Each sequence (its visual tokens in place of its placeholder) plus `max_new` tokens to generate must fit the
    model's context (model.llm.max_len): past it the answer is garbage, so it is an InputTooLong naming the lengths."""
    limit = self.config.llm.max_len
    for i, (s, v) in enumerate(zip(prompts, visual)):
      text, n_visual = len(s) - (v is not None), 0 if v is None else len(v)
      if text + n_visual + max_new > limit:
        raise InputTooLong(f"prompt {i} of the batch is {text + n_visual} tokens ({text} text + {n_visual} visual) "
                           f"+ {max_new} to generate = {text + n_visual + max_new}, over the model's context of "
                           f"{limit} tokens (model.llm.max_len); shorten the prompt, lower --max-new-tokens or use a "
                           "smaller scale")

  def _pack(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None], side: str,
            extra: Sequence[np.ndarray] | None = None, skip: int = 0):
    """Pads prompts (+ optional continuations), less their first `skip` tokens (a cached prefix), to a bucketed
    length on `side` and visual tokens to a bucket."""
    c = self.config
    if len(visual) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(visual)} visual-token entries (None for text-only)")
    seqs = [np.asarray(p, np.int32) for p in prompts]
    if extra is not None:
      seqs = [np.concatenate([p, np.asarray(e, np.int32)]) for p, e in zip(seqs, extra)]
    llava.check_placeholders(seqs, [int(v is not None) for v in visual], c.image_token_id)
    self.check_context(seqs, visual)
    seqs = [s[skip:] for s in seqs]
    t = bucket(max(len(s) for s in seqs), self.length_step)
    n_vis = np.array([0 if v is None else len(v) for v in visual], np.int32)
    n = bucket(max(int(n_vis.max()), 1), self.length_step) if n_vis.max() > 1 else 1
    b = len(seqs)
    ids = np.full((b, t), c.pad_token_id, np.int32)
    mask = np.zeros((b, t), bool)
    for i, s in enumerate(seqs):
      sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
      ids[i, sl], mask[i, sl] = s, True
    img = np.zeros((b, n, c.llm.width), np.float32)
    for i, v in enumerate(visual):
      if v is not None:
        img[i, :len(v)] = np.asarray(v, np.float32)
    return ids, mask, img, n_vis

  def _inputs(self, params, ids, mask, img, n_vis, side: str, labels=None):
    """Embeddings, mask, positions (and labels) of the expanded sequence [B, L]."""
    c, m = self.config, self.model
    n = img.shape[1]
    ex = llava.expand_image_placeholders(ids, mask, n, c.image_token_id, labels=labels, pad_side=side)
    text = m.apply({"params": params}, ids, method=m.embed_text)
    x = llava.merge_embeddings(text, img.astype(text.dtype), ex.source)
    # Visual slots past a sample's own count are padding.
    valid = ex.mask & ~(ex.is_image & (ex.source - ids.shape[1] >= n_vis[:, None]))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    return x, valid, positions, ex.labels

  # ------------------------------------------------------------------------------------------ generation
  def _prefill(self, params, ids, mask, img, n_vis, room: int, prefix=None):
    """A left-padded prompt batch into a fresh KV cache of P + L slots + `room` -> (cache, kv_mask bool[B, P + L +
    room] (the valid slots), next position int32[B], last logits float32[B, V]). prefix: the keys and values of P
    tokens every prompt starts with (`_prefix_impl`), which the prompts here follow; None for P = 0."""
    m = self.model
    x, valid, positions, _ = self._inputs(params, ids, mask, img, n_vis, "left")
    b, length = valid.shape
    p = 0 if prefix is None else prefix[0]["v"].shape[2]
    cache = llama.init_cache(self.config.llm, b, p + length + room, x.dtype)
    kv_mask = jnp.zeros((b, p + length + room), bool).at[:, p:p + length].set(valid)
    if p:
      cache = llama.map_cache(lambda c, pre, axis: jax.lax.dynamic_update_slice_in_dim(
          c, jnp.broadcast_to(pre, (b, *pre.shape[1:])).astype(c.dtype), 0, axis), cache, prefix)
      kv_mask, positions = kv_mask.at[:, :p].set(True), positions + p
    hidden, cache = m.apply({"params": params}, x, positions, kv_mask, cache, p, method=m.decode)
    return cache, kv_mask, positions[:, -1] + 1, m.apply({"params": params}, hidden[:, -1], method=m.logits)

  def _prefix_impl(self, params, ids):
    """int32[1, P] prompt tokens -> their keys and values, a KV cache of P slots (`llama.init_cache`)."""
    m, p = self.model, ids.shape[1]
    x = m.apply({"params": params}, ids, method=m.embed_text)
    cache = llama.init_cache(self.config.llm, 1, p, x.dtype)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    return m.apply({"params": params}, x, positions, jnp.ones((1, p), bool), cache, 0, method=m.decode)[1]

  def cached_prefix(self, ids: np.ndarray) -> tuple[dict, ...]:
    """The keys and values of prompt tokens `ids` (a prefix), from the engine's prefix cache or made now."""
    key = tuple(int(i) for i in ids)
    with self._prefix_lock:
      params, cache = self._params, self._prefix_cache
      if key in cache:
        cache.move_to_end(key)
        return cache[key]
    ids = np.asarray(ids, np.int32)[None]
    prefix = self._prefix(params, ids if self.device is None else jax.device_put(ids, self.device))
    with self._prefix_lock:
      cache[key] = prefix   # (into the cache of the params it was made with: dropped with them if they changed)
      while len(cache) > self.prefixes:
        cache.popitem(last=False)
    return prefix

  def _decode_step(self, params, tok, pos, kv_mask, cache, index):
    """Tokens int32[B] at positions int32[B], written at cache slot `index` -> (next logits float32[B, V], cache)."""
    m = self.model
    emb = m.apply({"params": params}, tok[:, None], method=m.embed_text)
    hidden, cache = m.apply({"params": params}, emb, pos[:, None], kv_mask, cache, index, method=m.decode)
    return m.apply({"params": params}, hidden[:, 0], method=m.logits), cache

  def _generate_impl(self, params, prefix, ids, mask, img, n_vis, rng, temperature, top_p, limit, *, max_new: int,
                     greedy: bool, per_row: bool = False, stream: bool = False):
    """Up to `limit` (int32, <= max_new) new tokens -> int32[B, max_new] (pad past them and past a row's stop).
    per_row: rng key[B], temperature float32[B], top_p float32[B] (one per row; temperature <= 0 is greedy)
    instead of one key and scalars; stream: each step's tokens int32[B] go to `_on_token` as they are picked;
    prefix: see `_prefill`."""
    cache, kv_mask, next_pos, logits = self._prefill(params, ids, mask, img, n_vis, max_new, prefix)
    b, length = ids.shape[0], kv_mask.shape[1] - max_new
    stop = jnp.asarray(self.stop_ids, jnp.int32)
    pad = self.config.pad_token_id

    def cond(state):
      step, _, _, _, _, done, _, _ = state
      return (step < limit) & ~jnp.all(done)

    def body(state):
      step, logits, cache, kv_mask, pos, done, out, rng = state
      if per_row:
        keys = jax.vmap(jax.random.split)(rng)
        rng, sub = keys[:, 0], keys[:, 1]
      else:
        rng, sub = jax.random.split(rng)
      tok = jnp.where(done, pad, pick(logits, sub, temperature, top_p, greedy=greedy, per_row=per_row))
      out = out.at[:, step].set(tok)
      if stream:
        io_callback(self._emit, None, step, tok, ordered=True)
      done = done | jnp.isin(tok, stop)
      kv_mask = kv_mask.at[:, length + step].set(True)
      logits, cache = self._decode_step(params, tok, pos, kv_mask, cache, length + step)
      return step + 1, logits, cache, kv_mask, pos + 1, done, out, rng

    out = jnp.full((b, max_new), pad, jnp.int32)
    state = (jnp.int32(0), logits, cache, kv_mask, next_pos, jnp.zeros((b,), bool), out, rng)
    return jax.lax.while_loop(cond, body, state)[6]

  def generate(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None],
               sampling: Sampling = Sampling()) -> list[list[int]]:
    """Prompt ids (one placeholder where a sample has visual tokens) + per-sample visual tokens float[n_b, D]
    (or None for text-only) -> generated ids per sample, up to and excluding the first stop token."""
    self.check_context(prompts, visual, int(sampling.max_new_tokens))
    return self._run(prompts, visual, jax.random.key(sampling.seed), np.float32(sampling.temperature),
                     np.float32(sampling.top_p), max_new=int(sampling.max_new_tokens),
                     greedy=sampling.temperature <= 0)

  def generate_rows(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None], max_new_tokens: int,
                    temperature: Sequence[float], top_p: Sequence[float], seeds: Sequence[int],
                    on_token: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
    """`generate` with a temperature, top_p and seed per row (a server's requests): each row samples from its
    own key, so row i's tokens equal `generate([prompts[i]], [visual[i]], Sampling(max_new_tokens, temperature[i],
    top_p[i], seeds[i]))` whatever it is batched with. Only the prompts are checked against the context here: a
    server checks each request's own max_tokens (serve.chat.check_context), up to the batch's largest.
    `on_token(step, int32[B])`, when given, is called from inside the decode loop with every step's tokens as they
    are picked (pad once a row has stopped)."""
    n = len(prompts)
    rows = power_of_two(n)
    fill = rows - n  # the padding rows _run adds: greedy
    keys = row_keys(list(seeds) + [0] * fill)
    temps = np.asarray(list(temperature) + [0.0] * fill, np.float32)
    tops = np.asarray(list(top_p) + [1.0] * fill, np.float32)
    greedy = all(t <= 0 for t in temperature)
    if on_token is None:
      return self._run(prompts, visual, keys, temps, tops, max_new=int(max_new_tokens), greedy=greedy, per_row=True)
    with self._stream_lock:
      self._on_token = lambda step, tok: on_token(step, tok[:n])
      try:
        return self._run(prompts, visual, keys, temps, tops, max_new=int(max_new_tokens), greedy=greedy,
                         per_row=True, stream=True)
      finally:
        self._on_token = None

  def pad_rows(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None]) -> tuple[list, list]:
    """The batch padded to a power of two with 1-token text rows, so batch sizes share a few compilations."""
    fill = power_of_two(len(prompts)) - len(prompts)
    return (list(prompts) + [np.array([self.config.bos_token_id], np.int32)] * fill,
            list(visual) + [None] * fill)

  def _emit(self, step, tok):
    self._on_token(int(step), np.asarray(tok))

  def _run(self, prompts, visual, rng, temperature, top_p, *, max_new: int, **static) -> list[list[int]]:
    if max_new < 0:
      raise ValueError(f"max_new_tokens {max_new}: expected >= 0")
    n = len(prompts)
    seqs = [np.asarray(s, np.int32) for s in prompts]
    p = (shared_prefix(seqs, visual, self.config.image_token_id, self.length_step, self.prefix_limit)
         if self.prefix_limit and self.prefixes and n else 0)
    prefix = self.cached_prefix(seqs[0][:p]) if p else None
    seqs, visual = self.pad_rows(seqs, visual)
    seqs[n:] = [np.concatenate([seqs[0][:p], s]) for s in seqs[n:]]  # padding rows take the prefix too
    ids, mask, img, n_vis = self._pack(seqs, visual, "left", skip=p)
    if self.device is not None:  # (host arrays go straight to the params' device; keys are made on the default one)
      rng = jax.device_put(rng, self.device)
    out = self._generate(self.params, prefix, np.asarray(ids), np.asarray(mask), np.asarray(img), np.asarray(n_vis),
                         rng, temperature, top_p, np.int32(max_new), max_new=new_tokens_bucket(max_new), **static)
    results = []
    for row in np.asarray(out)[:n, :max_new].tolist():
      cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
      results.append(row[:cut])
    return results

  # ------------------------------------------------------------------------------------------ prompt state
  def _state_impl(self, params, ids, mask, img, n_vis):
    m = self.model
    x, valid, positions, _ = self._inputs(params, ids, mask, img, n_vis, "left")
    hidden, _ = m.apply({"params": params}, x, positions, valid, method=m.decode)
    return hidden[:, -1].astype(jnp.float32)

  def prompt_state(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None]) -> np.ndarray:
    """The decoder's final hidden state at each prompt's last token, float32[B, D]: what the first answer token
    is predicted from, after one prefill (the scale router's feature). Left-padded as in generation, so padding
    rows and slots are masked out and a row's state does not depend on its batch."""
    n = len(prompts)
    ids, mask, img, n_vis = self._pack(*self.pad_rows(prompts, visual), "left")  # as in generation
    out = self._state(self.params, np.asarray(ids), np.asarray(mask), np.asarray(img), np.asarray(n_vis))
    return np.asarray(out)[:n]

  # ----------------------------------------------------------------------------------------------- scoring
  def _score_impl(self, params, ids, mask, labels, img, n_vis):
    m = self.model
    x, valid, positions, labels = self._inputs(params, ids, mask, img, n_vis, "right", labels)
    hidden, _ = m.apply({"params": params}, x, positions, valid, method=m.decode)
    logits = m.apply({"params": params}, hidden[:, :-1], method=m.logits)
    targets = labels[:, 1:]
    ok = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    gold = jnp.take_along_axis(logp, jnp.where(ok, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(ok, gold, 0.0), axis=1), jnp.sum(ok, axis=1)

  def loglikelihood(self, prompts: Sequence[np.ndarray], continuations: Sequence[np.ndarray],
                    visual: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p(continuation | prompt, image) per sample, and the continuation's token count."""
    ids, mask, img, n_vis = self._pack(prompts, visual, "right", extra=continuations)
    labels = np.full_like(ids, IGNORE)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
      labels[i, len(p):len(p) + len(c)] = c
    total, count = self._score(self.params, np.asarray(ids), np.asarray(mask), np.asarray(labels),
                               np.asarray(img), np.asarray(n_vis))
    return np.asarray(total), np.asarray(count)


def replicas(engine: Engine, n: int) -> list[Engine]:
  """`engine` and n - 1 copies of it on the next devices of `jax.devices()` (data parallelism for `m3 serve
  --data-parallel`: a batch's rows are split between them and run concurrently). `engine`'s params must lie on
  the first device (a loaded checkpoint's do)."""
  devices = jax.devices()
  if n < 1 or n > len(devices):
    raise ValueError(f"{n} data-parallel replicas: expected 1 to {len(devices)}, the {devices[0].platform} devices "
                     "this process has (on CPU, JAX makes as many as asked for before it starts: "
                     "jax.config.update('jax_num_cpu_devices', N))")
  return [engine] + [engine.on_device(d) for d in devices[1:n]]


def shard_params(params, config: ModelConfig, mesh, rules):
  """Lays params out on `mesh` with the training rules (logical axis names -> mesh axes)."""
  shardings = sharding.logical_shardings(llava.abstract_params(config), mesh, rules)
  return jax.device_put(params, shardings)
