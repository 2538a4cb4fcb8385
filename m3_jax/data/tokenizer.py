"""A tiny word-level tokenizer for the tiny config and the granularity probe (vocabulary <= 256).

Ids 0-4 are fixed to match configs/tiny.py: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<image>` 4; then the words of
the chat templates and of the probe. It is a `PreTrainedTokenizerFast`, so `save_pretrained` writes it into a
checkpoint and `AutoTokenizer.from_pretrained` reads it back. Text is lower-cased and split on whitespace and
punctuation; `<image>` and `</s>` are special tokens matched before that.
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Words of the vicuna_v1 / llava_hf templates (system prompt and roles), lower-cased, and punctuation.
TEMPLATE_WORDS = tuple(dict.fromkeys(
    "a chat between curious user and an artificial intelligence assistant . the gives helpful , detailed "
    "polite answers to ' s questions : ? !".split()))


def build_tokenizer(words: Iterable[str], *, max_vocab: int = 256):
  """Word-level PreTrainedTokenizerFast over SPECIALS + TEMPLATE_WORDS + `words` (deduplicated, in order)."""
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers.models import WordLevel
  from transformers import PreTrainedTokenizerFast

  vocab = {}
  for w in (*SPECIALS, *TEMPLATE_WORDS, *(w.lower() for w in words)):
    vocab.setdefault(w, len(vocab))
  if len(vocab) > max_vocab:
    raise ValueError(f"tiny tokenizer has {len(vocab)} words, more than the vocabulary size {max_vocab}")
  tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", additional_special_tokens=["<image>"])
  fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
  ids = [fast.convert_tokens_to_ids(s) for s in SPECIALS]
  assert ids == list(range(len(SPECIALS))), ids  # the tiny config relies on these ids
  return fast


def probe_tokenizer():
  """The tokenizer of the granularity probe (and of the tiny demo checkpoints)."""
  from m3_jax.data import probe
  return build_tokenizer(probe.vocabulary())
