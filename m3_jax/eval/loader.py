"""`m3_jax.load(ckpt)`: a checkpoint as a model object that answers prompts about images at any scale.

    model = m3_jax.load("ckpt/llava15-m3")
    model.generate("cat.jpg", "What is this?", scale=9)        # -> {"text", "token_ids", "scale", "visual_tokens",
                                                               #     "finish_reason", "seconds"}
    model.generate(["cat.jpg", None], ["What is this?", "Hi"])  # -> a list of such dicts, one per prompt

CKPT is an m3 checkpoint directory (`m3 convert`) or a training workdir (its latest step, or `step=N`).
"""
from __future__ import annotations

import pathlib
import string
import time
from typing import Any, Sequence

import numpy as np

from m3_jax.checkpoint.reader import Checkpoint, read_checkpoint
from m3_jax.data import conversation, image as image_lib
from m3_jax.eval.generate import MAX_NEW_TOKENS, Engine, Sampling


class M3Model:
  """A loaded checkpoint: tokenizer, image preprocessing, chat template and the generation engine."""

  def __init__(self, ckpt: Checkpoint, template: str = "auto", router=None, name: str = "the checkpoint"):
    from transformers import AutoTokenizer
    self.aspect = ckpt.aspect  # not the Checkpoint: its stacked params would stay beside the engine's unscanned ones
    self.router = router  # a fitted scale router (m3_jax.eval.router.store.Router) answering scale="auto", or None
    self.name = name
    self.config = ckpt.config
    self.template = ckpt.template if template == "auto" else template
    self.tokenizer = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir)
    self.image_cfg = (image_lib.ImageProcessorConfig.from_dict(ckpt.preprocessor) if ckpt.preprocessor
                      else image_lib.ImageProcessorConfig.for_size(self.config.vision.image_size))
    stop = {self.config.eos_token_id}
    if self.tokenizer.eos_token_id is not None:
      stop.add(int(self.tokenizer.eos_token_id))
    self.engine = Engine(self.config, ckpt.params, stop_ids=sorted(stop), prefix_limit=self.header_tokens())

  def header_tokens(self) -> int:
    """How many tokens every prompt of the chat template starts with: its system prompt and first role marker, BOS
    included (0 without a system prompt to share). The engine's prefix cache takes at most these."""
    t = conversation.get_template(self.template)
    if t.style != "two" or not t.system:
      return 0
    return len(conversation.tokenize_with_images(t.render([(0, "")]), self.tokenizer, self.config.image_token_id))

  @property
  def scales(self) -> tuple[int, ...]:
    return self.config.m3.scales

  def pixels(self, images: Sequence[Any], max_pixels: int = image_lib.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Paths / bytes / PIL images (or None) -> float32[B, H, W, 3]; None becomes zeros (text-only). An image over
    `max_pixels`, or whose preprocessing would make one over it (an extreme aspect ratio), is an ImageError."""
    size = self.config.vision.image_size
    return np.stack([image_lib.load_and_preprocess(im, self.image_cfg, aspect=self.aspect, max_pixels=max_pixels)
                     if im is not None else np.zeros((size, size, 3), np.float32) for im in images])

  def visual(self, images: Sequence[Any], scales: Sequence[int], grid: tuple[int, int] | None = None,
             batch_size: int = 16, engine: Engine | None = None) -> list[np.ndarray]:
    """Each image's visual tokens float[n_b, D] at its scale (LLaVA-NeXT: `scale` tokens per crop, `grid`
    overrides the crop grid as in paper Table 5), by `engine` (default: the model's; a server's replica)."""
    engine = engine or self.engine
    if self.config.type == "llava15":
      if grid is not None:
        raise ValueError(f"a grid override ({grid[0]}x{grid[1]}) needs a LLaVA-NeXT checkpoint; this one is "
                         "LLaVA-1.5 (one crop per image)")
      return engine.visual_tokens(self.pixels(images), scales, batch_size=batch_size)
    from m3_jax.data.anyres import anyres_crops
    out = []
    for im, scale in zip(images, scales):
      crops, hw = anyres_crops(image_lib.load_image(im), self.image_cfg, self.config.anyres.grid_pinpoints,
                               self.config.anyres.pinpoint_order, grid)
      out.append(engine.anyres_tokens(crops, hw, scale, grid))
    return out

  def visual_scales(self, images: Sequence[Any], scales: Sequence[int], grid: tuple[int, int] | None = None,
                    batch_size: int = 16) -> list[dict[int, np.ndarray]]:
    """`visual` at every scale in `scales` with one encoder pass per image: per image {scale: float[n, D]}."""
    if self.config.type == "llava15":
      if grid is not None:
        raise ValueError(f"a grid override ({grid[0]}x{grid[1]}) needs a LLaVA-NeXT checkpoint; this one is "
                         "LLaVA-1.5 (one crop per image)")
      per_scale = self.engine.visual_tokens_scales(self.pixels(images), scales, batch_size=batch_size)
      return [{s: v[i] for s, v in per_scale.items()} for i in range(len(images))]
    from m3_jax.data.anyres import anyres_crops
    out = []
    for im in images:
      crops, hw = anyres_crops(image_lib.load_image(im), self.image_cfg, self.config.anyres.grid_pinpoints,
                               self.config.anyres.pinpoint_order, grid)
      out.append(self.engine.anyres_tokens_scales(crops, hw, scales, grid))
    return out

  def prompt_ids(self, prompt: str, has_image: bool) -> np.ndarray:
    return conversation.tokenize_prompt(self.template, prompt, self.tokenizer, self.config.image_token_id,
                                        image=has_image)

  def generate(self, images: Sequence[Any] | Any, prompts: Sequence[str] | str,
               scale: int | Sequence[int] | None = None, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, batch_size: int = 16, grid: tuple[int, int] | None = None,
               budget: float | None = None, visual: Sequence[np.ndarray | None] | None = None) -> list[dict] | dict:
    """One answer per (image, prompt); a plain-string prompt (with one image, path / bytes / PIL / None) gives one
    result dict, sequences give a list. `scale`: one for all, one per sample, or None (the full grid); for
    LLaVA-NeXT it is the tokens per crop.

    A result: `text`, `token_ids` (generated, without the stop token), `scale`, `visual_tokens` (the sequence
    positions the image took), `finish_reason` ("stop": a stop token ended it; "length": `max_new_tokens` did) and
    `seconds` (wall time of the batch that answered it: image encoding and generation).

    `scale="auto"`: the checkpoint's router picks each image's scale (the smallest predicted to answer; `budget`:
    the threshold whose calibration mean visual tokens stay within it); results then have `scale` "auto",
    `chosen_scale`, `routing_visual_tokens` (the routing pass's, included in `visual_tokens`) and
    `routing_seconds`.

    `visual`: each image's visual tokens at its scale, already computed (`visual_scales`); the encoder is skipped."""
    if isinstance(prompts, str):
      return self.generate([images], [prompts], scale, max_new_tokens, temperature, top_p, seed, batch_size, grid,
                           budget)[0]
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image (or None) per prompt")
    if isinstance(scale, str):
      return self._generate_auto(images, prompts, scale, max_new_tokens, temperature, top_p, seed, batch_size, grid,
                                 budget)
    n = len(prompts)
    scales = [self.config.full_scale] * n if scale is None else (
        [int(scale)] * n if isinstance(scale, (int, np.integer)) else [int(s) for s in scale])
    for s in scales:
      self.config.check_scale(s)
    has = [im is not None for im in images]
    ids = [self.prompt_ids(p, h) for p, h in zip(prompts, has)]
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    results: list[dict] = []
    for start in range(0, n, batch_size):
      clock = time.perf_counter()
      sl = slice(start, start + batch_size)
      rows = range(start, min(start + batch_size, n))
      tokens_in = [None] * len(rows)
      with_image = [i for i in rows if has[i]]
      if with_image:
        vis = ([visual[i] for i in with_image] if visual is not None else
               self.visual([images[i] for i in with_image], [scales[i] for i in with_image], grid, batch_size))
        for i, v in zip(with_image, vis):
          tokens_in[i - start] = v
      out = self.engine.generate(ids[sl], tokens_in, sampling)
      seconds = time.perf_counter() - clock
      for i, tokens in zip(rows, out):
        results.append({"text": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                        "token_ids": [int(t) for t in tokens], "scale": scales[i],
                        "visual_tokens": 0 if tokens_in[i - start] is None else len(tokens_in[i - start]),
                        # the engine cuts at the first stop token, so a stopped answer is shorter than the limit
                        "finish_reason": "stop" if len(tokens) < max_new_tokens else "length",
                        "seconds": seconds})
    return results

  def route(self, images: Sequence[Any], prompts: Sequence[str], budget: float | None = None,
            batch_size: int = 16) -> list[int | None]:
    """The router's scale per (image, prompt) (None for a text-only prompt). ValueError saying how to fit a router
    when the checkpoint has none."""
    if self.router is None:
      raise ValueError(f'scale "auto": {self.name} has no scale router; fit one with `m3 router fit --ckpt '
                       f'{self.name} --runs EVALDIR...` (EVALDIR: `m3 eval` at every scale on a calibration split), '
                       "or pass one with --router PATH")
    with_image = [i for i, im in enumerate(images) if im is not None]
    chosen: list[int | None] = [None] * len(images)
    if with_image:
      ids = [self.prompt_ids(prompts[i], True) for i in with_image]
      pixels = self.pixels([images[i] for i in with_image])
      threshold = self.router.threshold(budget)
      for start in range(0, len(with_image), batch_size):
        sl = slice(start, start + batch_size)
        for i, s in zip(with_image[sl], self.router.choose(self, pixels[sl], ids[sl], threshold=threshold)):
          chosen[i] = s
    return chosen

  def _generate_auto(self, images, prompts, scale, max_new_tokens, temperature, top_p, seed, batch_size, grid,
                     budget) -> list[dict]:
    if scale != "auto":
      raise ValueError(f"scale {scale!r}: expected one of {list(self.scales)} or \"auto\"")
    clock = time.perf_counter()
    chosen = self.route(images, prompts, budget, batch_size)
    routing_seconds = (time.perf_counter() - clock) / max(len(prompts), 1)
    out = self.generate(images, prompts, [self.config.full_scale if s is None else s for s in chosen],
                        max_new_tokens, temperature, top_p, seed, batch_size, grid)
    extra = self.router.routing_tokens
    for r, s in zip(out, chosen):
      r.update(scale="auto", chosen_scale=s, routing_visual_tokens=0 if s is None else extra,
               visual_tokens=r["visual_tokens"] + (0 if s is None else extra), routing_seconds=routing_seconds)
    return out

  def choose(self, images: Sequence[Any], prompts: Sequence[str], num_options: Sequence[int], scale: int,
             grid: tuple[int, int] | None = None, visual: Sequence[np.ndarray | None] | None = None) -> list[str]:
    """Multiple choice by likelihood: per sample, the letter among its first `num_options` (A, B, ...) with the
    highest log p(letter | prompt, image) at `scale`. Each image is encoded once for all its options (`visual`:
    its tokens at `scale`, already computed)."""
    self.config.check_scale(scale)
    with_image = [i for i, im in enumerate(images) if im is not None]
    given, visual = visual, [None] * len(prompts)
    if with_image:
      vis = ([given[i] for i in with_image] if given is not None else
             self.visual([images[i] for i in with_image], [scale] * len(with_image), grid))
      for i, v in zip(with_image, vis):
        visual[i] = v
    letters = string.ascii_uppercase[:max(num_options, default=0)]
    letter_ids = {x: np.asarray(self.tokenizer(x, add_special_tokens=False)["input_ids"], np.int32) for x in letters}
    ids, conts, vis, owners = [], [], [], []
    for i, (prompt, n) in enumerate(zip(prompts, num_options)):
      prompt_ids = self.prompt_ids(prompt, visual[i] is not None)
      for letter in letters[:n]:
        ids.append(prompt_ids)
        conts.append(letter_ids[letter])
        vis.append(visual[i])
        owners.append((i, letter))
    total, _ = self.engine.loglikelihood(ids, conts, vis)
    best: dict[int, tuple[float, str]] = {}
    for (i, letter), logp in zip(owners, total):
      if i not in best or logp > best[i][0]:
        best[i] = (float(logp), letter)
    return [best[i][1] for i in range(len(prompts))]


def load(ckpt: str | pathlib.Path, step: int | None = None, template: str = "auto",
         router: str | pathlib.Path | None = None) -> M3Model:
  """The checkpoint as a model; its scale router (`router/` in the checkpoint's folder, or the one at `router`) is
  loaded and checked against the checkpoint's identity and scales (RouterMismatch names both)."""
  return M3Model(read_checkpoint(ckpt, step), template, load_router(ckpt, step, router), str(ckpt))


def load_router(ckpt, step: int | None = None, path=None):
  """The router at `path`, else the checkpoint folder's `router/` (None when it has none), checked against the
  checkpoint; what `load` attaches as `model.router`."""
  from m3_jax.checkpoint import reader
  from m3_jax.eval.router import store
  folder = pathlib.Path(path) if path is not None else pathlib.Path(str(reader.home(ckpt, step))) / store.FOLDER
  if path is None and not folder.exists():
    return None
  router = store.load(folder)
  router.check(reader.identity(ckpt, step), reader.model_config(ckpt).m3.scales, str(ckpt))
  return router
