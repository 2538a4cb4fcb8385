"""LLaVA composition: placeholder expansion, KV cache, parameter counts of the 7B configs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.configs import base as m3_config
from m3_jax.models import llama, llava
from m3_jax.models.config import ModelConfig

IMG = 4


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  return cfg, llava.LlavaM3(cfg), llava.init_params(cfg, jax.random.key(0))


def test_expansion_hand_worked():
  ids = jnp.array([[1, 7, IMG, 8], [1, 7, 8, 9], [0, 1, IMG, 8]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], bool)
  labels = jnp.array([[-100, -100, -100, 8], [-100, 7, 8, 9], [-100, -100, -100, 8]])
  ex = llava.expand_image_placeholders(ids, mask, 3, IMG, labels)
  # text positions 0..3 index the text, 4..6 the three visual tokens.
  np.testing.assert_array_equal(ex.source, [[0, 1, 4, 5, 6, 3], [0, 1, 2, 3, 3, 3], [0, 1, 4, 5, 6, 3]])
  np.testing.assert_array_equal(ex.mask, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(ex.is_image, [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(ex.positions, [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 3, 3], [0, 0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(ex.labels, [[-100, -100, -100, -100, -100, 8], [-100, 7, 8, 9, -100, -100],
                                            [-100, -100, -100, -100, -100, 8]])


def test_text_only_row_pads_on_the_left_when_asked():
  ex = llava.expand_image_placeholders(jnp.array([[1, 7, 8]]), jnp.ones((1, 3), bool), 3, IMG, pad_side="left")
  np.testing.assert_array_equal(ex.source, [[0, 0, 0, 1, 2]])
  np.testing.assert_array_equal(ex.mask, [[0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(ex.positions, [[0, 0, 0, 1, 2]])


def test_placeholder_count_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match=r"row 1: 2 image placeholders \(id 4\) for 1 image"):
    llava.check_placeholders(np.array([[1, IMG, 5], [IMG, IMG, 5]]), [1, 1], IMG)
  with pytest.raises(ValueError, match=r"row 0: 0 image placeholders \(id 4\) for 1 image"):
    llava.check_placeholders(np.array([[1, 5, 5]]), 1, IMG)


def test_unscanned_layers_give_the_scanned_forward(tiny):
  """`llama.unscan` (the engine's layout: a tuple of per-layer trees, run unrolled) computes what the scan does."""
  cfg, model, params = tiny
  unscanned = {**params, "llm": llama.unscan(params["llm"])}
  assert isinstance(unscanned["llm"]["layers"], tuple) and len(unscanned["llm"]["layers"]) == cfg.llm.depth
  pixels = jnp.asarray(np.random.default_rng(3).normal(size=(1, 48, 48, 3)), jnp.float32)
  ids = jnp.array([[1, IMG, 9, 10, 11]])
  forward = jax.jit(lambda p: model.apply({"params": p}, ids, pixels, 9))
  np.testing.assert_allclose(np.asarray(forward(unscanned)), np.asarray(forward(params)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["stacked", "unscanned"])
def test_kv_cache_decoding_matches_full_forward(tiny, layout):
  """Prefill 6 tokens, then decode one at a time: the logits equal the full forward's (the cache written before
  it is read, per layer), whether the layers' params are stacked (sliced per layer) or unscanned (the engine's)."""
  cfg, model, params = tiny
  full_params = params
  if layout == "unscanned":
    params = {**params, "llm": llama.unscan(params["llm"])}
  rng = np.random.default_rng(0)
  t, s = 10, 16
  ids = jnp.asarray(rng.integers(5, 200, (2, t)), jnp.int32)
  mask = np.ones((2, t), bool)
  mask[1, :3] = False  # a left-padded row
  pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0))
  apply = jax.jit(lambda method, *a: model.apply({"params": params}, *a, method=method), static_argnums=0)
  x = apply(model.embed_text, ids)
  full = jax.jit(lambda x: model.apply({"params": full_params}, model.apply(
      {"params": full_params}, x, pos, jnp.asarray(mask), method=model.decode)[0], method=model.logits))(x)

  kv_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, s - t))))
  cache = llama.init_cache(cfg.llm, 2, s)
  hidden, cache = apply(model.decode, x[:, :6], pos[:, :6], kv_mask, cache, 0)
  steps = [hidden]
  for i in range(6, t):
    hidden, cache = apply(model.decode, x[:, i:i + 1], pos[:, i:i + 1], kv_mask, cache, i)
    steps.append(hidden)
  incremental = apply(model.logits, jnp.concatenate(steps, axis=1))
  np.testing.assert_allclose(np.asarray(incremental)[mask], np.asarray(full)[mask], atol=2e-5, rtol=1e-5)


def test_left_padding_does_not_change_a_rows_logits(tiny):
  cfg, model, params = tiny
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, 48, 48, 3)), jnp.float32)
  ids = jnp.array([[1, IMG, 9, 10, 11]])
  forward = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, pixels, 9, mask))
  ref = forward(ids, jnp.ones_like(ids, bool))
  padded = jnp.array([[3, 3, 1, IMG, 9, 10, 11]])
  out = forward(padded, jnp.array([[0, 0, 1, 1, 1, 1, 1]], bool))
  np.testing.assert_allclose(np.asarray(out)[:, 2:], np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_pooling_before_and_after_the_projector_differ(tiny):
  """The projector has a GELU, so pool(proj(x)) != proj(pool(x)) except at full scale."""
  cfg, _, params = tiny
  pixels = jnp.asarray(np.random.default_rng(2).normal(size=(1, 48, 48, 3)), jnp.float32)
  ids = jnp.array([[1, IMG, 9]])
  before = llava.LlavaM3(llava.with_overrides(cfg, pool_position="before_projector"))
  after = llava.LlavaM3(cfg)
  out = {s: [np.asarray(jax.jit(lambda p, m=m, s=s: m.apply({"params": p}, ids, pixels, s))(params))
             for m in (after, before)] for s in (144, 9)}
  np.testing.assert_allclose(out[144][0], out[144][1], atol=1e-5)
  assert np.abs(out[9][0] - out[9][1]).max() > 1e-3


@pytest.mark.parametrize("name,model", [("llava15_7b_m3", "llava-1.5-7b-hf"),
                                        ("llava_next_7b_m3", "llava-v1.6-vicuna-7b-hf")])
def test_7b_parameter_count_matches_transformers(fixtures_dir, name, model):
  expected = json.loads((fixtures_dir / "real-7b-configs" / "parameter_counts.json").read_text())[model]["total"]
  cfg = ModelConfig.from_config(m3_config.load(f"configs/{name}.py").model)
  assert llava.param_count(cfg) == expected
