"""One tiny random LLaVA-NeXT for the tests that check NeXT against transformers (tests/models/test_anyres.py,
tests/train/test_next_objective.py): built with transformers, saved as an HF checkpoint and converted by `m3 convert`'s
own code, so both sides hold the same weights."""
from __future__ import annotations

import json
import pathlib

import torch
import transformers as tf

from m3_jax.convert.convert import convert

S = 48  # crop size: patch 4 -> 12x12 = 144 tokens per crop
PINS = [[48, 96], [96, 48], [96, 96], [48, 144], [144, 48]]
PROC = {"size": {"shortest_edge": S}, "crop_size": {"height": S, "width": S}, "image_grid_pinpoints": PINS,
        "resample": 3, "do_pad": True}


def tiny_next_pair(src: pathlib.Path, out: pathlib.Path) -> tf.LlavaNextForConditionalGeneration:
  """A seeded tiny LlavaNextForConditionalGeneration (eager attention, a random image_newline), saved to `src` with
  its preprocessor config and converted to an m3 checkpoint at `out`; returns the transformers model (eval mode)."""
  torch.manual_seed(0)
  vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=S, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = tf.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=3)
  config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=4, image_grid_pinpoints=PINS,
                              projector_hidden_act="gelu", vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=144)
  config._attn_implementation = "eager"
  hf = tf.LlavaNextForConditionalGeneration(config).eval()
  with torch.no_grad():
    hf.model.image_newline.normal_()
  hf.save_pretrained(src)
  (src / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "LlavaNextImageProcessor", **PROC}))
  convert(src, out, progress=False)
  return hf
