"""LLaVA-1.5-7B -> M3, the paper's recipe (Sec. 4.1): scales 576/144/36/9/1, lr 2e-5 for LLM and vision,
global batch 128, cosine with 3% warmup, one epoch of llava_v1_5_mix665k, max length 2048, initialised from a
converted LLaVA-1.5 checkpoint (`m3 convert llava-hf/llava-1.5-7b-hf ckpt/llava15`).

Arguments: `configs/llava15_7b_m3.py:init=PATH,data=PATH,images=DIR[,released]`. `released`: how the released
M3 checkpoints were trained by the official code, whose CLIP forward runs under `torch.no_grad`
(llava/model/multimodal_encoder/clip_encoder.py), so the vision tower never trains (`train.freeze=("vision",)`);
without it, the paper's whole-model recipe.
"""
from m3_jax.configs import base as m3_config


def get_config(arg=None):
  args = dict((kv.split("=", 1) if "=" in kv else (kv, "")) for kv in arg.split(",")) if arg else {}
  c = m3_config.base()  # base() holds the 7B LLaVA-1.5 architecture
  c.data.update(source="llava_json", path=args.get("data", "llava_v1_5_mix665k.json"),
                image_folder=args.get("images", "data"), template="vicuna_v1", max_length=2048,
                image_aspect="pad", num_workers=16)
  # 665k samples / 128 per step = 5198 steps: one epoch.
  c.train.update(num_steps=5198, batch_size=128, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0,
                 scale_loss="loop", scale_sampling="all", dtype="bfloat16", remat="full")
  c.checkpoint.update(every=500, keep=3, init_from=args.get("init", "ckpt/llava15"))
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices
  if "released" in args:
    c.train.freeze = ("vision",)
  return c
