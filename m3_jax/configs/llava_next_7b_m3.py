"""LLaVA-NeXT (v1.6 Vicuna-7B) -> M3: anyres crops pooled per crop ("tokens per grid"), pinpoints in (h, w).

Arguments as configs/llava15_7b_m3.py; `init` should be a converted llava-v1.6-vicuna-7b checkpoint.
"""
import pathlib

from m3_jax.configs import base as m3_config


def get_config(arg=None):
  base = pathlib.Path(__file__).with_name("llava15_7b_m3.py")
  c = m3_config.load(f"{base}:{arg}" if arg else str(base))
  c.model.type = "llava_next"
  c.model.anyres.grid_pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
  c.model.anyres.pinpoint_order = "hw"
  c.data.image_aspect = "anyres"
  return c
