"""The optimiser: AdamW on the curriculum's schedule (train/curriculum.py), global-norm clipping, per-part learning
rates and frozen parts.

A model's parameters split into parts by their top-level key: `vision` (the CLIP tower), `projector` (with
`image_newline`, which LLaVA-NeXT trains alongside it) and `llm`. A frozen part (`train.freeze`) is left out of
the optimiser altogether: it has no Adam moments, gets no update, and, because the loss is differentiated only
with respect to the trainable parts (`split` / `merge`), XLA never builds its backward pass.

Weight decay applies to matrices only (`kernel`, `embedding`); norms, biases, positional embeddings, the CLS token
and `image_newline` are not decayed.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from m3_jax.train.curriculum import schedule

PARTS = ("vision", "projector", "llm")
_PART_OF_KEY = {"vision": "vision", "projector": "projector", "image_newline": "projector", "llm": "llm"}
_DECAYED = ("kernel", "embedding")


def part_of(top_key: str) -> str:
  """The part ('vision' | 'projector' | 'llm') a top-level parameter key belongs to."""
  try:
    return _PART_OF_KEY[top_key]
  except KeyError:
    raise ValueError(f"parameter subtree {top_key!r} belongs to no known part; expected one of "
                     f"{sorted(_PART_OF_KEY)} (add it to m3_jax/train/optim.py _PART_OF_KEY)") from None


def check_freeze(freeze) -> tuple[str, ...]:
  freeze = tuple(freeze)
  bad = [p for p in freeze if p not in PARTS]
  if bad:
    raise ValueError(f"train.freeze={freeze!r}: {bad} are not parts; expected any of {PARTS}")
  if set(freeze) >= set(PARTS):
    raise ValueError(f"train.freeze={freeze!r} freezes every part: nothing would train")
  return freeze


def split(params: dict, freeze) -> tuple[dict, dict]:
  """params -> (trainable, frozen), both dicts keyed by top-level key (disjoint, `merge` undoes it)."""
  freeze = check_freeze(freeze)
  trainable = {k: v for k, v in params.items() if part_of(k) not in freeze}
  frozen = {k: v for k, v in params.items() if part_of(k) in freeze}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
  return {**frozen, **trainable}


def part_lr(train: ml_collections.ConfigDict, part: str) -> float:
  lr = float(train.get(f"lr_{part}", -1.0))
  return float(train.lr) if lr < 0 else lr


def decay_mask(tree: Any) -> Any:
  """True where weight decay applies: `kernel` and `embedding` leaves."""
  def is_decayed(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name in _DECAYED
  return jax.tree_util.tree_map_with_path(is_decayed, tree)


def make_optimizer(train: ml_collections.ConfigDict, trainable: dict) -> optax.GradientTransformation:
  """The optimiser over the trainable subtree `trainable` (from `split`): clip, then AdamW per part."""
  parts = sorted({part_of(k) for k in trainable})
  transforms = {
      part: optax.adamw(schedule(part_lr(train, part), train), b1=float(train.b1), b2=float(train.b2),
                        eps=float(train.get("eps", 1e-8)), weight_decay=float(train.weight_decay),
                        mask=decay_mask)
      for part in parts
  }
  labels = {k: jax.tree_util.tree_map(lambda _, p=part_of(k): p, v) for k, v in trainable.items()}
  chain = []
  if float(train.grad_clip) > 0:
    chain.append(optax.clip_by_global_norm(float(train.grad_clip)))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain)


def learning_rates(train: ml_collections.ConfigDict, step, freeze) -> dict[str, Any]:
  """Per-part learning rate at `step` (for the metrics): {'lr/llm': ..., ...}; frozen parts are left out."""
  return {f"lr/{p}": schedule(part_lr(train, p), train)(step) for p in PARTS if p not in freeze}
