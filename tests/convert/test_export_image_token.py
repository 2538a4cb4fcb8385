"""An original LLaVA / M3 checkpoint has no `<image>` token (LLaVA splices the image in at index -200; m3 keeps it
at id = vocab_size): `m3 export` adds it as llava-hf's conversion does, so transformers runs the exported model
with images, with m3's logits on every original token."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.checkpoint import m3dir
from m3_jax.cli import main
from m3_jax.configs import base as m3_config
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

VOCAB = 60


def no_image_tokenizer():
  """A word-level tokenizer of exactly VOCAB tokens, none of them <image> (as LLaVA's LLaMA tokenizer)."""
  from tokenizers import Tokenizer, pre_tokenizers, processors
  from tokenizers.models import WordLevel
  from transformers import PreTrainedTokenizerFast
  words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
  tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")


def test_export_adds_the_image_token_and_transformers_gives_m3s_logits(tmp_path):
  import torch
  from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
  base = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, vocab_size=VOCAB), image_token_id=VOCAB)
  params = llava.init_params(cfg, jax.random.key(0))
  tok = no_image_tokenizer()
  assert len(tok) == VOCAB and "<image>" not in tok.get_vocab()
  ckpt = m3dir.save(tmp_path / "m3", cfg, params, tokenizer_src=tok, template="vicuna_v1")
  assert main(["export", "--ckpt", str(ckpt), str(tmp_path / "hf")]) == 0
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["image_token_index"] == VOCAB and hf_config["text_config"]["vocab_size"] == 64
  exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert exported.convert_tokens_to_ids("<image>") == VOCAB and exported.tokenize("w3 <image> w4") == [
      "w3", "<image>", "w4"]
  processor = AutoProcessor.from_pretrained(tmp_path / "hf")
  assert processor.patch_size == cfg.vision.patch_size and processor.image_token == "<image>"
  model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                        dtype=torch.float32).eval()
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(1, 48, 48, 3)).astype(np.float32)
  text = rng.integers(5, VOCAB, size=6)
  m3_ids = np.concatenate([[1], text[:3], [VOCAB], text[3:]])[None].astype(np.int32)
  hf_ids = np.concatenate([[1], text[:3], [VOCAB] * cfg.full_scale, text[3:]])[None]
  want = np.asarray(llava.LlavaM3(cfg).apply({"params": params}, jnp.asarray(m3_ids), jnp.asarray(pixels),
                                             scale=cfg.full_scale))
  with torch.no_grad():
    got = model(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits
  got = got.numpy()
  np.testing.assert_allclose(got[..., :VOCAB], want, atol=1e-4, rtol=0)
  # The padded tokens' logit is the mean logit: never the answer.
  np.testing.assert_allclose(got[..., VOCAB:], np.repeat(want.mean(-1, keepdims=True), 64 - VOCAB, -1), atol=1e-4)


def test_the_padded_rows_are_the_mean_row_in_bfloat16_too():
  """The mean is taken in float32: a bfloat16 sum over the vocabulary would lose most of it."""
  import ml_dtypes
  from m3_jax.convert.export import image_token_row
  base = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, vocab_size=VOCAB), image_token_id=VOCAB)
  rng = np.random.default_rng(0)
  embed = (0.001 + 0.02 * rng.standard_normal((VOCAB, 8))).astype(ml_dtypes.bfloat16)
  head = (0.001 + 0.02 * rng.standard_normal((8, VOCAB))).astype(ml_dtypes.bfloat16)
  got_cfg, flat = image_token_row(cfg, {"llm/embed/embedding": embed, "llm/lm_head/kernel": head},
                                  no_image_tokenizer())
  assert got_cfg.llm.vocab_size == 64 and got_cfg.image_token_id == VOCAB
  assert flat["llm/embed/embedding"].dtype == ml_dtypes.bfloat16 and flat["llm/embed/embedding"].shape == (64, 8)
  want = embed.astype(np.float32).mean(0).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(flat["llm/embed/embedding"][VOCAB:], np.repeat(want[None], 64 - VOCAB, 0))
  want = head.astype(np.float32).mean(1).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(flat["llm/lm_head/kernel"][:, VOCAB:], np.repeat(want[:, None], 64 - VOCAB, 1))
