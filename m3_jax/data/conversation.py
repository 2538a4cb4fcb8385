"""Chat templates, prompt tokenization with image placeholders, and training labels.

Templates (docs/design.md, "Command line"):
  vicuna_v1  "{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"  (LLaVA-1.5 / M3)
  llava_hf   "USER: <image>\\n{q} ASSISTANT: {a}</s>..."   (llava-hf checkpoints; no system prompt)
  plain      "<image>{caption}\\n"                           (LLaVA pretraining captions)
  none       the prompt verbatim, `<image>` marking the image (inference only)

Tokenization with images follows LLaVA's `tokenizer_image_token`: split the text at `<image>`, tokenize each piece
on its own, keep BOS only on the first, and put one placeholder id per image between the pieces. The model
expands each placeholder to the chosen scale's visual tokens.

Labels: only assistant tokens and their end token `</s>` are trained (-100 elsewhere). Two implementations:
  "exact" (default)  answer boundaries from tokenizing the conversation prefix up to each boundary; verified to
                     be a prefix of the full tokenization, so the mask is right for any tokenizer.
  "llava"            LLaVA's `preprocess_v1` / `preprocess_plain` arithmetic, literally (round lengths from
                     tokenizing each round alone, `- 2` for BOS and the lone "▁" SentencePiece leaves after
                     "ASSISTANT: ", `- 1` per later round for non-legacy LLaMA tokenizers); kept for parity with
                     released training runs. Where its arithmetic disagrees with the tokenization LLaVA silently
                     masks the whole sample; we report it as a bad record instead.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from m3_jax.data.errors import BadRecord
from m3_jax.labels import IGNORE

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


@dataclasses.dataclass(frozen=True)
class Template:
  """A conversation template. `style` "two" is LLaVA's SeparatorStyle.TWO, "plain" its PLAIN."""
  name: str
  style: str                      # "two" | "plain" | "none"
  system: str = ""
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "
  sep2: str = "</s>"

  def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
    """[(role_index 0|1, message or None)] -> the conversation string (None: the generation prompt)."""
    return self.render_spans(turns)[0]

  def render_spans(self, turns: Sequence[tuple[str, str | None]]) -> tuple[str, list[tuple[int, int]]]:
    """`render`, and the character span of each assistant message as it is written: from right after its role's
    ":" (the space SentencePiece glues to the first answer word is inside) through its separator (the end token
    with style "two"). Spans come from the writing, not from searching the text: a question quoting "ASSISTANT:"
    or an answer quoting "</s>" does not move them."""
    spans = []
    if self.style == "two":
      seps = (self.sep, self.sep2)
      out = self.system + self.sep if self.system else ""
      for i, (who, msg) in enumerate(turns):
        role = self.roles[who]
        if not msg:
          out += f"{role}:"
          continue
        start = len(out) + len(role) + 1
        out += f"{role}: {msg}{seps[i % 2]}"
        if who == 1:
          spans.append((start, len(out)))
      return out, spans
    if self.style == "plain":
      return "".join((msg or "") + (self.sep if msg and who == 1 else "") for who, msg in turns), spans
    if self.style == "none":
      return "".join(msg or "" for _, msg in turns), spans
    raise ValueError(f"template {self.name!r} has unknown style {self.style!r}")


TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", "two", system=VICUNA_SYSTEM),
    "llava_hf": Template("llava_hf", "two"),
    "plain": Template("plain", "plain", sep="\n"),
    "none": Template("none", "none"),
}


def get_template(name: str | Template) -> Template:
  if isinstance(name, Template):
    return name
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)} "
                     "('auto' is resolved from the checkpoint before reaching here)")
  return TEMPLATES[name]


# ----------------------------------------------------------------------------------------------- inference


def build_prompt(template: str | Template, question: str, *, image: bool = True) -> str:
  """The generation prompt for one question, with `<image>` where the image goes (when `image`).

  >>> build_prompt("llava_hf", "What is this?")
  'USER: <image>\\nWhat is this? ASSISTANT:'
  """
  t = get_template(template)
  if t.style == "none":
    if image and IMAGE not in question:
      raise ValueError("template 'none' uses the prompt verbatim: put <image> where the image goes")
    return question
  q = place_image(question) if image else question
  if t.style == "plain":
    return q
  return t.render([(0, q), (1, None)])


def place_image(message: str) -> str:
  """LLaVA's `preprocess_multimodal`: the image goes first in its turn, followed by a newline."""
  return (IMAGE + "\n" + message.replace(IMAGE, "").strip()).strip()


def _adds_bos(tokenizer) -> bool:
  """Whether the tokenizer starts a sequence with BOS (LLaMA yes; many others no). Cached on the tokenizer."""
  cached = getattr(tokenizer, "_m3_adds_bos", None)
  if cached is not None:
    return cached
  bos = tokenizer.bos_token_id
  ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
  adds = bool(ids) and ids[0] == bos
  try:
    tokenizer._m3_adds_bos = adds
  except AttributeError:
    pass
  return adds


def _rust_tokenizer(tokenizer):
  """The `tokenizers.Tokenizer` under a transformers 5 fast tokenizer whose class keeps transformers' own encoding
  (`text_ids` can call it directly), else None."""
  return getattr(tokenizer, "_tokenizer", None) if _keeps_transformers_encoding(type(tokenizer)) else None


@functools.cache
def _keeps_transformers_encoding(cls: type) -> bool:
  try:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
  except ImportError:  # transformers 4: its own call
    return False
  return (issubclass(cls, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
          and cls.__call__ is PreTrainedTokenizerBase.__call__ and not hasattr(cls, "_switch_to_input_mode"))


def text_ids(tokenizer, text: str) -> list[int]:
  """`tokenizer(text, add_special_tokens=False)["input_ids"]`. For a transformers 5 fast tokenizer, the Rust
  tokenizer's `encode` of the text, as that call ends up doing (checked on each call: no truncation or padding set
  on it, special tokens split as the call would), without the call's Python wrapping and batch encode: 15%
  of a served request's event-loop time on the 2-core machine went to the call (py-spy)."""
  rust = _rust_tokenizer(tokenizer)
  if (rust is not None and rust.truncation is None and rust.padding is None
          and rust.encode_special_tokens == bool(tokenizer.split_special_tokens)):
    return rust.encode(text, add_special_tokens=False).ids
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_with_images(text: str, tokenizer, image_token_id: int) -> list[int]:
  """LLaVA's `tokenizer_image_token`: pieces between `<image>` tokenized alone, BOS on the first only."""
  pieces = text.split(IMAGE)
  ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
  for i, piece in enumerate(pieces):
    if i:
      ids.append(image_token_id)
    if piece:
      ids.extend(text_ids(tokenizer, piece))
  return ids


def tokenize_prompt(template: str | Template, question: str, tokenizer, image_token_id: int, *,
                    image: bool = True) -> np.ndarray:
  """Inference: question -> int32[T] prompt ids with one placeholder per image."""
  return np.asarray(tokenize_with_images(build_prompt(template, question, image=image), tokenizer,
                                         image_token_id), np.int32)


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Tokenized:
  """One training sample: int32[T] ids (one placeholder per image) and int32[T] labels (-100 = ignored)."""
  input_ids: np.ndarray
  labels: np.ndarray
  num_images: int
  truncated: bool = False

  @property
  def num_labels(self) -> int:
    return int((self.labels != IGNORE).sum())


def check_conversations(conversations: Any, has_image: bool) -> list[str]:
  """Problems with a LLaVA `conversations` list (empty when fine). Names what was expected."""
  if not isinstance(conversations, list) or not conversations:
    return ["no turns: 'conversations' must be a non-empty list of {from, value} turns"]
  problems = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
      problems.append(f"turn {i} is malformed: expected {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}")
      continue
    want = HUMAN_ROLES if i % 2 == 0 else GPT_ROLES
    if turn["from"] not in want:
      where = "the first turn" if i == 0 else f"turn {i}"
      problems.append(f"{where} is from {turn['from']!r}, expected {want[0]!r} (turns alternate human, gpt)")
    elif i % 2 == 1 and not turn["value"].strip():
      problems.append(f"turn {i}: empty answer")
  if problems:
    return problems
  if len(conversations) % 2:
    problems.append(f"{len(conversations)} turns: the last human turn has no answer")
  n = sum(t["value"].count(IMAGE) for t in conversations)
  if has_image and n == 0:
    problems.append("missing <image>: the record has an image but no turn contains <image>")
  elif has_image and n > 1:
    problems.append(f"extra <image>: {n} placeholders for one image")
  elif not has_image and n:
    problems.append(f"extra <image>: {n} placeholder(s) but the record has no image")
  elif has_image and any(IMAGE in t["value"] for t in conversations[1:]):
    problems.append("<image> is not in the first (human) turn")
  return problems


def conversation_text(conversations: list[dict], template: Template, has_image: bool) -> str:
  return conversation_spans(conversations, template, has_image)[0]


def conversation_spans(conversations: list[dict], template: Template, has_image: bool
                       ) -> tuple[str, list[tuple[int, int]]]:
  """The conversation string and the character spans trained in it: each answer through its end token (style
  "two", `Template.render_spans`), or the caption after the image (style "plain")."""
  turns = []
  for i, t in enumerate(conversations):
    msg = t["value"]
    if has_image and IMAGE in msg:
      msg = place_image(msg)
    turns.append((i % 2, msg))
  if template.style == "plain":
    # LLaVA's preprocess_plain: the human turn is reduced to the image, the caption follows.
    if len(turns) != 2:
      raise ValueError(f"template 'plain' takes one (image, caption) pair, got {len(turns)} turns")
    start = len(IMAGE) if has_image else 0
    text = (IMAGE if has_image else "") + turns[1][1] + template.sep
    return text, [(start, len(text))]
  return template.render_spans(turns)


def tokenize_conversation(conversations: list[dict], tokenizer, *, template: str | Template = "vicuna_v1",
                          image_token_id: int, has_image: bool, max_length: int | None = None,
                          max_scale: int = 1, labels: str = "exact", record_id: str = "?") -> Tokenized:
  """A LLaVA `conversations` list -> ids and labels; raises BadRecord naming `record_id` and the problem.

  Truncation: the placeholder counts as `max_scale` tokens (the largest trained scale), so every scale sees
  the same labels; a sample whose labels would all be cut away is a BadRecord, never trained on empty.
  """
  t = get_template(template)
  if t.style == "none":
    raise ValueError("template 'none' is for inference only; train with vicuna_v1, llava_hf or plain")
  problems = check_conversations(conversations, has_image)
  if not problems and t.style == "plain" and len(conversations) != 2:
    problems = [f"template 'plain' takes one (image, caption) pair, got {len(conversations)} turns"]
  if problems:
    raise BadRecord(record_id, "; ".join(problems))
  text, spans = conversation_spans(conversations, t, has_image)
  ids = tokenize_with_images(text, tokenizer, image_token_id)
  if labels == "exact":
    lab = _labels_exact(text, spans, ids, tokenizer, image_token_id, record_id)
  elif labels == "llava":
    lab = _labels_llava(text, ids, t, tokenizer, image_token_id, has_image, record_id)
  else:
    raise ValueError(f"labels={labels!r} is not 'exact' or 'llava'")
  out = Tokenized(np.asarray(ids, np.int32), np.asarray(lab, np.int32), int(has_image))
  if not out.num_labels:
    raise BadRecord(record_id, "no answer tokens to train on")
  if max_length is not None:
    out = truncate(out, max_length, max_scale, image_token_id, record_id)
  return out


def visual_length(ids: np.ndarray, image_token_id: int, scale: int) -> int:
  """Sequence length once every placeholder is expanded to `scale` visual tokens."""
  n = int((np.asarray(ids) == image_token_id).sum())
  return len(ids) + n * (scale - 1)


def truncate(sample: Tokenized, max_length: int, max_scale: int, image_token_id: int,
             record_id: str = "?") -> Tokenized:
  """Cuts ids/labels so that the sequence, with each placeholder expanded to `max_scale`, fits `max_length`."""
  extra = sample.num_images * (max_scale - 1)
  keep = max_length - extra
  if len(sample.input_ids) <= keep:
    return sample
  where = np.flatnonzero(sample.input_ids == image_token_id)
  if keep <= 0 or (len(where) and where[-1] >= keep):
    raise BadRecord(record_id, f"max_length {max_length} cannot hold the image ({max_scale} visual tokens "
                    f"at position {int(where[-1]) if len(where) else 0})")
  cut = Tokenized(sample.input_ids[:keep], sample.labels[:keep], sample.num_images, truncated=True)
  if not cut.num_labels:
    raise BadRecord(record_id, f"answer cut away by truncation: the first answer token is at position "
                    f"{int(np.argmax(sample.labels != IGNORE)) + extra} counting {max_scale} visual tokens, "
                    f"max_length is {max_length}")
  return cut


def _labels_exact(text: str, spans: list[tuple[int, int]], ids: list[int], tokenizer, image_token_id: int,
                  record_id: str) -> list[int]:
  """Labels on each trained character span of `text` (`conversation_spans`), from prefix lengths."""

  def prefix_len(k: int) -> int:
    pre = tokenize_with_images(text[:k], tokenizer, image_token_id)
    if pre != ids[:len(pre)]:
      raise BadRecord(record_id, f"tokenization mismatch: the tokens of the conversation up to character {k} "
                      f"({text[max(0, k - 20):k]!r}) are not a prefix of its full tokenization")
    return len(pre)

  lab = [IGNORE] * len(ids)
  for start, end in spans:
    a, b = prefix_len(start), prefix_len(end)
    lab[a:b] = ids[a:b]
  return lab


def _labels_llava(text: str, ids: list[int], t: Template, tokenizer, image_token_id: int, has_image: bool,
                  record_id: str) -> list[int]:
  """LLaVA's preprocess_v1 (style "two") / preprocess_plain arithmetic, literally."""
  target = list(ids)

  def n_tokens(s: str) -> int:
    if has_image:
      return len(tokenize_with_images(s, tokenizer, image_token_id))
    return len(([tokenizer.bos_token_id] if _adds_bos(tokenizer) else [])
               + tokenizer(s, add_special_tokens=False)["input_ids"])

  if t.style == "plain":
    n = n_tokens(IMAGE if has_image else "")
    target[:n] = [IGNORE] * n
    return target
  sep = t.sep + t.roles[1] + ": "
  # tokenizers >= 0.14 with a non-legacy LLaMA tokenizer: later rounds lose the prefix space (LLaVA's -1).
  non_legacy = not getattr(tokenizer, "legacy", True)
  cur = 1
  target[:cur] = [IGNORE]
  for i, rou in enumerate(text.split(t.sep2)):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = n_tokens(rou)
    instruction_len = n_tokens(parts[0]) - 2
    if i != 0 and non_legacy:
      round_len -= 1
      instruction_len -= 1
    target[cur:cur + instruction_len] = [IGNORE] * max(0, min(instruction_len, len(target) - cur))
    cur += round_len
  target[cur:] = [IGNORE] * max(0, len(target) - cur)
  if cur != len(ids):
    raise BadRecord(record_id, f"tokenization mismatch: LLaVA's round arithmetic covers {cur} tokens, the "
                    f"conversation has {len(ids)} (LLaVA would train on nothing here; use labels='exact')")
  return target
