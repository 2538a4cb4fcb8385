"""`m3 serve` with a LLaVA-NeXT checkpoint: per-crop scales, non-square images cut into crop grids at batch time,
concurrent requests batched together, each answer equal to `m3_jax.load(ckpt).generate` at its scale."""
import concurrent.futures

import jax
import numpy as np
import openai
from PIL import Image

from conftest import NAME, data_uri, serving
from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval.loader import load
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

Q = "what colour is the picture?"


def test_next_answers_equal_generate_per_crop_scale(tmp_path):
  cfg = ModelConfig.from_config(m3_config.load("tiny:next").model)
  ckpt = m3dir.save(tmp_path / NAME, cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
                    template="vicuna_v1")
  model = load(ckpt)
  rng = np.random.default_rng(0)
  shapes = [(48, 96), (96, 48), (60, 60)]  # (h, w): 1x2, 2x1 and 2x2 crop grids
  paths = []
  for i, (h, w) in enumerate(shapes):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
  asks = [(0, 1), (0, 36), (1, 1), (2, 36)]  # (image, tokens per crop)
  want = {(i, s): model.generate([str(paths[i])], [Q], scale=s, max_new_tokens=6)[0] for i, s in asks}
  assert want[0, 1]["visual_tokens"] != want[1, 1]["visual_tokens"]  # 1x2 and 2x1 grids unpad differently

  with serving(model, max_batch=8, batch_wait_ms=100) as (url, _):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(key):
      i, s = key
      return client.chat.completions.create(
          model=NAME, max_tokens=6, extra_body={"visual_tokens": s},
          messages=[{"role": "user", "content": [{"type": "text", "text": Q},
                                                 {"type": "image_url", "image_url": {"url": data_uri(paths[i])}}]}])

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
      got = dict(zip(asks, pool.map(ask, asks)))
  for key, r in got.items():
    assert r.choices[0].message.content == want[key]["text"], key
    assert (r.usage.visual_tokens, r.model_extra["scale"]) == (want[key]["visual_tokens"], key[1]), key
