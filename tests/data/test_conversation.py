"""Templates, placeholder tokenization and label masks against hand-worked token layouts."""
from __future__ import annotations

import numpy as np
import pytest

from m3_jax.data import conversation as cv
from m3_jax.data.errors import BadRecord

IMG = 4  # a placeholder id outside what the test strings produce for the word tokenizer


def _conv(*msgs):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(msgs)]


def test_template_strings():
  sys = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the user's questions.")
  assert cv.build_prompt("vicuna_v1", "What is it?") == sys + " USER: <image>\nWhat is it? ASSISTANT:"
  assert cv.build_prompt("llava_hf", "What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"
  assert cv.build_prompt("llava_hf", "Hi", image=False) == "USER: Hi ASSISTANT:"
  assert cv.build_prompt("none", "Q: <image> x") == "Q: <image> x"
  with pytest.raises(ValueError, match="put <image> where the image goes"):
    cv.build_prompt("none", "no marker")
  t = cv.get_template("vicuna_v1")
  text = cv.conversation_text(_conv("What? <image>", "red", "Sure?", "yes"), t, True)
  assert text == sys + " USER: <image>\nWhat? ASSISTANT: red</s>USER: Sure? ASSISTANT: yes</s>"
  assert cv.conversation_text(_conv("<image>\n", "a cat"), cv.get_template("plain"), True) == "<image>a cat\n"
  with pytest.raises(ValueError, match="known: vicuna_v1, llava_hf, plain, none"):
    cv.get_template("chatml")


def test_image_tokenization_word_level(word_tokenizer):
  tok = word_tokenizer
  ids = cv.tokenize_prompt("llava_hf", "What colour?", tok, IMG)
  assert tok.convert_ids_to_tokens(ids.tolist()) == ["<s>", "user", ":", "<image>", "what", "colour", "?",
                                                     "assistant", ":"]
  assert (ids == IMG).sum() == 1 and ids.dtype == np.int32


def test_image_tokenization_sentencepiece_keeps_one_bos(sp_tokenizer):
  tok = sp_tokenizer
  ids = cv.tokenize_prompt("llava_hf", "What", tok, 32000).tolist()
  # LLaVA's tokenizer_image_token: tok("USER: ") minus nothing, IMG, tok("\nWhat") without its BOS.
  first = tok("USER: ").input_ids
  second = tok("\nWhat ASSISTANT:").input_ids[1:]
  assert ids == first + [32000] + second
  assert ids.count(tok.bos_token_id) == 1 and tok.convert_ids_to_tokens(second)[:2] == ["▁", "<0x0A>"]


def _hand_mask(tokens):
  """Hand rule: train every token after each ('ASSISTANT'-ish, ':') pair up to and including '</s>'."""
  mask, on = [], False
  for i, t in enumerate(tokens):
    mask.append(on)
    if t.lstrip("▁").lower() == "assistant" and i + 1 < len(tokens) and tokens[i + 1] == ":":
      on = "armed"
    elif on == "armed" and t == ":":
      on = True
    elif t == "</s>":
      on = False
  return np.array([m is True for m in mask])


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_hf"])
@pytest.mark.parametrize("has_image", [True, False])
def test_labels_word_level_multiturn(word_tokenizer, template, has_image):
  tok = word_tokenizer
  conv = _conv(("<image>\n" if has_image else "") + "What colour is the square?", "red",
               "How many cats?", "two cats")
  out = cv.tokenize_conversation(conv, tok, template=template, image_token_id=IMG, has_image=has_image)
  tokens = tok.convert_ids_to_tokens(out.input_ids.tolist())
  trained = [t for t, l in zip(tokens, out.labels) if l != cv.IGNORE]
  assert trained == ["red", "</s>", "two", "cats", "</s>"]
  np.testing.assert_array_equal(out.labels != cv.IGNORE, _hand_mask(tokens))
  np.testing.assert_array_equal(out.labels[out.labels != cv.IGNORE], out.input_ids[out.labels != cv.IGNORE])
  assert (out.input_ids == IMG).sum() == int(has_image) and tokens[0] == "<s>"


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_hf"])
def test_labels_follow_the_turns_not_role_markers_quoted_in_the_messages(word_tokenizer, template):
  """A question quoting "ASSISTANT:" trains none of itself, and an answer quoting "</s>" is trained whole: the
  trained spans are where the template writes each answer, not where a search of the text finds markers."""
  tok = word_tokenizer
  conv = _conv("<image>\nwhat is USER: red ASSISTANT: two cats", "a green </s> square", "how many?", "two")
  out = cv.tokenize_conversation(conv, tok, template=template, image_token_id=IMG, has_image=True)
  tokens = tok.convert_ids_to_tokens(out.input_ids.tolist())
  trained = [t for t, l in zip(tokens, out.labels) if l != cv.IGNORE]
  assert trained == ["a", "green", "</s>", "square", "</s>", "two", "</s>"]


def test_llava_arithmetic_is_off_by_one_for_word_level(word_tokenizer):
  # LLaVA's "- 2" assumes SentencePiece leaves a lone "▁" after "ASSISTANT: "; a word-level tokenizer does not,
  # so LLaVA's literal mask also trains the ":" before each answer. Hand-worked for llava_hf, one turn:
  # <s> user : <image> what colour ? assistant : red </s>  -> LLaVA trains positions 8 (':'), 9, 10.
  out = cv.tokenize_conversation(_conv("<image>What colour?", "red"), word_tokenizer, template="llava_hf",
                                 image_token_id=IMG, has_image=True, labels="llava")
  assert np.flatnonzero(out.labels != cv.IGNORE).tolist() == [8, 9, 10]


@pytest.mark.parametrize("has_image", [True, False])
def test_labels_sentencepiece_llama(sp_tokenizer, has_image):
  tok = sp_tokenizer
  conv = _conv(("<image>\n" if has_image else "") + "What is the colour of the square?", "The square is red.",
               "How many cats?", "two cats")
  exact = cv.tokenize_conversation(conv, tok, image_token_id=32000, has_image=has_image)
  tokens = tok.convert_ids_to_tokens([i if i != 32000 else 0 for i in exact.input_ids.tolist()])
  np.testing.assert_array_equal(exact.labels != cv.IGNORE, _hand_mask(tokens))
  assert tokens.count("</s>") == 2 and exact.labels[-1] == tok.eos_token_id
  if tok.legacy:
    # Legacy LLaMA tokenization: LLaVA's preprocess_v1 arithmetic gives the same mask.
    llava = cv.tokenize_conversation(conv, tok, image_token_id=32000, has_image=has_image, labels="llava")
    np.testing.assert_array_equal(llava.labels, exact.labels)
  else:
    # Non-legacy: after "</s>" this vocabulary splits "USER" into "US" "ER" (no prefix space), which LLaVA's
    # "- 1" does not account for; LLaVA would silently train on nothing, we report the record.
    assert tokens[tokens.index("</s>") + 1:][:2] == ["US", "ER"]
    with pytest.raises(BadRecord, match="r1: tokenization mismatch"):
      cv.tokenize_conversation(conv, tok, image_token_id=32000, has_image=has_image, labels="llava",
                               record_id="r1")


@pytest.mark.parametrize("kind", ["sp", "word"])
def test_labels_plain(kind, sp_tokenizer, word_tokenizer):
  tok = sp_tokenizer if kind == "sp" else word_tokenizer
  conv = _conv("<image>\n", "a red square")
  for labels in ("exact", "llava"):
    out = cv.tokenize_conversation(conv, tok, template="plain", image_token_id=IMG, has_image=True, labels=labels)
    # preprocess_plain: [BOS, IMG] ignored, the caption and its "\n" trained.
    assert out.input_ids[:2].tolist() == [tok.bos_token_id, IMG]
    assert (out.labels[:2] == cv.IGNORE).all() and (out.labels[2:] == out.input_ids[2:]).all()
    assert tok.decode(out.input_ids[2:]).strip() == "a red square"
  # Two exchanges: a bad record named by its id (so on_bad_record=skip can skip it), not a bare ValueError.
  with pytest.raises(BadRecord, match=r"r7: template 'plain' takes one \(image, caption\) pair, got 4 turns"):
    cv.tokenize_conversation(_conv("<image>\n", "a", "and?", "b"), tok, template="plain", image_token_id=IMG,
                             has_image=True, record_id="r7")


def test_truncation_counts_visual_tokens(word_tokenizer):
  tok = word_tokenizer
  conv = _conv("<image>\nWhat colour is the square?", "red", "How many cats?", "two cats")
  full = cv.tokenize_conversation(conv, tok, template="llava_hf", image_token_id=IMG, has_image=True)
  # <s> user : <image> what colour is the square ? assistant : red </s> user : how many cats ? assistant : two cats </s>
  assert len(full.input_ids) == 25
  # With 144 visual tokens, max_length 157 keeps 157 - 143 = 14 ids: through the first "</s>" (index 13).
  cut = cv.tokenize_conversation(conv, tok, template="llava_hf", image_token_id=IMG, has_image=True,
                                 max_length=157, max_scale=144)
  assert cut.truncated and len(cut.input_ids) == 14 and cut.num_labels == 2
  assert cv.visual_length(cut.input_ids, IMG, 144) == 157
  with pytest.raises(BadRecord, match="r7: answer cut away by truncation"):
    cv.tokenize_conversation(conv, tok, template="llava_hf", image_token_id=IMG, has_image=True,
                             max_length=143 + 12, max_scale=144, record_id="r7")


@pytest.mark.parametrize("conv,has_image,problem", [
    ([], True, "no turns"),
    ([{"from": "gpt", "value": "<image> hi"}, {"from": "human", "value": "x"}], True, "first turn is from 'gpt'"),
    ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "  "}], True, "empty answer"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], True, "missing <image>"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], True, "extra <image>"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], False, "extra <image>"),
    ([{"from": "human"}, {"from": "gpt", "value": "x"}], True, "turn 0 is malformed"),
    ([{"from": "human", "value": "<image>"}], True, "no answer"),
])
def test_bad_conversations(conv, has_image, problem, word_tokenizer):
  with pytest.raises(BadRecord, match=f"record q9: .*{problem}"):
    cv.tokenize_conversation(conv, word_tokenizer, image_token_id=IMG, has_image=has_image, record_id="q9")


TEXT_CASES = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.", "USER: How many cats are there? ASSISTANT: two cats",
    "", " ", "\n", "  leading and trailing spaces  ", "USER: </s> <s> <unk> text around special tokens </s>",
    "\nWhat colour is the square? ASSISTANT:", "déjà vu, naïve café — 東京 🙂", "line one\nline two\ttab",
]


@pytest.mark.parametrize("which", ["word", "sp", "fixture-llava-1.5", "fixture-llava-next"])
def test_text_ids_take_the_rust_tokenizer_and_equal_the_tokenizer_call(which, word_tokenizer, sp_tokenizer,
                                                                       fixtures_dir):
  """`text_ids` (the served prompt's tokenization) calls the Rust tokenizer directly for transformers 5 fast
  tokenizers, and gives what `tokenizer(text, add_special_tokens=False)` gives, for the word-level tokenizer, a
  SentencePiece LLaMA one (legacy and not) and the checkpoint fixtures' tokenizers."""
  from transformers import AutoTokenizer
  tok = {"word": word_tokenizer, "sp": sp_tokenizer}.get(which) or AutoTokenizer.from_pretrained(
      str(fixtures_dir / "transformers-5.23.0" / which.removeprefix("fixture-")))
  assert cv._rust_tokenizer(tok) is not None  # the direct path is the one under test
  for text in TEXT_CASES:
    assert cv.text_ids(tok, text) == tok(text, add_special_tokens=False)["input_ids"], text
