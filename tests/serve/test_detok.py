"""Streamed text: the deltas concatenate to exactly the non-streamed answer, also when a stop string spans
several tokens and the text before it ends in a space."""
import types

from m3_jax.serve.detok import TextStream, answer_text

PIECES = {1: "The", 2: " answer", 3: " is", 4: " 4", 5: " USER", 6: ":", 7: " more"}
TOKENIZER = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(PIECES[i] for i in ids))


def streamed(tokens: list[int], stops: tuple[str, ...]) -> str:
  stream = TextStream(TOKENIZER, stops)
  sent = "".join(stream.delta(tokens[:n]) for n in range(1, len(tokens) + 1))
  return sent + stream.final(answer_text(TOKENIZER, tokens, stops)[0])


def test_a_stop_string_split_across_tokens():
  tokens = [1, 2, 3, 4, 5, 6, 7]
  assert answer_text(TOKENIZER, tokens, ("USER:",)) == ("The answer is 4", True)
  assert streamed(tokens, ("USER:",)) == "The answer is 4"


def test_a_held_back_prefix_that_is_not_a_stop_is_sent():
  tokens = [1, 2, 3, 4, 5, 7]  # " USER" then " more": "USER" was only the start of a stop
  assert streamed(tokens, ("USER:",)) == answer_text(TOKENIZER, tokens, ("USER:",))[0] == "The answer is 4 USER more"
