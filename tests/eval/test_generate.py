"""The generation engine: KV-cache decoding == full forward greedy loop, batching / padding / grouping
invariance, per-sample scales, option log-likelihoods, sharded == single device, and `m3 generate` against a
greedy loop over transformers' logits."""
import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from m3_jax import cli
from m3_jax.configs import base as m3_config
from m3_jax.convert.convert import convert
from m3_jax.eval.generate import Engine, Sampling, shard_params, shared_prefix
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax import sharding

IMG, EOS = 4, 2


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  params = llava.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(4, 48, 48, 3)).astype(np.float32)
  prompts = [np.array([1, IMG, 10, 11, 12]), np.array([1, 20, IMG, 30]), np.array([1, 5, 6, 7, 8, 9, 10]),
             np.array([1, IMG, 40])]
  return cfg, params, pixels, prompts


def greedy_reference(cfg, params, prompt, pixels, scale, steps):
  """Greedy decoding by re-running the full forward pass (no cache) for every new token. The sequence is
  right-padded to a fixed length (causal attention never sees the padding), so it compiles once."""
  model = llava.LlavaM3(cfg)
  length = len(prompt) + steps
  fwd = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, pixels, scale, mask))
  ids, out = list(prompt), []
  for _ in range(steps):
    padded = np.array([ids + [cfg.pad_token_id] * (length - len(ids))])
    mask = np.arange(length)[None] < len(ids)
    tok = int(jnp.argmax(fwd(jnp.asarray(padded), jnp.asarray(mask))[0, len(ids) - 1 + scale - 1]))
    if tok == EOS:
      break
    out.append(tok)
    ids.append(tok)
  return out


def test_kv_cache_generation_equals_full_forward_greedy(tiny):
  cfg, params, pixels, prompts = tiny
  engine = Engine(cfg, params, stop_ids=(EOS,))
  scales = [9, 36, None, 1]
  visual = engine.visual_tokens(pixels, [s or 1 for s in scales])
  visual = [v if s else None for v, s in zip(visual, scales)]
  got = engine.generate(prompts, visual, Sampling(max_new_tokens=6))
  for i, s in enumerate(scales):
    if s is None:  # text-only: a dummy image never reaches the decoder since the prompt has no placeholder
      continue
    assert got[i] == greedy_reference(cfg, params, prompts[i], pixels[i:i + 1], s, 6), i
  # Answer lengths share a compiled program per power-of-two bucket (>= 8); the loop stops at the length asked.
  assert engine.generate(prompts, visual, Sampling(max_new_tokens=3)) == [g[:3] for g in got]
  assert engine._generate._cache_size() == 1
  with pytest.raises(ValueError, match="max_new_tokens -1: expected >= 0"):
    engine.generate(prompts, visual, Sampling(max_new_tokens=-1))


def test_results_do_not_depend_on_batching_padding_or_grouping(tiny):
  cfg, params, pixels, prompts = tiny
  engine = Engine(cfg, params, stop_ids=(EOS,), length_step=8)
  scales = [9, 36, 144, 1]
  visual = engine.visual_tokens(pixels, scales)
  visual[2] = None  # a text-only sample in the batch
  together = engine.generate(prompts, visual, Sampling(max_new_tokens=5))
  alone = [engine.generate([p], [v], Sampling(max_new_tokens=5))[0] for p, v in zip(prompts, visual)]
  order = [2, 0, 3, 1]
  shuffled = engine.generate([prompts[i] for i in order], [visual[i] for i in order], Sampling(max_new_tokens=5))
  assert together == alone
  assert [shuffled[order.index(i)] for i in range(4)] == together
  # Visual tokens of one scale computed per sample equal those computed in a mixed-scale batch.
  np.testing.assert_allclose(engine.visual_tokens(pixels[1:2], 36)[0], visual[1], atol=1e-5)


def test_shared_prefix_is_whole_blocks_before_the_first_image_and_the_last_token():
  a = np.array([1, 5, 6, 7, 8, 9, IMG, 10])
  b = np.array([1, 5, 6, 7, 8, 9, 10, 11, 12])
  assert shared_prefix([a, a], [np.zeros(1), np.zeros(1)], IMG, 2) == 6   # up to the placeholder
  assert shared_prefix([a, a], [np.zeros(1), np.zeros(1)], IMG, 4) == 4   # whole blocks only
  assert shared_prefix([a, b], [np.zeros(1), None], IMG, 1) == 6          # where they differ
  assert shared_prefix([b], [None], IMG, 1) == 8                          # short of the last token
  assert shared_prefix([b, np.array([1, 5, 9, 9, 9])], [None, None], IMG, 2) == 2
  assert shared_prefix([b, np.array([1, 5, 9, 9, 9])], [None, None], IMG, 4) == 0  # under one block
  assert shared_prefix([b, np.array([1, 5, 6, 9, 9, 9, 9, 9, 9]), b], [None] * 3, IMG, 1) == 3
  assert shared_prefix([b, b], [None, None], IMG, 2, most=5) == 4                  # at most `most` tokens
  assert shared_prefix([np.array([], np.int32)], [None], IMG, 1) == 0             # (an empty prompt)


def test_a_shared_prompt_prefix_is_prefilled_once_and_changes_no_answer(tiny):
  """Prompts sharing a system prompt take its keys and values from the engine's prefix cache (the two whole blocks
  of 8 of their 20 shared tokens) and prefill only the rest: the same logits and answers as a full prefill."""
  cfg, params, pixels, _ = tiny
  system = [1] + list(range(5, 24))  # 20 tokens
  prompts = [np.array(system + [IMG, 40 + i, 41]) for i in range(3)] + [np.array(system + [50, 51])]
  cached = Engine(cfg, params, stop_ids=(EOS,), length_step=8, prefix_limit=20)
  plain = Engine(cfg, params, stop_ids=(EOS,), length_step=8)   # (no prefix_limit: no prefix caching)
  visual = cached.visual_tokens(pixels[:3], [9, 1, 36]) + [None]
  packed = plain._pack(prompts, visual, "left")
  _, _, pos, want_logits = plain._prefill(plain.params, *packed, 8)
  _, _, got_pos, got_logits = cached._prefill(cached.params, *cached._pack(prompts, visual, "left", skip=16), 8,
                                              cached.cached_prefix(np.array(system[:16])))
  np.testing.assert_array_equal(got_pos, pos)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=1e-5)
  s = Sampling(max_new_tokens=6)
  want = plain.generate(prompts, visual, s)
  assert cached.generate(prompts, visual, s) == want
  assert [cached.generate([p], [v], s)[0] for p, v in zip(prompts, visual)] == want
  assert list(cached._prefix_cache) == [tuple(system[:16])]  # made once, then reused alone and batched
  # New params (training's evaluations set them) drop the prefixes made with the old ones.
  other = llava.init_params(cfg, jax.random.key(1))
  cached.params, plain.params = other, other
  assert not cached._prefix_cache
  assert cached.generate(prompts, visual, s) == plain.generate(prompts, visual, s)
  # At most `prefixes` are kept, the least recently used dropped first; a prefix is at most prefix_limit tokens
  # (a long text-only prompt alone shares its whole self: it takes the header's whole blocks, not all of it).
  cached.prefixes = 1
  cached.generate([np.array([1] + list(range(30, 90)) + [91])], [None], s)
  assert list(cached._prefix_cache) == [(1, *range(30, 45))]


def test_option_loglikelihood_matches_the_full_forward(tiny):
  cfg, params, pixels, prompts = tiny
  engine = Engine(cfg, params)
  conts = [np.array([7, 8]), np.array([9]), np.array([3, 5, 5]), np.array([11, 12])]
  visual = engine.visual_tokens(pixels, 9)
  visual[2] = None
  total, count = engine.loglikelihood(prompts, conts, visual)
  np.testing.assert_array_equal(count, [2, 1, 3, 2])
  model = llava.LlavaM3(cfg)
  for i in (0, 1, 3):
    ids = np.concatenate([prompts[i], conts[i]])
    logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([ids]), pixels[i:i + 1], 9)[0], -1)
    start = len(prompts[i]) - 1 + 9 - 1
    want = sum(float(logp[start + k, c]) for k, c in enumerate(conts[i]))
    np.testing.assert_allclose(total[i], want, rtol=1e-5, atol=1e-4)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
  cfg, params, pixels, prompts = tiny
  engine = Engine(cfg, params, stop_ids=(EOS,))
  visual = engine.visual_tokens(pixels[:1], 9)
  greedy = engine.generate(prompts[:1], visual, Sampling(max_new_tokens=4))
  a = engine.generate(prompts[:1], visual, Sampling(max_new_tokens=4, temperature=1.0, seed=3))
  b = engine.generate(prompts[:1], visual, Sampling(max_new_tokens=4, temperature=1.0, seed=3))
  nucleus = engine.generate(prompts[:1], visual, Sampling(max_new_tokens=4, temperature=1.0, top_p=1e-6, seed=5))
  assert a == b
  assert nucleus == greedy  # top_p -> 0 keeps only the most likely token


def test_sharded_parameters_give_the_single_device_results(tiny):
  cfg, params, pixels, prompts = tiny
  assert jax.device_count() == 8
  single = Engine(cfg, params, stop_ids=(EOS,))
  mesh = sharding.make_mesh((2, 2, 2))
  sharded_params = shard_params(params, cfg, mesh, sharding.DEFAULT_RULES)
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded_params))
  sharded = Engine(cfg, sharded_params, stop_ids=(EOS,))
  # The engine's unscanned decoder layers keep their shardings (each layer as its slice of the stacked layout).
  stacked, unscanned = sharded_params["llm"]["layers"], sharded.params["llm"]["layers"]
  def spec(axes):  # a PartitionSpec's entries without trailing Nones (P() == P(None, None))
    axes = list(axes)
    while axes and axes[-1] is None:
      axes.pop()
    return tuple(axes)

  for before, after in zip(jax.tree.leaves(stacked), jax.tree.leaves(unscanned[1])):
    assert spec(after.sharding.spec) == spec(tuple(before.sharding.spec)[1:]), (before.sharding, after.sharding)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(unscanned))
  vis_a = single.visual_tokens(pixels, [9, 36, 144, 1])
  vis_b = sharded.visual_tokens(pixels, [9, 36, 144, 1])
  for a, b in zip(vis_a, vis_b):
    np.testing.assert_allclose(a, b, atol=1e-5)
  vis_a[2] = vis_b[2] = None  # prompt 2 is text-only
  assert single.generate(prompts, vis_a, Sampling(max_new_tokens=4)) == \
      sharded.generate(prompts, vis_b, Sampling(max_new_tokens=4))


# ------------------------------------------------------------------------------------------------- m3 generate
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  from m3_jax.data.tokenizer import probe_tokenizer
  tokenizer = probe_tokenizer()
  torch.manual_seed(1)
  vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=48, patch_size=4, hidden_act="quick_gelu")
  text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, pad_token_id=3, bos_token_id=1, eos_token_id=2)
  config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG, projector_hidden_act="gelu",
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=144)
  config._attn_implementation = "eager"
  hf = tf.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # sharper logits than the random init, so greedy choices have clear margins
    hf.lm_head.weight.mul_(30.0)
  src = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(src)
  tokenizer.save_pretrained(src)
  tf.CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(src)
  out = tmp_path_factory.mktemp("m3") / "ckpt"
  convert(src, out, progress=False)
  image = tmp_path_factory.mktemp("img") / "red.png"
  pixels = np.zeros((60, 48, 3), np.uint8)
  pixels[:, :24] = (200, 30, 30)
  Image.fromarray(pixels).save(image)
  return hf, tokenizer, out, image, src


def run_generate(*argv) -> dict:
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert cli.main(["generate", *argv]) == 0
  return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("scale", [144, 9])
def test_m3_generate_matches_a_greedy_loop_over_transformers_logits(hf_checkpoint, scale):
  hf, tokenizer, ckpt, image, src = hf_checkpoint
  steps = 6
  got = run_generate("--ckpt", str(ckpt), "--image", str(image), "--prompt", "what colour is the picture?",
                     "--scale", str(scale), "--max-new-tokens", str(steps), "--json")
  assert got["scale"] == scale and got["visual_tokens"] == scale

  processor = tf.CLIPImageProcessor.from_pretrained(src)
  pixel_values = processor(Image.open(image), return_tensors="pt")["pixel_values"]
  prompt = tokenizer("USER:", add_special_tokens=True)["input_ids"] + [IMG] + \
      tokenizer("\nwhat colour is the picture? ASSISTANT:", add_special_tokens=False)["input_ids"]
  embed = hf.get_input_embeddings()
  with torch.no_grad():
    feats = hf.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                        vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    k = 12 // int(np.sqrt(scale))
    pooled = torch.nn.functional.avg_pool2d(feats.reshape(1, 12, 12, -1).permute(0, 3, 1, 2), k)
    visual = pooled.permute(0, 2, 3, 1).reshape(scale, -1)
    ids, want, margins = list(prompt), [], []
    for _ in range(steps):
      x = torch.cat([visual if t == IMG else embed(torch.tensor([t])) for t in ids])[None]
      logits = hf(inputs_embeds=x).logits[0, -1]
      top2 = torch.topk(logits, 2).values
      tok = int(logits.argmax())
      margins.append(float(top2[0] - top2[1]))
      if tok == EOS:
        break
      want.append(tok)
      ids.append(tok)
  clear = next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))
  assert clear >= 3, margins
  assert got["token_ids"][:clear] == want[:clear]
  assert got["text"] == tokenizer.decode(got["token_ids"], skip_special_tokens=True).strip()


def test_m3_generate_rejects_a_scale_outside_the_chain(hf_checkpoint, capsys):
  _, _, ckpt, image, _ = hf_checkpoint
  assert cli.main(["generate", "--ckpt", str(ckpt), "--image", str(image), "--prompt", "hi", "--scale", "10"]) == 2
  assert capsys.readouterr().err == ("m3 generate: error: --scale 10 is not one of this checkpoint's scales (1, 9, "
                                     "36, 144: model.m3.scales)\n")


def test_llava_next_generation_packs_tokens_per_grid_like_the_anyres_forward(fixtures_dir, tmp_path):
  """NeXT through m3_jax.load: every crop pooled to `scale`, unpadded, newlines; greedy tokens equal a greedy loop
  over the full NeXT forward (`LlavaM3` with `anyres_index`, parity-tested against transformers' LlavaNext)."""
  from m3_jax.data.anyres import anyres_crops
  from m3_jax.eval.loader import load
  from m3_jax.models import anyres
  ckpt = tmp_path / "next"
  convert(fixtures_dir / "transformers-5.23.0" / "llava-next", ckpt, progress=False)
  model = load(ckpt)
  image = tmp_path / "wide.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(image)
  prompt = "USER: <image>\nhi ASSISTANT:"
  got = model.generate([str(image)], [prompt], scale=36, max_new_tokens=3, batch_size=1)[0]
  crops, hw = anyres_crops(Image.open(image).convert("RGB"), model.image_cfg, model.config.anyres.grid_pinpoints,
                           model.config.anyres.pinpoint_order)
  assert got["visual_tokens"] == anyres.visual_tokens(model.config, hw, 36)
  ids = list(model.prompt_ids(prompt, True))
  index = anyres.pack_indices(model.config, hw, 36, n_crops=len(crops))
  want = []
  for _ in range(3):
    logits = model.engine.model.apply({"params": model.engine.params}, jnp.asarray([ids], jnp.int32),
                                      jnp.asarray(crops)[None], 36, anyres_index=index[None])
    tok = int(jnp.argmax(logits[0, -1]))
    if tok in model.engine.stop_ids:
      break
    want.append(tok)
    ids.append(tok)
  assert got["token_ids"] == want


def _while_bodies(hlo: str) -> dict[str, str]:
  """The compiled module's while-loop body computations, by name -> their text."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  bodies = {}
  for block in re.split(r"\n(?=\S)", hlo):
    head = re.match(r"%?([\w.\-]+) ", block)
    if head and head.group(1) in names:
      bodies[head.group(1)] = block
  assert bodies.keys() == names, f"while bodies {names} not all found"
  return bodies


def test_decode_loop_copies_neither_the_kv_cache_nor_the_weights(tiny):
  """The engine's decode loop updates each layer's KV cache in place and reads each layer's weights where they lie.
  A stacked cache read before its write made XLA copy all of it every step, and slicing the stacked layer weights
  copied every layer's weights every step: the per-token cost grew with the cache and the model, not the batch."""
  cfg, params, _, _ = tiny
  engine = Engine(cfg, params, stop_ids=(EOS,))
  for p in (0, 16):   # without and with a cached prefix (a chat template's header)
    _check_decode_loop(cfg, params, engine, p)


def _check_decode_loop(cfg, params, engine, p: int):
  b = 3  # no activation [B, ...] is then shaped like a weight or a cache
  prompt = np.array(list(range(5, 5 + p)) + [1, IMG, 7, 8])
  ids, mask, img, n_vis = engine._pack([prompt] * b, [np.zeros((9, cfg.llm.width))] * b, "left", skip=p)
  prefix = engine.cached_prefix(prompt[:p]) if p else None
  hlo = engine._generate.lower(engine.params, prefix, ids, mask, img, n_vis, jax.random.key(0), np.float32(0),
                               np.float32(1), np.int32(32), max_new=32, greedy=True).compile().as_text()
  # Whatever the layouts: no copy as large as one layer's cache, nothing shaped like one layer's cache but the
  # in-place write, and no array shaped like one layer's weight matrix.
  slots, k, d = p + ids.shape[1] + img.shape[1] - 1 + 32, cfg.llm.kv_heads, cfg.llm.dim_per_head
  layer_cache = b * k * d * slots
  cache_shapes = {f"[{b},{k},{d},{slots}]", f"[{b},{k},{slots},{d}]"}
  weight_shapes = {"[" + ",".join(map(str, w.shape[1:])) + "]"
                   for w in jax.tree.leaves(params["llm"]["layers"]) if w.ndim == 3}
  assert len(weight_shapes) == 4  # q/o [D, D], k/v [D, K*Dh], gate/up [D, M], down [M, D]
  bodies = _while_bodies(hlo)
  assert bodies, "no decode loop found"
  for name, body in bodies.items():
    for line in body.splitlines():
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+(\[[\d,]*\])\S* ([\w\-]+)\(", line)
      if not m:
        continue
      instruction, shape, op = m.groups()
      size = int(np.prod([int(n) for n in shape[1:-1].split(",") if n]))
      assert not (op == "copy" and size >= layer_cache), f"the decode loop {name} copies a KV cache: {line[:200]}"
      assert (op in ("get-tuple-element", "parameter", "tuple") or "dynamic-update-slice" in instruction
              or shape not in cache_shapes), f"the decode loop {name} makes a copy of a layer's cache: {line[:200]}"
      assert op in ("get-tuple-element", "parameter", "tuple") or shape not in weight_shapes, (
          f"the decode loop {name} makes a weight-shaped array (a copy of a layer's weights): {line[:200]}")
