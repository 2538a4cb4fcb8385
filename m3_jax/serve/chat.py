"""A chat request -> what the engine runs: prompt ids from the messages in the checkpoint's template, the image's
URL, the visual-token scale (`visual_tokens`, `max_visual_tokens`, or "auto" through a router), and the
context-length check."""
from __future__ import annotations

import dataclasses

import numpy as np

from m3_jax.data import conversation
from m3_jax.eval.generate import MAX_NEW_TOKENS
from m3_jax.serve.protocol import ApiError, ChatRequest, ImagePart

DEFAULT_MAX_TOKENS = MAX_NEW_TOKENS  # as `m3 generate --max-new-tokens`


@dataclasses.dataclass(frozen=True)
class Auto:
  """visual_tokens="auto": the router picks the scale at batch time, at most `cap` tokens."""
  cap: int | None


@dataclasses.dataclass
class Prompt:
  ids: np.ndarray            # int32[T], one image placeholder when image_url is set
  image_url: str | None
  scale: int | Auto | None   # None: text only
  max_tokens: int
  stops: tuple[str, ...]


def prepare(req: ChatRequest, model, has_router: bool) -> Prompt:
  """Raises a 400 ApiError naming the field for every request the model cannot answer as asked."""
  system, turns, image_url = split_messages(req)
  scale = choose_scale(req, model.scales, has_router) if image_url is not None else None
  ids = prompt_ids(model, system, turns, image_url is not None)
  max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
  stops = tuple(unicode_text(s, "stop") for s in ((req.stop,) if isinstance(req.stop, str) else req.stop or ()))
  if len(stops) > 4 or any(not s for s in stops):
    raise ApiError(400, f"stop: up to 4 non-empty strings, got {list(stops)}", param="stop")
  placeholders = int(np.sum(ids == model.config.image_token_id))
  if placeholders != (image_url is not None):  # a template or tokenizer that makes one of its own, say
    raise ApiError(400, f"messages: the prompt has {placeholders} image placeholders for "
                   f"{int(image_url is not None)} image(s)", param="messages")
  check_context(model, ids, scale, max_tokens)
  return Prompt(ids, image_url, scale, max_tokens, stops)


def text_chars(req: ChatRequest) -> int:
  """The characters of text the request's messages carry (images not counted)."""
  return sum(len(m.content) if isinstance(m.content, str) else
             sum(len(p if isinstance(p, str) else p.text) for p in m.content if not isinstance(p, ImagePart))
             for m in req.messages)


def unicode_text(text: str, param: str) -> str:
  """`text`, or a 400 when it holds a lone UTF-16 surrogate: JSON may escape one ("\\ud800"), Python's json keeps
  it, and no tokenizer takes it."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ApiError(400, f"{param}: not valid Unicode text, a lone surrogate {text[e.start]!r} at character {e.start}",
                   param=param.split("[")[0], code="invalid_text") from None
  return text


def without_placeholders(text: str) -> str:
  """`text` with every literal `<image>` removed, also those that a removal joins (`<<image>image>`)."""
  while conversation.IMAGE in text:
    text = text.replace(conversation.IMAGE, "")
  return text.strip()


def split_messages(req: ChatRequest) -> tuple[str | None, list[tuple[int, str]], str | None]:
  """-> (system text, [(0 user | 1 assistant, text)], the one image's URL). The image goes first in its turn,
  as LLaVA places it; literal `<image>` text is removed so that a user cannot add placeholders."""
  system, turns, image_url = None, [], None
  for i, m in enumerate(req.messages):
    parts = [m.content] if isinstance(m.content, str) else m.content
    texts = []
    for part in parts:
      if isinstance(part, ImagePart):
        if m.role != "user":
          raise ApiError(400, f"messages[{i}]: images go in user messages, not {m.role!r}", param="messages")
        if image_url is not None:
          raise ApiError(400, f"messages[{i}]: a second image; this model takes one image per request",
                         param="messages", code="too_many_images")
        image_url = part.image_url.url
      else:
        texts.append(part if isinstance(part, str) else part.text)
    text = without_placeholders(unicode_text("\n".join(texts), f"messages[{i}]"))
    if m.role == "system":
      if i != 0:
        raise ApiError(400, f"messages[{i}]: a system message must come first", param="messages")
      system = text
      continue
    who = 0 if m.role == "user" else 1
    if turns and turns[-1][0] == who or not turns and who == 1:
      raise ApiError(400, f"messages[{i}]: user and assistant messages must alternate, starting with user",
                     param="messages")
    turns.append((who, text))
  if not turns or turns[-1][0] != 0:
    raise ApiError(400, "messages: the last message must be the user's", param="messages")
  return system, turns, image_url


def prompt_ids(model, system: str | None, turns: list[tuple[int, str]], has_image: bool) -> np.ndarray:
  if system is None and len(turns) == 1:  # the path of `m3 generate` and m3_jax.load(...).generate
    try:
      return model.prompt_ids(turns[0][1], has_image)
    except ValueError as e:
      raise ApiError(400, f"messages: {e}", param="messages") from None
  template = conversation.get_template(model.template)
  if template.style != "two":
    raise ApiError(400, f"messages: the checkpoint's template {template.name!r} takes one user message and no "
                   "system message", param="messages")
  if system is not None:
    template = dataclasses.replace(template, system=system)
  # The image goes in the first user turn (LLaVA's multi-turn data has it there).
  rendered = [(who, conversation.place_image(text) if has_image and k == 0 else text) for k, (who, text)
              in enumerate(turns)]
  text = template.render(rendered + [(1, None)])
  return np.asarray(conversation.tokenize_with_images(text, model.tokenizer, model.config.image_token_id), np.int32)


def choose_scale(req: ChatRequest, scales: tuple[int, ...], has_router: bool) -> int | Auto:
  want, cap = req.visual_tokens, req.max_visual_tokens
  chain = ", ".join(str(s) for s in sorted(scales))
  if want == "auto":
    if not has_router:
      raise ApiError(400, 'visual_tokens "auto": this checkpoint has no router; fit one with `m3 router fit` '
                     f"or choose one of {chain}", param="visual_tokens", code="no_router")
    if cap is not None and cap < min(scales):
      raise ApiError(400, f"max_visual_tokens {cap} is below the smallest scale ({chain})", param="max_visual_tokens")
    return Auto(cap)
  if want is not None:
    if want not in scales:
      raise ApiError(400, f"visual_tokens {want} is not one of this checkpoint's scales {chain}",
                     param="visual_tokens", code="invalid_scale")
    if cap is not None and want > cap:
      raise ApiError(400, f"visual_tokens {want} exceeds max_visual_tokens {cap}", param="max_visual_tokens")
    return want
  if cap is not None:
    fits = [s for s in scales if s <= cap]
    if not fits:
      raise ApiError(400, f"max_visual_tokens {cap} is below the smallest scale ({chain})",
                     param="max_visual_tokens", code="invalid_scale")
    return max(fits)
  return max(scales)


def check_context(model, ids: np.ndarray, scale: int | Auto | None, max_tokens: int, visual: int | None = None):
  """LLaVA-1.5: an image takes `scale` positions; `visual` (LLaVA-NeXT, known once its crops are cut) overrides."""
  if visual is None:
    visual = 0 if scale is None else (scale if isinstance(scale, int) else (scale.cap or max(model.scales)))
  prompt = len(ids) - (scale is not None) + visual
  limit = model.config.llm.max_len
  if prompt + max_tokens > limit:
    raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request needs {prompt} for "
                   f"the prompt ({visual} of them visual) + {max_tokens} to generate", param="messages",
                   code="context_length_exceeded")
