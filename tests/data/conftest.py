"""Tokenizers built inside the tests (no downloads): a tiny SentencePiece LLaMA model and the word-level one."""
from __future__ import annotations

import pytest

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is the colour of the square? ASSISTANT: The square is red.",
    "USER: How many cats are there? ASSISTANT: two cats",
    "hello world this is a test of the tokenizer",
]


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("sp")
  # LLaMA's layout: unk 0, bos 1, eos 2, no pad, byte fallback (so "\n" becomes <0x0A>).
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 20), model_prefix=str(d / "tokenizer"), vocab_size=400,
      model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      normalization_rule_name="identity", minloglevel=2, hard_vocab_limit=False, num_threads=1)
  return d


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "nonlegacy"])
def sp_tokenizer(request, sp_dir):
  from transformers import LlamaTokenizer
  return LlamaTokenizer.from_pretrained(str(sp_dir), legacy=request.param, add_bos_token=True)


@pytest.fixture(scope="session")
def word_tokenizer():
  from m3_jax.data.tokenizer import build_tokenizer
  return build_tokenizer("what colour is the square red how many two cats caption of a green".split())
