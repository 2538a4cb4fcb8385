"""The mid-size benchmark config: ViT 384 x 8 on 336-pixel images (patch 14, 24x24 grid), LLM 512 x 8, vocab 32064.
`small.py:next`: the same model as LLaVA-NeXT (anyres crops, llava-v1.6 pinpoints)."""
from m3_jax.configs import base as m3_config


def get_config(arg=None):
  c = m3_config.base()
  m = c.model
  m.vision.update(image_size=336, patch_size=14, width=384, depth=8, heads=6, mlp_dim=1536)
  m.llm.update(vocab_size=32064, width=512, depth=8, heads=8, kv_heads=8, mlp_dim=1376, max_len=2048)
  m.image_token_id = 32000
  m.pad_token_id = 32001
  c.data.max_length = 1024
  c.train.update(num_steps=1000, batch_size=8, lr=1e-4)
  if arg == "next":   # LLaVA-NeXT: llava-v1.6's pinpoints; a 2x2 grid takes 576 + 48 * 49 tokens at 576 per crop
    m.type = "llava_next"
    m.anyres.update(grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
                    pinpoint_order="hw")
    m.llm.max_len = 4096
    c.data.update(image_aspect="anyres", max_length=4096)
    c.train.batch_size = 10   # a multiple of the 5 scales (train.scale_sampling="random_per_sample")
  return c
