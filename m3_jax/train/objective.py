"""The M3 objective (paper Eq. 3.2): the mean over scales of each scale's token-averaged cross-entropy.

    L = 1/M * sum_{i=1..M} CE(X_a | X_{S_i}, X_q)

Cost structure (DESIGN.md "Training design"):
- The vision encoder and projector run once per step; every scale pools from that one output.
- The vocabulary projection runs only at labelled positions: each row's positions whose next token carries a
  label are gathered (at most P per row, a static bound: `label_budget`) before `model.logits`; visual and
  prompt tokens never reach the [.., V] matmul. The trainer picks P per batch as the next power of two above
  the batch's most labelled row (`label_budget`), so logits cost ~ labelled tokens, with a few compilations.
- Two implementations of the sum over scales, which agree to float tolerance:
    loop: a Python loop, each scale's decoder pass at its own length T + scale - 1 (exact FLOPs);
    vmap: every scale's visual tokens padded to the largest scale (padding masked out of attention and of the
          RoPE positions, so the numbers are the loop's) and `jax.vmap` over the scale axis.
- `scale_sampling="random"` draws one scale per step (`jax.lax.switch`: only that scale's decoder runs). The paper
  (Table 8) draws per sample; per step is the same objective in expectation at 1/M of the decoder cost.

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

SCALE_LOSSES = ("loop", "vmap")   # train.scale_loss: the two implementations of the sum over scales


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

  def _apply(self, params, *args, method, **kw):
    return self.model.apply({"params": params}, *args, method=method, **kw)

  def encode(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """Runs once per step: -> (feats float[B, N, C], text embeddings float[B, T, D])."""
    feats = self._apply(params, batch["pixels"], method=llava.LlavaM3.encode)
    text = self._apply(params, batch["input_ids"], method=llava.LlavaM3.embed_text)
    return feats, text

  def _budget(self, batch, label_budget: int | None) -> int:
    return int(label_budget or self.max_label_tokens or batch["input_ids"].shape[1])

  def scale_ce(self, params, batch, feats, text, scale: int, label_budget: int | None = None) -> jax.Array:
    """Summed CE at one scale, its decoder pass at its own length T + scale - 1."""
    c = self.config
    img = self._apply(params, feats, scale, method=llava.LlavaM3.image_embeds)
    ex = llava.expand_image_placeholders(batch["input_ids"], batch["attention_mask"], scale, c.image_token_id,
                                         labels=batch["labels"])
    x = llava.merge_embeddings(text, img, ex.source)
    hidden, _ = self._apply(params, x, ex.positions, ex.mask, method=llava.LlavaM3.decode)
    h, t = gather_labelled(hidden, targets_of(ex.labels), self._budget(batch, label_budget))
    return cross_entropy_sum(self._apply(params, h, method=llava.LlavaM3.logits), t)

  def all_scales_ce(self, params, batch, label_budget: int | None = None) -> jax.Array:
    """float32[M]: summed CE per configured scale. `label_budget` (static): labelled positions kept per row
    (default: `max_label_tokens`, else the text length)."""
    feats, text = self.encode(params, batch)
    if self.impl == "loop":
      return jnp.stack([self.scale_ce(params, batch, feats, text, s, label_budget) for s in self.scales])
    return self._vmapped_ce(params, batch, feats, text, label_budget)

  def one_scale_ce(self, params, batch, index: jax.Array, label_budget: int | None = None) -> jax.Array:
    """float32[M] with only entry `index` (a traced int) filled: one scale drawn for this step."""
    feats, text = self.encode(params, batch)
    m = len(self.scales)

    def branch(i):
      return lambda: jax.nn.one_hot(i, m, dtype=jnp.float32) * self.scale_ce(params, batch, feats, text,
                                                                               self.scales[i], label_budget)
    return jax.lax.switch(index, [branch(i) for i in range(m)])

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
