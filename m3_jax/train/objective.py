"""The M3 objective (paper Eq. 3.2): the mean over scales of each scale's token-averaged cross-entropy.

    L = 1/M * sum_{i=1..M} CE(X_a | X_{S_i}, X_q)

Cost structure (docs/design.md, "Data flow"):
- The vision encoder and projector run once per step; every scale pools from that one output.
- The vocabulary projection runs only at labelled positions: each row's positions whose next token carries a
  label are gathered (at most P per row, a static bound: `label_budget`) before `model.logits`; visual and
  prompt tokens never reach the [.., V] matmul. The trainer picks P per batch as the next power of two above
  the batch's most labelled row (`label_budget`), so logits cost ~ labelled tokens, with a few compilations.
- Two implementations of the sum over scales, which agree to float tolerance:
    loop: a Python loop, each scale's decoder pass at its own length T + scale - 1 (exact FLOPs);
    vmap: every scale's visual tokens padded to the largest scale (padding masked out of attention and of the
          RoPE positions, so the numbers are the loop's) and `jax.vmap` over the scale axis.
    packed: the largest scale's pass alone; the coarser scales' sequences end to end in one decoder pass with a
          block-diagonal mask and per-segment positions (bigger matmuls; attention over the packed length).
- `scale_sampling="random"` draws one scale per step (`jax.lax.switch`: only that scale's decoder runs).
- `scale_sampling="random_per_sample"` (paper Table 8) gives each sample one scale: the batch is split by a random
  permutation into M fixed-size groups of B/M rows, group i is decoded at scale i only (`per_sample_ce`), so the
  decoder processes sum_i B/M * (T + n_i - 1) positions: the mean single-scale step, not M passes with masking.
  Every sample's scale is uniform over the M (stratified: exactly B/M per scale), so the expectation over draws
  of sum_b CE_{s_b}(b) / num_targets is the `all` loss; `per_sample_ce` returns M * a group's CE (an unbiased
  estimate of that scale's whole-batch CE), which `m3_loss` then averages.

LLaVA-NeXT batches (`pixels` float32[B, C, S, S, 3]: each row's base crop, its grid crops, then padding crops up to
the batch's crop bucket C; `anyres_index_{scale}` int32[B, N_scale] per trained scale, `data.anyres.training_index`:
padding -1 first, then the image's packing plan): every crop is encoded once (B*C crops), each scale pools each
crop from that output and packs it with `models.anyres.anyres_embeds`, the packing inference uses. The N_scale
slots of the placeholder hold the padding first (masked out of attention and RoPE positions), so the last visual
token precedes the text as at inference. NeXT takes the `loop` implementation.

The cross-entropy is summed here and divided by `num_targets`, the labelled-token count of the whole global batch
(the caller passes it), so k micro-batches of b accumulate exactly to one batch of k*b. Every scale sees the same
labelled tokens (visual tokens carry no labels), so one count serves all scales.

Shapes: B batch, T text length, N encoder tokens, S a scale, P the label budget, D width, V vocabulary.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from m3_jax.labels import IGNORE
from m3_jax.models import llava
from m3_jax.models.anyres import anyres_embeds

SCALE_LOSSES = ("loop", "vmap", "packed")   # train.scale_loss: the implementations of the sum over scales


def index_key(scale: int) -> str:
  """The batch key of a NeXT batch's packing plan at `scale`."""
  return f"anyres_index_{int(scale)}"


def targets_of(labels: jax.Array) -> jax.Array:
  """int32[B, L] labels aligned with the inputs -> int32[B, L] next-token targets (position t predicts t + 1)."""
  return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def count_targets(batch: dict, image_token_id: int) -> jax.Array:
  """Labelled next-token targets in `batch` (int32 scalar); the same at every scale."""
  ex = llava.expand_image_placeholders(batch["input_ids"], batch["attention_mask"], 1, image_token_id,
                                       labels=batch["labels"])
  return jnp.sum(targets_of(ex.labels) != IGNORE).astype(jnp.int32)


def gather_labelled(hidden: jax.Array, targets: jax.Array, max_label_tokens: int):
  """hidden float[B, L, D], targets int32[B, L] -> (float[B, P, D], int32[B, P]) for the first P labelled positions
  of each row (padding slots get target IGNORE). Rows with more than P labelled positions must be caught on the
  host before the step (`check_label_budget`)."""
  p = min(int(max_label_tokens), targets.shape[1])
  labelled = targets != IGNORE
  # A stable sort puts each row's labelled positions first, in order.
  order = jnp.argsort(~labelled, axis=1, stable=True)[:, :p]
  picked = jnp.take_along_axis(targets, order, axis=1)
  return jnp.take_along_axis(hidden, order[:, :, None], axis=1), picked


def cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32[..., V], int32[...] -> the summed cross-entropy over positions whose target is not IGNORE."""
  valid = targets != IGNORE
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, logz - gold, 0.0))


class Objective:
  """Computes the per-scale summed cross-entropy of a batch for a LlavaM3 `model` at static `scales`."""

  def __init__(self, model: llava.LlavaM3, scales: Sequence[int], impl: str = "loop", max_label_tokens: int = 0):
    if impl not in SCALE_LOSSES:
      raise ValueError(f"train.scale_loss={impl!r}: expected one of {', '.join(SCALE_LOSSES)}")
    self.model = model
    self.config = model.config
    self.scales = tuple(self.config.check_scale(s) for s in scales)
    self.impl = impl
    self.max_label_tokens = int(max_label_tokens)
    self.anyres = self.config.type == "llava_next"
    if self.anyres and impl != "loop":
      raise ValueError(f"train.scale_loss={impl!r}: LLaVA-NeXT trains with 'loop' (each scale's packed length "
                       "differs per image)")

  def _apply(self, params, *args, method, **kw):
    return self.model.apply({"params": params}, *args, method=method, **kw)

  def encode(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """Runs once per step: -> (feats float[B, N, C] (NeXT: float[B, C_crops, N, C], every crop), text embeddings
    float[B, T, D])."""
    pixels = batch["pixels"]
    if self.anyres:
      b, c = pixels.shape[:2]
      feats = self._apply(params, pixels.reshape(b * c, *pixels.shape[2:]), method=llava.LlavaM3.encode)
      feats = feats.reshape(b, c, *feats.shape[1:])
    else:
      feats = self._apply(params, pixels, method=llava.LlavaM3.encode)
    text = self._apply(params, batch["input_ids"], method=llava.LlavaM3.embed_text)
    return feats, text

  def _budget(self, batch, label_budget: int | None) -> int:
    return int(label_budget or self.max_label_tokens or batch["input_ids"].shape[1])

  def visual(self, params, batch, feats, scale: int) -> tuple[jax.Array, jax.Array | None]:
    """A scale's visual tokens of each row -> (float[B, n, D], bool[B, n] real slots, or None when all are).
    LLaVA-1.5: n = scale. NeXT: every crop pooled to `scale`, packed by `anyres_embeds` (n = N_scale)."""
    if not self.anyres:
      return self._apply(params, feats, scale, method=llava.LlavaM3.image_embeds), None
    b, c = feats.shape[:2]
    per_crop = self._apply(params, feats.reshape(b * c, *feats.shape[2:]), scale, method=llava.LlavaM3.image_embeds)
    index = batch[index_key(scale)]
    img = anyres_embeds(per_crop.reshape(b, c, scale, -1), params["image_newline"], jnp.maximum(index, 0))
    return img, index >= 0

  def scale_ce(self, params, batch, feats, text, scale: int, label_budget: int | None = None) -> jax.Array:
    """Summed CE at one scale, its decoder pass at its own length T + n - 1 (n: the scale's visual slots)."""
    c = self.config
    img, real = self.visual(params, batch, feats, scale)
    ex = llava.expand_image_placeholders(batch["input_ids"], batch["attention_mask"], img.shape[1],
                                         c.image_token_id, labels=batch["labels"])
    x = llava.merge_embeddings(text, img, ex.source)
    mask, positions = ex.mask, ex.positions
    if real is not None:  # padding slots of the packed image: out of attention and of the RoPE positions
      t_len = batch["input_ids"].shape[1]
      slot = jnp.clip(ex.source - t_len, 0, img.shape[1] - 1)
      mask = mask & ~(ex.is_image & ~jnp.take_along_axis(real, slot, axis=1))
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    hidden, _ = self._apply(params, x, positions, mask, method=llava.LlavaM3.decode)
    h, t = gather_labelled(hidden, targets_of(ex.labels), self._budget(batch, label_budget))
    return cross_entropy_sum(self._apply(params, h, method=llava.LlavaM3.logits), t)

  def all_scales_ce(self, params, batch, label_budget: int | None = None) -> jax.Array:
    """float32[M]: summed CE per configured scale. `label_budget` (static): labelled positions kept per row
    (default: `max_label_tokens`, else the text length)."""
    feats, text = self.encode(params, batch)
    if self.impl == "loop":
      return jnp.stack([self.scale_ce(params, batch, feats, text, s, label_budget) for s in self.scales])
    if self.impl == "packed":
      return self._packed_ce(params, batch, feats, text, label_budget)
    return self._vmapped_ce(params, batch, feats, text, label_budget)

  def one_scale_ce(self, params, batch, index: jax.Array, label_budget: int | None = None) -> jax.Array:
    """float32[M] with only entry `index` (a traced int) filled: one scale drawn for this step."""
    feats, text = self.encode(params, batch)
    m = len(self.scales)

    def branch(i):
      return lambda: jax.nn.one_hot(i, m, dtype=jnp.float32) * self.scale_ce(params, batch, feats, text,
                                                                               self.scales[i], label_budget)
    return jax.lax.switch(index, [branch(i) for i in range(m)])

  def per_sample_ce(self, params, batch, groups: jax.Array, label_budget: int | None = None) -> jax.Array:
    """float32[M]: M * the summed CE of group i's rows at scale i (`scale_sampling="random_per_sample"`).
    groups int32[M, B/M]: a partition of the batch's rows (`Curriculum.groups`); group i runs scale i's decoder
    pass alone, on B/M rows."""
    feats, text = self.encode(params, batch)
    m = len(self.scales)
    out = []
    for i, s in enumerate(self.scales):
      rows = groups[i]
      sub = {k: jnp.take(v, rows, axis=0) for k, v in batch.items()}
      out.append(self.scale_ce(params, sub, jnp.take(feats, rows, axis=0), jnp.take(text, rows, axis=0), s,
                               label_budget))
    return m * jnp.stack(out)

  def _packed_ce(self, params, batch, feats, text, label_budget: int | None) -> jax.Array:
    """The largest scale's pass alone (as `loop`); every coarser scale's sequence of a row laid end to end in one
    row of sum_s (T + s - 1) positions, one decoder pass: attention block-diagonal (a segment sees only itself,
    causally) and RoPE positions restarting per segment, so each segment's numbers are its `loop` pass's while the
    matmuls run on all coarse segments' rows at once."""
    c = self.config
    full = max(self.scales)
    coarse = [s for s in self.scales if s != full]
    if not coarse:
      return jnp.stack([self.scale_ce(params, batch, feats, text, full, label_budget)])
    xs, masks, positions, targets = [], [], [], []
    for s in coarse:
      img = self._apply(params, feats, s, method=llava.LlavaM3.image_embeds)
      ex = llava.expand_image_placeholders(batch["input_ids"], batch["attention_mask"], s, c.image_token_id,
                                           labels=batch["labels"])
      xs.append(llava.merge_embeddings(text, img, ex.source))
      masks.append(ex.mask)
      positions.append(ex.positions)
      targets.append(targets_of(ex.labels))
    lengths = [x.shape[1] for x in xs]
    segment = jnp.repeat(jnp.arange(len(coarse)), jnp.asarray(lengths), total_repeat_length=sum(lengths))
    mask = jnp.concatenate(masks, axis=1)
    blocks = (segment[:, None] == segment[None, :])[None] & mask[:, None, :]    # bool[B, L, L]
    hidden, _ = self._apply(params, jnp.concatenate(xs, axis=1), jnp.concatenate(positions, axis=1), blocks,
                            method=llava.LlavaM3.decode)
    budget = self._budget(batch, label_budget)
    hs, ts, start = [], [], 0
    for n, t in zip(lengths, targets):
      h, t = gather_labelled(hidden[:, start:start + n], t, budget)
      hs.append(h)
      ts.append(t)
      start += n
    logits = self._apply(params, jnp.stack(hs), method=llava.LlavaM3.logits)   # [M-1, B, P, V]
    ce = dict(zip(coarse, jax.vmap(cross_entropy_sum)(logits, jnp.stack(ts))))
    ce[full] = self.scale_ce(params, batch, feats, text, full, label_budget)
    return jnp.stack([ce[s] for s in self.scales])

  def _vmapped_ce(self, params, batch, feats, text, label_budget: int | None) -> jax.Array:
    """All scales padded to the largest one, one vmapped decoder pass over the scale axis."""
    c = self.config
    s_max = max(self.scales)
    t_len = batch["input_ids"].shape[1]
    ex = llava.expand_image_placeholders(batch["input_ids"], batch["attention_mask"], s_max, c.image_token_id,
                                         labels=batch["labels"])
    xs, masks = [], []
    for s in self.scales:
      img = self._apply(params, feats, s, method=llava.LlavaM3.image_embeds)
      img = jnp.pad(img, ((0, 0), (0, s_max - s), (0, 0)))
      xs.append(llava.merge_embeddings(text, img, ex.source))
      # Visual slots past this scale's tokens are padding: out of attention and of the RoPE position count.
      masks.append(ex.mask & ~(ex.is_image & (ex.source - t_len >= s)))
    x, mask = jnp.stack(xs), jnp.stack(masks)                               # [M, B, L, D], [M, B, L]
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)

    def decode(x, positions, mask):
      hidden, _ = self._apply(params, x, positions, mask, method=llava.LlavaM3.decode)
      return hidden
    hidden = jax.vmap(decode)(x, positions, mask)                          # [M, B, L, D]
    # Labels sit on text positions, which the padding does not move: one gather plan for every scale.
    targets = targets_of(ex.labels)
    h, t = jax.vmap(gather_labelled, in_axes=(0, None, None))(hidden, targets, self._budget(batch, label_budget))
    logits = self._apply(params, h, method=llava.LlavaM3.logits)          # [M, B, P, V]
    return jax.vmap(cross_entropy_sum, in_axes=(0, None))(logits, t[0])


def label_budget(labels, max_label_tokens: int = 0, minimum: int = 8, worst: int | None = None) -> int:
  """Host-side, before a step: the static number of labelled positions per row to keep (P).

  `max_label_tokens` > 0 fixes P (a row with more labels is an error); 0 picks the next power of two at or above
  the batch's most labelled row (at least `minimum`, at most the text length): few distinct values, so few
  compilations, and the logits cost follows the labelled tokens. On several hosts pass `worst`, the largest
  count over every host's rows, so that all hosts pick the same P (the same program)."""
  import numpy as np
  labels = np.asarray(labels)
  counts = (labels != IGNORE).sum(axis=1)
  worst = max(int(counts.max(initial=0)), int(worst or 0))
  if max_label_tokens:
    if worst > max_label_tokens:
      row = int(counts.argmax())
      raise ValueError(f"batch row {row} has {worst} labelled tokens but train.max_label_tokens={max_label_tokens}: "
                       "logits are computed only at the first max_label_tokens labelled positions of a row; raise "
                       "train.max_label_tokens (0 = chosen per batch, always enough)")
    return int(max_label_tokens)
  return int(min(labels.shape[1], max(minimum, 1 << max(worst - 1, 0).bit_length())))


def m3_loss(ce_per_scale: jax.Array, num_targets: jax.Array, trained: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32[M] summed CE, the global target count, float32[M] 1 for each scale trained this step ->
  (loss = mean over trained scales of the token-averaged CE, per-scale token-averaged CE float32[M])."""
  per_scale = ce_per_scale / jnp.maximum(num_targets, 1).astype(jnp.float32)
  return jnp.sum(per_scale * trained) / jnp.maximum(jnp.sum(trained), 1.0), per_scale


def scales_of(model_scales: Sequence[int], train_scales: Sequence[int]) -> tuple[int, ...]:
  """The scales trained: `train.scales` when set, else the model's chain (largest first)."""
  return tuple(int(s) for s in (train_scales or model_scales))
