"""LLaVA-NeXT (v1.6 Vicuna-7B) -> M3, the paper's recipe (Sec. 4.1): anyres crops pooled per crop ("tokens per
grid", scales 576/144/36/9/1), llava-v1.6's grid pinpoints in (h, w), the whole model trained with LLM lr 1e-5 and
vision lr 2e-5 (projector and image_newline with the LLM), global batch 128, cosine with 3% warmup, one epoch,
max length 4096 (a 2x2 grid alone takes 576 + 48 * 49 = 2928 positions at 576 per crop), initialised from a
converted llava-v1.6-vicuna-7b (`m3 convert llava-hf/llava-v1.6-vicuna-7b-hf ckpt/llava_next`).

Arguments: `configs/llava_next_7b_m3.py:init=PATH,data=PATH,images=DIR,samples=N[,released]`. `samples`: the
training set's size (default 779,289, LLaVA-NeXT-Data), from which num_steps is one epoch. `released`: as the
released M3 checkpoints were trained by the official code (CLIP forward under torch.no_grad), the vision tower
frozen (`train.freeze=("vision",)`).
"""
import math
import pathlib

from m3_jax.configs import base as m3_config

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))   # llava-v1.6, (h, w)


def get_config(arg=None):
  args = dict((kv.split("=", 1) if "=" in kv else (kv, "")) for kv in arg.split(",")) if arg else {}
  base = pathlib.Path(__file__).with_name("llava15_7b_m3.py")
  c = m3_config.load(str(base))   # the 7B architecture, optimiser and mesh of the LLaVA-1.5 recipe
  c.model.type = "llava_next"
  c.model.anyres.update(grid_pinpoints=PINPOINTS, pinpoint_order="hw")
  c.data.update(path=args.get("data", "llava_next_779k.json"), image_folder=args.get("images", "data"),
                image_aspect="anyres", max_length=4096)
  samples = int(args.get("samples", 779_289))
  c.train.update(num_steps=math.ceil(samples / c.train.batch_size), lr=1e-5, lr_llm=1e-5, lr_projector=1e-5,
                 lr_vision=2e-5)
  c.checkpoint.init_from = args.get("init", "ckpt/llava_next")
  if "released" in args:
    c.train.freeze = ("vision",)
  return c
