"""Routing a task's samples with a loaded model: the `m3 eval --scale auto` side of the router (the evaluator's
RouteFn)."""
from __future__ import annotations

from typing import Sequence

from m3_jax.eval.router import features as features_lib


def route_function(model, budget: float | None = None, batch_size: int = 16):
  """-> route(samples) giving per sample {"chosen_scale", "visual_tokens", "routing_visual_tokens",
  "routing_flops"}: the model's router (m3_jax.load attaches it; ValueError saying how to fit one when absent)
  at its default threshold or at `budget` mean visual tokens. A sample without an image is answered at the full
  scale with no routing pass."""
  from m3_jax.eval.evaluator import sample_image
  router = model.router
  if router is None:
    model.route([], [])  # raises the how-to-fit message
  router.threshold(budget)  # an unreachable budget is refused before any work

  def route(samples: Sequence) -> list[dict]:
    images = [sample_image(s) for s in samples]
    chosen = model.route(images, [s.prompt for s in samples], budget, batch_size)
    out = []
    for s, c in zip(samples, chosen):
      if c is None:
        out.append({"chosen_scale": model.config.full_scale, "visual_tokens": 0, "routing_visual_tokens": 0,
                    "routing_flops": 0})
        continue
      text_tokens = len(model.prompt_ids(s.prompt, True)) - 1
      extra = router.routing_tokens
      out.append({"chosen_scale": int(c), "visual_tokens": int(c) + extra, "routing_visual_tokens": extra,
                  "routing_flops": features_lib.routing_flops(model.config, router.kind, router.routing_scale,
                                                              text_tokens)})
    return out

  return route
