"""Continuous batching: requests join and leave a running decode at chunk boundaries (`m3 serve --batching
continuous`).

`Slots` keeps `n` decode rows that share one KV-cache timeline of C slots (`llama.init_cache`). Every row writes
its next token at the same slot `w` (the engine's scalar cache index); a row's own keys are wherever its mask says
(`kv_mask` bool[n, C]), so rows that joined at different times, with prompts of different lengths, attend only to
themselves. A joining request is prefilled with the engine's own program (left-padded, as `generate_rows`), and its
keys are copied to slots [w - T, w) of a free row (w first moves up to T if it is smaller). Decoding runs `chunk`
steps per call for every row; the host reads each row's tokens, stops it at its stop id or length, and frees its
row. Attention reads the whole timeline every step, so it is kept short: the slots no active row uses are dropped
from its front (a shift of every row alike: keys carry their RoPE positions, so attention does not change) and its
length is the smallest power of two that holds w + a chunk (a compiled shape each, at most log2(max_len / 64)).

A row's tokens equal `Engine.generate_rows` of that request alone (its padding and the other rows are masked out of
its attention, and it samples from its own key, split once per step as there).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.eval.generate import Engine, bucket, pick, row_keys
from m3_jax.models import llama

MIN_CAPACITY = 64


class Slots:
  """`n` decode rows over one shared KV-cache timeline; `admit` rows, `run` a chunk of steps, `free` rows."""

  def __init__(self, engine: Engine, n: int, chunk: int = 8):
    self.engine, self.n, self.chunk = engine, n, chunk
    c = engine.config
    self.vocab = c.llm.vocab_size
    # A request alone spans its prompt and visual tokens (<= max_len with its max_tokens, each padded by less than
    # a length step) + its max_tokens + the rest of the chunk it ends in: it always fits.
    self.max_capacity = 1 << (c.llm.max_len + 2 * engine.length_step + chunk - 1).bit_length()
    self.start = np.zeros(n, np.int64)        # each active row's first slot
    self.end = np.zeros(n, np.int64)          # the slot each active row's decode ends by (its max_new + a chunk)
    self.active = np.zeros(n, bool)
    self.temperature = np.zeros(n, np.float32)  # each row's, on the host: a chunk is greedy when all active are
    self._prefill = jax.jit(engine._prefill, static_argnames=("room",))
    self._place = jax.jit(self._place_impl, donate_argnums=(0,))
    self._shift = jax.jit(self._shift_impl, donate_argnums=(0,))
    self._chunk = jax.jit(self._chunk_impl, static_argnames=("steps", "greedy"), donate_argnums=(1,))
    self._reset(MIN_CAPACITY)

  def _reset(self, capacity: int):
    c = self.engine.config
    self.w = 0
    self.state = {
        "cache": llama.init_cache(c.llm, self.n, capacity, jnp.dtype(c.dtype)),  # the prefill's, as generate's
        "kv_mask": jnp.zeros((self.n, capacity), bool),
        "pos": jnp.zeros((self.n,), jnp.int32),
        "logits": jnp.zeros((self.n, self.vocab), jnp.float32),
        "keys": row_keys([0] * self.n),
        "temperature": jnp.zeros((self.n,), jnp.float32),
        "top_p": jnp.ones((self.n,), jnp.float32),
    }

  @property
  def capacity(self) -> int:
    return int(self.state["kv_mask"].shape[1])

  def free_rows(self) -> list[int]:
    return [int(r) for r in np.flatnonzero(~self.active)]

  def prefill_length(self, prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None]) -> int:
    """T: the slots `admit` gives these requests (prompts and visual tokens padded to the engine's buckets)."""
    e = self.engine
    step = e.length_step
    n_vis = max([0 if v is None else len(v) for v in visual] + [1])
    t = max(bucket(len(p), step) for p in prompts)
    return t + (bucket(n_vis, step) if n_vis > 1 else 1) - 1

  def fits(self, t: int, max_new: int) -> bool:
    """Whether requests of prefill length `t` generating up to `max_new` tokens can join now: from the oldest
    active row's first slot to the last slot any row (they included) may decode to stays within the largest
    timeline, whatever the rows do until they end (else they wait for rows to finish). A request alone fits."""
    # As `admit` would place them: after the front shift, the write slot moves up to t if it is below, and the
    # running rows' remaining decode moves with it (all in the coordinates before the shift).
    shift = self._front_shift(0)
    jump = max(0, t - (self.w - shift))
    w = self.w + jump
    first, last = w - t, w + max_new + self.chunk
    if self.active.any():
      first = min(first, int(self.start[self.active].min()))
      last = max(last, int(self.end[self.active].max()) + jump)
    return last - first <= self.max_capacity

  # ------------------------------------------------------------------------------------------- admission
  @staticmethod
  def _place_impl(state, cache, valid, pos, logits, key, temperature, top_p, row, source, start):
    """Copies row `source` of the prefill (`Engine._prefill`: its cache of T slots, valid bool[B, T], next
    position int32[B], logits float32[B, V]) to row `row`, slots [start, start + T) of the timeline."""
    new = dict(state)

    def place(timeline, prefill, slot_axis):
      at = [row, 0, 0, 0]
      at[slot_axis] = start
      return jax.lax.dynamic_update_slice(timeline, jax.lax.dynamic_slice_in_dim(prefill, source, 1, axis=0), at)

    new["cache"] = llama.map_cache(place, state["cache"], cache)
    row_mask = jax.lax.dynamic_update_slice(jnp.zeros((state["kv_mask"].shape[1],), bool), valid[source], (start,))
    new["kv_mask"] = state["kv_mask"].at[row].set(row_mask)
    new["pos"] = state["pos"].at[row].set(pos[source])
    new["logits"] = state["logits"].at[row].set(logits[source])
    new["keys"] = state["keys"].at[row].set(key)
    new["temperature"] = state["temperature"].at[row].set(temperature)
    new["top_p"] = state["top_p"].at[row].set(top_p)
    return new

  def admit(self, rows: Sequence[int], prompts: Sequence[np.ndarray], visual: Sequence[np.ndarray | None],
            temperature: Sequence[float], top_p: Sequence[float], seeds: Sequence[int], max_new: int):
    """Prefills the requests (one engine batch, padded as `generate_rows` pads) and puts request i in row
    rows[i] (a free row), ready to decode its first token; none decodes more than `max_new` tokens (the caller
    checked `fits`)."""
    e = self.engine
    if not self.active.any():  # idle: start a fresh, short timeline
      self._reset(MIN_CAPACITY)
    ids, mask, img, n_vis = e._pack(*e.pad_rows(prompts, visual), "left")
    cache, valid, pos, logits = self._prefill(e.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(img),
                                              jnp.asarray(n_vis), room=0)
    t = ids.shape[1] + img.shape[1] - 1
    self._fit(0)                       # drop unused front slots first: the joiners are placed after it
    jump = max(0, t - self.w)          # the joiners' prompts end at the shared write slot, so it moves up to t;
    self.w += jump                     # the running rows' remaining decode (their ends) moves with it
    self.end[self.active] += jump
    self._fit(0, shift=False)          # room up to w, without moving w below t
    assert self.w >= t, (self.w, t)
    keys = row_keys(seeds)
    for i, row in enumerate(rows):
      self.state = self._place(self.state, cache, valid, pos, logits, keys[i],
                               jnp.float32(temperature[i]), jnp.float32(top_p[i]), row, i, self.w - t)
      self.active[row], self.start[row], self.end[row] = True, self.w - t, self.w + max_new + self.chunk
      self.temperature[row] = temperature[i]

  def free(self, row: int):
    self.active[row] = False

  # ---------------------------------------------------------------------------------------------- decoding
  @staticmethod
  def _shift_impl(state, by):
    """Drops the first `by` slots of the timeline (every row alike); the freed tail is masked out."""
    new = dict(state)
    c = state["kv_mask"].shape[1]
    new["cache"] = llama.map_cache(lambda a, axis: jnp.roll(a, -by, axis=axis), state["cache"])
    new["kv_mask"] = jnp.roll(state["kv_mask"], -by, axis=1) & (jnp.arange(c) < c - by)[None]
    return new

  def _resize(self, capacity: int):
    """Pads or cuts the timeline to `capacity` slots (cut only past w, where no row has keys)."""
    s = dict(self.state)
    if capacity > self.capacity:
      more = capacity - self.capacity
      s["cache"] = llama.map_cache(
          lambda a, axis: jnp.pad(a, [(0, more if i == axis else 0) for i in range(a.ndim)]), s["cache"])
      s["kv_mask"] = jnp.pad(s["kv_mask"], ((0, 0), (0, capacity - self.capacity)))
    else:
      s["cache"] = llama.map_cache(lambda a, axis: jax.lax.slice_in_dim(a, 0, capacity, axis=axis), s["cache"])
      s["kv_mask"] = s["kv_mask"][:, :capacity]
    self.state = s

  def _front_shift(self, steps: int) -> int:
    """The front slots `_fit(steps)` drops: those before every active row's first, once they are a quarter of the
    timeline or room is needed; else 0."""
    first = int(self.start[self.active].min()) if self.active.any() else 0
    return first if first > 0 and (self.w + steps > self.capacity or 4 * first >= self.capacity) else 0

  def _fit(self, steps: int, shift: bool = True):
    """Keeps the timeline short (attention reads all of it every step): drops the front slots no active row uses
    once they are a quarter of it or room is needed, then takes the smallest power-of-two length >= w + steps."""
    first = self._front_shift(steps) if shift else 0
    if first:
      self.state = self._shift(self.state, jnp.int32(first))
      self.start[self.active] -= first
      self.end[self.active] -= first
      self.w -= first
    capacity = max(MIN_CAPACITY, 1 << (self.w + steps - 1).bit_length())
    if capacity > self.max_capacity:
      raise ValueError(f"the decode timeline needs {self.w + steps} slots, over the model's context "
                       f"({self.engine.config.llm.max_len})")
    if capacity != self.capacity:
      self._resize(capacity)

  def _chunk_impl(self, params, state, w, *, steps: int, greedy: bool):
    def body(i, carry):
      state, out = carry
      keys = jax.vmap(jax.random.split)(state["keys"])
      keys, sub = keys[:, 0], keys[:, 1]
      tok = pick(state["logits"], sub, state["temperature"], state["top_p"], greedy=greedy, per_row=True)
      out = out.at[:, i].set(tok)
      kv_mask = state["kv_mask"].at[:, w + i].set(True)
      logits, cache = self.engine._decode_step(params, tok, state["pos"], kv_mask, state["cache"], w + i)
      state = dict(state, cache=cache, kv_mask=kv_mask, pos=state["pos"] + 1, logits=logits, keys=keys)
      return state, out

    out = jnp.zeros((self.n, steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (state, out))

  def run(self, steps: int | None = None) -> np.ndarray:
    """Decodes `steps` (default: chunk) tokens for every row -> int32[n, steps] (rows not active: garbage)."""
    steps = steps or self.chunk
    self._fit(steps)
    greedy = bool(np.all(self.temperature[self.active] <= 0))
    self.state, out = self._chunk(self.engine.params, self.state, jnp.int32(self.w), steps=steps, greedy=greedy)
    self.w += steps
    return np.asarray(out)
