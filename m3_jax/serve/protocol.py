"""The wire format: pydantic models of OpenAI's chat-completion request, response, stream chunk and error, plus
m3's per-request visual budget (`visual_tokens`, `max_visual_tokens`) and the scale used in the answer."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**32 - 1  # jax.random.key folds larger seeds silently; refuse them instead


class ImageURL(BaseModel):
  url: str
  detail: str | None = None


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ImagePart(BaseModel):
  type: Literal["image_url"]
  image_url: ImageURL


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  content: Union[str, list[Union[TextPart, ImagePart]]]


class StreamOptions(BaseModel):
  include_usage: bool = False


class ChatRequest(BaseModel):
  """OpenAI's fields that m3 honours; others (penalties, logprobs...) are accepted and ignored, as vLLM does."""
  model_config = ConfigDict(extra="ignore")

  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(default=None, ge=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy, as `m3 generate` (OpenAI's default is 1)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(default=1, ge=1, le=1)
  # m3: one of the checkpoint's scales (LLaVA-NeXT: tokens per crop), or "auto" (a fitted router chooses).
  visual_tokens: int | Literal["auto"] | None = None
  # m3: the largest scale within this cap (with "auto": caps the router's choice).
  max_visual_tokens: int | None = Field(default=None, ge=1)


class Usage(BaseModel):
  prompt_tokens: int       # sequence positions of the prompt, the image's visual tokens included
  completion_tokens: int
  total_tokens: int
  visual_tokens: int       # the positions the image took (LLaVA-NeXT: every crop plus row newlines)


class AssistantMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class Choice(BaseModel):
  index: int = 0
  message: AssistantMessage
  finish_reason: Literal["stop", "length"]


def completion_id() -> str:
  return f"chatcmpl-{uuid.uuid4().hex}"


class ChatResponse(BaseModel):
  id: str = Field(default_factory=completion_id)
  object: Literal["chat.completion"] = "chat.completion"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[Choice]
  usage: Usage
  scale: int | None        # the scale used (None: no image); with "auto", the router's choice


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class StreamChoice(BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[StreamChoice]
  usage: Usage | None = None
  scale: int | None = None  # on the chunk that carries finish_reason


class ErrorInfo(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorInfo


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "m3-jax"
  scales: list[int]        # the visual-token budgets a request may choose
  router: bool             # whether visual_tokens="auto" is available


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ApiError(Exception):
  """A request the server answers with `status` and OpenAI's error body."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.headers = status, headers or {}
    self.info = ErrorInfo(message=message, type=type, param=param, code=code)
