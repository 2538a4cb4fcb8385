"""Generated ids -> the answer's text, with stop strings, and incrementally for streams: the deltas a stream sends
concatenate to exactly the text a non-streamed answer carries."""
from __future__ import annotations


def answer_text(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
  """-> (text, whether a stop string ended it): the text as `m3_jax.load(...).generate` gives it (decoded without
  special tokens, stripped), cut before the first stop string."""
  text = tokenizer.decode(tokens, skip_special_tokens=True)
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  return (text[:cut] if cut >= 0 else text).strip(), cut >= 0


class TextStream:
  """Holds back what may still change: trailing whitespace (the answer is stripped), an incomplete UTF-8
  character (decoded as U+FFFD) and a tail that could begin a stop string."""

  def __init__(self, tokenizer, stops: tuple[str, ...]):
    self.tokenizer, self.stops, self.sent = tokenizer, stops, ""

  def delta(self, tokens: list[int]) -> str:
    text, stopped = answer_text(self.tokenizer, tokens, self.stops)
    if stopped:
      return ""  # `final` sends the rest
    text = text.rstrip("\ufffd").rstrip()
    hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return self._advance(text[:len(text) - hold].rstrip())  # the answer ends stripped before a stop string too

  def final(self, text: str) -> str:
    return self._advance(text)

  def _advance(self, text: str) -> str:
    if not text.startswith(self.sent):  # a later token changed earlier text: wait (the final text decides)
      return ""
    out, self.sent = text[len(self.sent):], text
    return out
