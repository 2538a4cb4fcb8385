"""Live numerical parity with transformers on tiny random LLaVA-1.5 models built here (float32, eager).

The HF model is saved with `save_pretrained` and imported with `m3 convert`'s API, so these tests prove the
model and the key mapping together. At pooled scales the reference is transformers fed the average-pooled
projector outputs as `inputs_embeds` (transformers has no pooling).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from m3_jax.checkpoint import m3dir
from m3_jax.convert.convert import convert
from m3_jax.models import llava

IMG, GRID = 4, 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  torch.manual_seed(0)
  vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               image_size=48, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = tf.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=3)
  config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                          projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_seq_length=GRID * GRID)
  config._attn_implementation = "eager"
  hf = tf.LlavaForConditionalGeneration(config).eval()
  src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("m3") / "ckpt"
  hf.save_pretrained(src)
  convert(src, out, progress=False)
  cfg, params, _ = m3dir.load(out)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 3, 48, 48)).astype(np.float32)
  return hf, cfg, params, pixels


def nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def test_clip_hidden_state_of_the_feature_layer(pair):
  hf, cfg, params, pixels = pair
  with torch.no_grad():
    ref = hf.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
  model = llava.LlavaM3(cfg)
  ours = model.apply({"params": params}, nhwc(pixels), method=lambda m, x: m.vision(x))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_decoder_logits_text_only(pair):
  hf, cfg, params, _ = pair
  ids = np.array([[1, 9, 10, 11, 12, 13, 14, 15]])
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  model = llava.LlavaM3(cfg)
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  x = apply(model.embed_text, jnp.asarray(ids))
  hidden, _ = apply(model.decode, x, jnp.arange(8)[None], jnp.ones((1, 8), bool))
  np.testing.assert_allclose(np.asarray(apply(model.logits, hidden)), ref, atol=1e-4, rtol=1e-4)


def _expand_for_hf(ids, scale):
  return np.array([sum(([t] * scale if t == IMG else [t] for t in row), []) for row in ids])


def test_llava_logits_at_full_scale_batched(pair):
  hf, cfg, params, pixels = pair
  ids = np.array([[1, 7, IMG, 9, 10, 11, 12], [1, IMG, 13, 14, 15, 16, 17]])
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(_expand_for_hf(ids, 144)), pixel_values=torch.from_numpy(pixels)).logits
  ours = llava.LlavaM3(cfg).apply({"params": params}, jnp.asarray(ids), nhwc(pixels), 144)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [36, 9, 1])
def test_llava_logits_at_pooled_scales(pair, scale):
  hf, cfg, params, pixels = pair
  ids = np.array([[1, 7, IMG, 9, 10, 11, 12], [1, IMG, 13, 14, 15, 16, 17]])
  k = GRID // int(np.sqrt(scale))
  with torch.no_grad():
    feats = hf.model.get_image_features(pixel_values=torch.from_numpy(pixels), vision_feature_layer=-2,
                                        vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    grid = feats.reshape(2, GRID, GRID, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(grid, k).permute(0, 2, 3, 1).reshape(2, scale, -1)
    embed = hf.get_input_embeddings()
    rows = [torch.cat([pooled[b] if t == IMG else embed(torch.tensor([t])) for t in ids[b]]) for b in range(2)]
    ref = hf(inputs_embeds=torch.stack(rows)).logits.numpy()
  ours = llava.LlavaM3(cfg).apply({"params": params}, jnp.asarray(ids), nhwc(pixels), scale)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
