"""The tiny config: drives the tests and the CPU demo (minutes on 2 cores, no downloads).

48-pixel images, patch 4 -> a 12x12 grid, scales 144 -> 36 -> 9 -> 1 (the paper's chain below 576).
`--config configs/tiny.py:grid24` uses patch 2 (a 24x24 grid, the full 576 -> 1 chain) at ~7x the cost.
`--config configs/tiny.py:next` is a tiny LLaVA-NeXT: 48 px crops, pinpoints (h, w) 48x48, 48x96, 96x48, 96x96,
trained on the probe rendered at 1:1, 2:1 and 1:2 (base + 1x1, 1x2 and 2x1 crop grids; 300 to 444 visual tokens
at 144 per crop, so data.max_length is 512).
"""
from m3_jax.configs import base as m3_config


def get_config(arg=None):
  c = m3_config.base()
  m = c.model
  m.vision.update(image_size=48, patch_size=4, width=64, depth=3, heads=4, mlp_dim=256)
  m.llm.update(vocab_size=256, width=128, depth=2, heads=4, kv_heads=2, mlp_dim=384, max_len=1024)
  m.m3.scales = (144, 36, 9, 1)
  m.image_token_id = 4
  m.pad_token_id = 3
  if arg == "grid24":
    m.vision.patch_size = 2
    m.m3.scales = (576, 144, 36, 9, 1)

  c.data.max_length = 256
  # The probe's binding lookup is learned at the finest scale first (2/3 of the steps), then the M3 objective over
  # every scale keeps it where the pooled tokens still hold it (train/curriculum.py; probe_learnability.py; README).
  c.train.update(num_steps=900, finest_first_steps=2 / 3, batch_size=16, log_every=10, lr=3e-3, warmup_ratio=0.05)
  c.checkpoint.update(every=100, keep=2)
  if arg == "next":
    m.type = "llava_next"
    m.anyres.update(grid_pinpoints=((48, 48), (48, 96), (96, 48), (96, 96)), pinpoint_order="hw")
    c.data.update(image_aspect="anyres", max_length=512, probe_aspects="1:1,2:1,1:2")
  return c
