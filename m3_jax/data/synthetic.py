"""A synthetic, checkpointable batch source in the data pipeline's format (`data.source="synthetic"`).

For tests and benchmarks that need batches without building a dataset. Batch `i` is a pure function of
(seed, i), so a resumed run, or a run split over several processes, sees exactly the same global batches.
Each image is a flat colour (one of 8) plus noise, and the answer is the colour's token: learnable at any scale.

Format (as m3_jax.data.pipeline): input_ids int32[B, T] = BOS, placeholder, prompt..., answer, EOS, pad...;
labels int32[B, T] (answer and EOS, else -100); attention_mask int32[B, T]; pixels float32[B, H, W, 3];
has_image bool[B].
"""
from __future__ import annotations

import jax
import numpy as np

from m3_jax.labels import IGNORE
NUM_COLOURS = 8


class SyntheticBatches:
  """Iterator of host-local batches: this process's `batch_size // process_count` rows of each global batch."""

  def __init__(self, *, batch_size: int, seq_len: int, image_size: int, vocab_size: int, image_token_id: int,
               bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 3, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size % self.process_count:
      raise ValueError(f"batch size {batch_size} does not split over {self.process_count} processes")
    if seq_len < 8:
      raise ValueError(f"seq_len {seq_len} is too short for BOS, image, prompt, answer and EOS")
    self.batch_size, self.seq_len, self.image_size = batch_size, seq_len, image_size
    self.vocab_size, self.image_token_id = vocab_size, image_token_id
    self.bos, self.eos, self.pad = bos_token_id, eos_token_id, pad_token_id
    self.seed = seed
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.global_batch(self.index)
    self.index += 1
    rows = self.batch_size // self.process_count
    return {k: v[self.process_index * rows:(self.process_index + 1) * rows] for k, v in batch.items()}

  def global_batch(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    b, t, s = self.batch_size, self.seq_len, self.image_size
    first_word = 16  # ids below are special tokens or answers
    colour = rng.integers(0, NUM_COLOURS, b)
    palette = np.random.default_rng(1234).normal(0, 1, (NUM_COLOURS, 3)).astype(np.float32)
    pixels = palette[colour][:, None, None, :] + 0.5 * rng.normal(0, 1, (b, s, s, 3)).astype(np.float32)
    ids = np.full((b, t), self.pad, np.int32)
    labels = np.full((b, t), IGNORE, np.int32)
    mask = np.zeros((b, t), np.int32)
    for row in range(b):
      prompt_len = int(rng.integers(2, max(3, t - 5)))
      prompt = rng.integers(first_word, self.vocab_size, prompt_len)
      answer = 5 + colour[row] % (first_word - 5)
      seq = [self.bos, self.image_token_id, *prompt.tolist(), int(answer), self.eos]
      ids[row, :len(seq)] = seq
      mask[row, :len(seq)] = 1
      labels[row, len(seq) - 2:len(seq)] = seq[-2:]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixels": pixels,
            "has_image": np.ones((b,), bool)}

  def get_state(self) -> dict:
    return {"index": self.index, "seed": self.seed}

  def set_state(self, state: dict):
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"synthetic data state has seed {state['seed']}, this run uses {self.seed}")
    self.index = int(state["index"])
