"""The analytic cost counter (`m3_jax.cost`, `m3 cost`): hand-worked counts, the paper's Table 9, XLA's own count of
the tiny prefill, LLaVA-NeXT token counts against the engine, parameter counts against the model."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from m3_jax import cost
from m3_jax.cli import main
from m3_jax.configs import base as m3_config
from m3_jax.models import llama, llava
from m3_jax.models.config import AnyresConfig, LLMConfig, ModelConfig


def model_config(name: str) -> ModelConfig:
  return ModelConfig.from_config(m3_config.load(name).model)


# A 1-layer decoder of width 4: 2 query heads and 1 key/value head of dim 2, MLP width 8, vocabulary 10.
TOY = LLMConfig(vocab_size=10, width=4, depth=1, heads=2, kv_heads=1, mlp_dim=8)


def test_hand_worked_one_layer_decoder():
  # Weights per layer: q 4x4 = 16, k 4x2 = 8, v 4x2 = 8, o 4x4 = 16, gate/up/down 3 * 4x8 = 96 -> 144 MACs a token.
  # Prefill of 3 tokens: 2 * 3 * 144 = 864; QK^T 2 heads x (3x2 @ 2x3) = 2 * 2*3*3*2 = 72, AV the same: 144.
  assert cost.llm_flops(TOY, 3) == {"matmul": 864, "attention": 144}
  # One new token attending to 4 keys: 2 * 144 = 288; attention 2 (QK, AV) * 2 heads * 2 * 1*4*2 = 64.
  assert cost.llm_flops(TOY, 1, 4) == {"matmul": 288, "attention": 64}
  assert cost.logits_flops(TOY, 1) == 2 * 4 * 10
  # K and V, 1 layer, 4 positions, 1 kv head of dim 2, float32: 2 * 4 * 2 * 4 bytes.
  assert cost.kv_cache_bytes(TOY, 4, 4) == 64
  # Per token: 6 * 4 (norms, o, down, two sums) + 2 * 4 (q, attention output) + 3 * 8 (gate, up, product)
  # + 2 * 2 heads * 3 keys (scores, probabilities) = 68 elements; 3 tokens, float32.
  assert cost.activation_bytes(TOY, 3, 4) == 3 * 68 * 4


def test_hand_worked_llava15_7b_vision_and_projector():
  cfg = model_config("llava15_7b_m3")
  # ViT-L/14 at 336px: 576 patches + CLS = 577 tokens, width 1024, MLP 4096; feature_layer -2 runs 23 of 24 layers.
  patch = 2 * 576 * (14 * 14 * 3) * 1024
  layer = 2 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 2 * 2 * 577 ** 2 * 1024
  assert cost.vision_flops(cfg.vision) == {"matmul": patch + 23 * (layer - 4 * 577 ** 2 * 1024),
                                           "attention": 23 * 4 * 577 ** 2 * 1024}
  assert sum(cost.vision_flops(cfg.vision).values()) == pytest.approx(0.366e12, rel=1e-3)  # the paper: ~0.35 T
  # mlp2x_gelu on the 576 patch tokens (pooling after the projector): 1024 -> 4096 -> 4096.
  assert cost.projector_flops(cfg, 9) == 2 * 576 * (1024 * 4096 + 4096 * 4096)


# The paper's Table 9 ("FLOPs (TB)", LLaVA-1.5-7B, one 336x336 image and a 30-token prompt, prefill, LLM-Viewer).
TABLE9_TFLOPS = {576: 8.0, 144: 2.2, 36: 0.9, 9: 0.5, 1: 0.4}


def test_table9_language_model_prefill():
  cfg = model_config("llava15_7b_m3")
  rows = {r["scale"]: r for r in cost.report(cfg, text_tokens=30)["scales"]}
  for scale, paper in TABLE9_TFLOPS.items():
    assert rows[scale]["sequence"] == scale + 30
    ours = rows[scale]["prefill_flops"]["llm"] / 1e12
    assert abs(ours / paper - 1) <= 0.05 or round(ours, 1) == paper, (scale, ours, paper)
  # By hand at 576: 32 layers x (2 * 606 tokens * 202,375,168 weights + 4 * 606^2 * 4096).
  assert rows[576]["prefill_flops"]["llm"] == 32 * (2 * 606 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4 * 606 ** 2 * 4096)
  assert rows[576]["prefill_flops"]["vision"] == rows[1]["prefill_flops"]["vision"]  # the encoder runs at every scale


@pytest.mark.parametrize("name", ["tiny", "llava15_7b_m3", "llava_next_7b_m3"])
def test_parameter_counts_match_the_model(name):
  cfg = model_config(name)
  assert sum(cost.param_counts(cfg).values()) == llava.param_count(cfg)


def test_prefill_matches_xla_cost_analysis_on_tiny():
  """XLA's count of the real prefill (encode, pool, merge, decode, last logits) of the tiny model. XLA counts a
  while loop's body once, so both stacks run one layer here (vision depth 2 with feature_layer -2: 1 layer used);
  XLA also counts the elementwise work this counter leaves out, so it may only be higher."""
  base = model_config("tiny")
  cfg = base.replace(llm=dataclasses.replace(base.llm, depth=1), vision=dataclasses.replace(base.vision, depth=2))
  model = llava.LlavaM3(cfg)
  params = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.key(0)))
  text = 30

  def prefill(params, ids, pixels, scale):
    v = {"params": params}
    img = model.apply(v, model.apply(v, pixels, method=model.encode), scale, method=model.image_embeds)
    ex = llava.expand_image_placeholders(ids, jnp.ones_like(ids, bool), scale, cfg.image_token_id)
    x = llava.merge_embeddings(model.apply(v, ids, method=model.embed_text), img, ex.source)
    hidden, _ = model.apply(v, x, ex.positions, ex.mask, method=model.decode)
    return model.apply(v, hidden[:, -1], method=model.logits)

  ids = jax.ShapeDtypeStruct((1, text + 1), jnp.int32)  # 30 text tokens + the image placeholder
  pixels = jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32)
  for scale in (144, 1):
    compiled = jax.jit(prefill, static_argnums=3).lower(params, ids, pixels, scale).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = cost.prefill(cfg, scale, text)["prefill_flops"]["total"]
    assert ours <= xla <= 1.10 * ours, (scale, ours, xla)


def test_decode_step_matches_xla_cost_analysis_on_tiny():
  base = model_config("tiny")
  cfg = base.replace(llm=dataclasses.replace(base.llm, depth=1))
  model = llava.LlavaM3(cfg)
  params = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.key(0)))
  length = 60  # the cache holds the prompt; the new token writes slot 60 and attends to all 61 slots

  def step(params, x, pos, kv_mask, cache):
    v = {"params": params}
    hidden, _ = model.apply(v, x, pos, kv_mask, cache, length, method=model.decode)
    return model.apply(v, hidden[:, 0], method=model.logits)

  d, c = cfg.llm.width, cfg.llm
  cache = jax.eval_shape(lambda: llama.init_cache(c, 1, length + 1))
  xla = jax.jit(step).lower(params, jax.ShapeDtypeStruct((1, 1, d), jnp.float32),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((1, length + 1), jnp.bool_),
                            cache).compile().cost_analysis()["flops"]
  f = cost.llm_flops(c, 1, length + 1)
  ours = f["matmul"] + f["attention"] + cost.logits_flops(c, 1)
  assert ours <= xla <= 1.10 * ours


def test_llava_next_7b_token_counts_by_hand():
  cfg = model_config("llava_next_7b_m3")
  # 672x672 picks the 2x2 grid (+ base = 5 crops); square, so nothing is unpadded: 576 + 48 rows * (48 + 1).
  assert cost.crops(cfg, (672, 672)) == 5
  assert cost.visual_tokens(cfg, 576, (672, 672)) == 576 + 48 * 49
  assert cost.visual_tokens(cfg, 144, (672, 672)) == 144 + 24 * 25
  # 640 wide x 480 high also picks 672x672 (the most resolution kept); at 576 the 48x48 map keeps
  # round(480 * 48 / 640) = 36 rows; at 9 the 6x6 map keeps int(4.5) = 4 rows of 6 + a newline each.
  assert cost.visual_tokens(cfg, 576, (480, 640)) == 576 + 36 * 49
  assert cost.visual_tokens(cfg, 9, (480, 640)) == 9 + 4 * 7
  row = cost.prefill(cfg, 576, 30, (480, 640))
  assert row["sequence"] == 576 + 36 * 49 + 30
  assert row["prefill_flops"]["vision"] == 5 * sum(cost.vision_flops(cfg.vision).values())
  assert row["prefill_flops"]["projector"] == 5 * cost.projector_flops(cfg, 576)


def test_llava_next_tokens_match_the_engine():
  """The visual tokens the generation engine really packs for an image (the data pipeline's crops, unpadded, with
  newlines) on a tiny LLaVA-NeXT."""
  from m3_jax.data.anyres import anyres_crops
  from m3_jax.data.image import ImageProcessorConfig
  from m3_jax.eval.generate import Engine
  pins = ((48, 96), (96, 48), (96, 96), (48, 144), (144, 48))
  cfg = model_config("tiny").replace(type="llava_next", anyres=AnyresConfig(grid_pinpoints=pins, pinpoint_order="hw"))
  # Zero parameters of the right shapes: the count does not depend on their values, and tracing is cheaper than init.
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(llava.abstract_params(cfg)))
  engine = Engine(cfg, params)
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))  # h 40, w 100
  crops, image_hw = anyres_crops(img, ImageProcessorConfig.for_size(48), pins, "hw")
  assert cost.crops(cfg, image_hw) == crops.shape[0]
  assert cost.visual_tokens(cfg, 9, image_hw) == engine.anyres_tokens(crops, image_hw, 9).shape[0]


def test_train_step_flops():
  cfg = model_config("tiny")
  text, p = 20, 8
  vision = sum(cost.vision_flops(cfg.vision).values())
  projector = cost.projector_flops(cfg, 144)
  decoders = [cost.llm_flops(cfg.llm, text + s) for s in (144, 36, 9, 1)]
  llm = sum(f["matmul"] + f["attention"] for f in decoders) + 4 * cost.logits_flops(cfg.llm, p)
  # All trained: forward + backward = 3x forward, the encoder once, every scale at its own length.
  assert cost.train_step_flops(cfg, batch=2, text_tokens=text, label_positions=p) == 2 * 3 * (vision + projector + llm)
  # A frozen vision tower with nothing trained upstream gets no backward.
  assert cost.train_step_flops(cfg, batch=1, text_tokens=text, label_positions=p, freeze=("vision",)) == \
      vision + 3 * (projector + llm)
  # vmap pads every scale to 144 visual tokens.
  vmapped = 4 * (sum(cost.llm_flops(cfg.llm, text + 144).values()) + cost.logits_flops(cfg.llm, p))
  assert cost.train_step_flops(cfg, batch=1, text_tokens=text, label_positions=p, impl="vmap") == \
      3 * (vision + projector + vmapped)
  with pytest.raises(ValueError, match=r"'decoder'\] are not parts"):
    cost.train_step_flops(cfg, batch=1, text_tokens=text, label_positions=p, freeze=("decoder",))


def test_cli_json_and_table(capsys):
  assert main(["cost", "--config", "llava15_7b_m3", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [r["scale"] for r in out["scales"]] == [576, 144, 36, 9, 1]
  assert out["params"]["total"] == 7_063_427_072 and out["param_bytes"] == 4 * 7_063_427_072
  assert out["scales"][0]["prefill_flops"]["llm"] == pytest.approx(8.04e12, rel=1e-3)
  assert main(["cost", "--config", "llava_next_7b_m3", "--image", "640x480", "--dtype", "bfloat16"]) == 0
  table = capsys.readouterr().out
  assert "image 640x480, bfloat16" in table
  assert "| 576 | 5 | 2340 | 2370 |" in table
  assert main(["cost", "--config", "llava_next_7b_m3", "--image", "640"]) == 2
  assert "--image '640': expected WIDTHxHEIGHT" in capsys.readouterr().err
