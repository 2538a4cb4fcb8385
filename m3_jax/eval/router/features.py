"""What the router sees, computed with the checkpoint itself (`m3 router fit --features auto` fits each kind and
keeps the one that routes best out of fold on the calibration split: fit.py).

  joint  the decoder's final hidden state at the prompt's last token after one prefill with the image at the
         smallest scale (the state the first answer token is predicted from: what the model makes of this
         question about this image at the cheapest scale), beside that prefill's visual tokens, averaged. The
         state alone loses the image's layout: on the probe a linear read-out of the question family (which
         fixes the scale needed) from the tiny model's state is 63% right out of fold, from the visual tokens
         99%. One prefill of (smallest scale + prompt) tokens.
  image  the image's visual tokens at the smallest scale, averaged (the question unseen).
  text   the decoder's final hidden state at the prompt's last token without the image.

The routing pass is real work: `routing_tokens` visual tokens per sample (the smallest scale; 0 for text) and
`routing_flops` (m3_jax.cost's prefill counter, without the logits, which the router does not compute).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from m3_jax import cost

KINDS = ("joint", "image", "text")


def check(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"router features {kind!r} are not one of {', '.join(KINDS)}")
  return kind


def routing_tokens(kind: str, scale: int) -> int:
  check(kind)
  return 0 if kind == "text" else int(scale)


def features(model, kind: str, scale: int, pixels: np.ndarray, ids: Sequence[np.ndarray],
             batch_size: int = 16) -> np.ndarray:
  """float32[B, H, W, 3] preprocessed images and prompt ids (one image placeholder each) -> the `kind` features
  with the smallest scale `scale`, float32[B, 2D] (joint) or float32[B, D] (image, text). A LLaVA-1.5 checkpoint
  (one crop per image)."""
  check(kind)
  engine, placeholder = model.engine, model.config.image_token_id
  if model.config.type != "llava15":
    raise ValueError(f"the scale router needs a LLaVA-1.5 checkpoint (one crop per image); this one is "
                     f"{model.config.type!r}")
  out = []
  for start in range(0, len(ids), batch_size):
    chunk = [np.asarray(i, np.int32) for i in ids[start:start + batch_size]]
    if kind == "text":
      out.append(engine.prompt_state([c[c != placeholder] for c in chunk], [None] * len(chunk)))
      continue
    visual = engine.visual_tokens(pixels[start:start + batch_size], int(scale), batch_size=batch_size)
    pooled = np.stack([v.mean(0) for v in visual]).astype(np.float32)
    out.append(pooled if kind == "image" else np.concatenate([engine.prompt_state(chunk, visual), pooled], axis=1))
  return np.concatenate(out).astype(np.float32)


def routing_flops(config, kind: str, scale: int, text_tokens: int) -> int:
  """FLOPs of one sample's routing pass (`text_tokens`: the prompt's tokens without the image placeholder)."""
  check(kind)
  flops = cost.prefill(config, scale, text_tokens)["prefill_flops"]
  if kind == "image":
    return int(flops["vision"] + flops["projector"])
  if kind == "text":
    llm = cost.llm_flops(config.llm, text_tokens)
    return int(llm["matmul"] + llm["attention"])
  return int(flops["total"] - flops["logits"])
