"""The HTTP routes: `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /health`,
`GET /metrics`; every error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from m3_jax.data import image as image_lib
from m3_jax.eval.generate import replicas
from m3_jax.serve import chat, images
from m3_jax.serve.metrics import Metrics
from m3_jax.serve.protocol import (ApiError, AssistantMessage, ChatChunk, ChatRequest, ChatResponse, Choice, Delta,
                                   ErrorResponse, ModelCard, ModelList, StreamChoice, Usage, completion_id)
from m3_jax.serve.scheduler import Job, Result, Scheduler


LONG_PROMPT_CHARS = 20_000
# A data: URI of at most INLINE_URI_CHARS whose image has at most INLINE_IMAGE_PIXELS is decoded and preprocessed
# on the event loop (~1 ms at 128 x 128 on this 2-core machine); anything else (larger, a local file, a URL to
# refuse) in a worker thread. A hop costs ~1.5 ms here, and while eight requests wait on the pool their hops
# serialize: 6-11 ms of a closed-loop batch's turnaround on tiny. The length bound comes first, before any base64
# or header work, so a large payload, or a small one whose PNG text chunks inflate, cannot hold the loop for long.
# The preprocessing of an inline image must stay as small too (`image_lib.work_pixels`: at most what LLaVA's 336-pixel
# CLIP input costs); a thin image pads to a square of its longer side: 16384 x 1 is 256 times 128 x 128 decoded.
INLINE_URI_CHARS = 16 * 1024
INLINE_IMAGE_PIXELS = 128 * 128
INLINE_WORK_PIXELS = 336 * 336


def create_app(model, *, name: str, max_batch: int = 8, max_queue: int = 64, batch_wait_ms: float = 5.0,
               request_timeout: float = 600.0, allowed_image_dir: str | pathlib.Path | None = None,
               max_image_pixels: int = 4096 * 4096, router=None, batching: str = "static",
               data_parallel: int = 1) -> FastAPI:
  """`model`: an `m3_jax.load(...)` model. `router`: what answers visual_tokens="auto" (default: the model's
  `router` attribute, which the router issue's loader sets; None refuses "auto" with a 400). `data_parallel`: engine
  replicas on the first that many devices, each batch split between them (`generate.replicas`)."""
  router = router if router is not None else getattr(model, "router", None)
  metrics = Metrics()
  engines = replicas(model.engine, data_parallel) if data_parallel != 1 else None
  scheduler = Scheduler(model, metrics, max_batch=max_batch, max_queue=max_queue,
                        batch_wait_s=batch_wait_ms / 1000, router=router, batching=batching, engines=engines)
  allowed = pathlib.Path(allowed_image_dir) if allowed_image_dir is not None else None
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    scheduler.start()
    yield
    # uvicorn has stopped accepting and waited for the requests in flight (SIGTERM): end the worker.
    await run_in_threadpool(scheduler.stop)

  app = FastAPI(title="m3 serve", lifespan=lifespan)
  app.state.scheduler, app.state.metrics = scheduler, metrics

  def error(e: ApiError) -> JSONResponse:
    metrics.requests.labels(str(e.status)).inc()
    return JSONResponse(ErrorResponse(error=e.info).model_dump(), status_code=e.status, headers=e.headers)

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    return error(e)

  @app.exception_handler(RequestValidationError)
  async def invalid(request, e: RequestValidationError):
    first = e.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
      return error(ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                            code="invalid_json"))
    return error(ApiError(400, f"{where or 'body'}: {first['msg']}" + (f" ({len(e.errors())} errors)" if
                          len(e.errors()) > 1 else ""), param=where or None, code=first.get("type")))

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    return error(ApiError(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                          "invalid_request_error"))

  @app.exception_handler(Exception)
  async def unexpected(request, e: Exception):  # a bug, not the request's fault: still OpenAI's error shape
    return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

  @app.get("/health")
  async def health():
    if scheduler.stopping:
      return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def get_metrics():
    return Response(metrics.render(), media_type=metrics.content_type)

  @app.get("/v1/models")
  async def models():
    return ModelList(data=[ModelCard(id=name, created=created, scales=sorted(model.scales),
                                     router=router is not None)])

  llava15 = model.config.type == "llava15"

  def model_input(img, label: str):
    """LLaVA-1.5: its CLIP pixels, or a 400 when preprocessing would make an image over --max-image-pixels (an
    extreme aspect ratio); LLaVA-NeXT cuts its crops at batch time, from a size its grid bounds."""
    if not llava15:
      return None, img
    try:
      return image_lib.preprocess(img, model.image_cfg, aspect=model.aspect, max_pixels=max_image_pixels,
                                  name=label), None
    except image_lib.ImageError as e:
      raise images.bad(str(e), "image_too_large") from None

  def load_image(src, label: str):
    return model_input(images.load(src, label, max_image_pixels), label)

  def resolve_image(url: str):
    return load_image(*images.source(url, allowed))

  def inline(size: tuple[int, int]) -> bool:
    return size[0] * size[1] <= INLINE_IMAGE_PIXELS and (
        not llava15 or image_lib.work_pixels(*size, model.image_cfg, model.aspect) <= INLINE_WORK_PIXELS)

  async def image_of(url: str):
    """(CLIP pixels float32[H, W, 3], None) for LLaVA-1.5, (None, the PIL image) for LLaVA-NeXT; 400 if bad."""
    if len(url) <= INLINE_URI_CHARS and url[:5].lower() == "data:":
      src, label = images.source(url, allowed)
      head = images.header(src)
      if head is None or inline(head.size):  # (None: load names the problem)
        return load_image(src if head is None else head, label)
      return await run_in_threadpool(load_image, head, label)
    return await run_in_threadpool(resolve_image, url)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: Request):
    start = time.monotonic()
    deadline = start + request_timeout
    if req.model is not None and req.model != name:
      raise ApiError(404, f"model {req.model!r} is not served here; this server serves {name!r}",
                     type="not_found_error", param="model", code="model_not_found")
    # A long prompt is tokenized off the event loop, which streams and watches the other requests meanwhile; a
    # short one inline (a thread hop cost ~1.5 ms a request on this 2-core machine, a quarter of its HTTP work).
    if chat.text_chars(req) > LONG_PROMPT_CHARS:
      prompt = await run_in_threadpool(chat.prepare, req, model, router is not None)
    else:
      prompt = chat.prepare(req, model, router is not None)
    pixels = image = None
    if prompt.image_url is not None:
      pixels, image = await image_of(prompt.image_url)
    seed = req.seed if req.seed is not None else random.randrange(2**32)
    job = Job(prompt, pixels, image, req.temperature, req.top_p, seed, req.stream, asyncio.get_running_loop(),
              asyncio.Queue())
    scheduler.submit(job)
    # Until the first event (the answer, or a stream's first text) nothing is sent: a timeout, an error or a
    # disconnect is still answered with a status of its own.
    event = await first_event(job, request, deadline)
    if event is None:
      metrics.requests.labels("499").inc()
      return Response(status_code=499)
    if event[0] == "error":
      return error(event[1])
    if not req.stream:
      return answer(event[1], start)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return StreamingResponse(stream(job, event, deadline, start, include_usage), media_type="text/event-stream")

  async def first_event(job: Job, request: Request, deadline: float):
    """The job's first event; None if the client left first; a 504 ApiError past the deadline."""
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(disconnected(request))
    try:
      await asyncio.wait({get, gone}, timeout=max(0.0, deadline - time.monotonic()),
                         return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
    if get.done():
      return get.result()
    get.cancel()
    if gone.done() and not gone.cancelled():
      scheduler.cancel(job, "disconnect")
      return None
    scheduler.cancel(job, "timeout")
    raise timeout_error()

  def timeout_error() -> ApiError:
    return ApiError(504, f"the request took longer than the server's --request-timeout ({request_timeout:g} s)",
                    type="timeout", code="request_timeout")

  def usage(r: Result) -> Usage:
    n = len(r.token_ids)
    return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=n, total_tokens=r.prompt_tokens + n,
                 visual_tokens=r.visual_tokens)

  def account(r: Result, start: float):
    metrics.requests.labels("200").inc()
    metrics.scale.labels(str(r.scale)).inc()
    metrics.latency.observe(time.monotonic() - start)
    metrics.prompt_tokens.inc(r.prompt_tokens)
    metrics.visual_tokens.inc(r.visual_tokens)
    metrics.completion_tokens.inc(len(r.token_ids))

  def answer(r: Result, start: float) -> Response:
    account(r, start)
    body = ChatResponse(model=name, scale=r.scale, usage=usage(r), choices=[Choice(
        message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)])
    # Serialized by pydantic itself: FastAPI's jsonable_encoder + json.dumps of the model cost ~10% of a request.
    return Response(body.model_dump_json(), media_type="application/json")

  async def stream(job: Job, event, deadline: float, start: float, include_usage: bool):
    ident, now = completion_id(), int(time.time())

    def chunk(delta: Delta, **kw) -> str:
      c = ChatChunk(id=ident, created=now, model=name, choices=[StreamChoice(delta=delta, **kw)])
      return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

    # /metrics counts every stream once: account() an answered one; as 200 one that ends in an error chunk (its
    # status line went out with the first chunk); as 499 one whose client leaves first.
    uncounted = "499"
    try:
      yield chunk(Delta(role="assistant", content=""))
      while True:
        kind, payload = event
        if kind == "delta":
          yield chunk(Delta(content=payload))
        elif kind == "error":
          uncounted = "200"
          yield f"data: {ErrorResponse(error=payload.info).model_dump_json()}\n\n"
          break
        else:
          account(payload, start)
          uncounted = None
          final = ChatChunk(id=ident, created=now, model=name, scale=payload.scale,
                            choices=[StreamChoice(delta=Delta(), finish_reason=payload.finish_reason)])
          yield f"data: {final.model_dump_json(exclude_none=True)}\n\n"
          if include_usage:  # OpenAI's extra last chunk: no choices, the usage
            tail = ChatChunk(id=ident, created=now, model=name, choices=[], usage=usage(payload))
            yield f"data: {tail.model_dump_json(exclude_none=True)}\n\n"
          break
        try:
          event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
          scheduler.cancel(job, "timeout")
          uncounted = "200"
          yield f"data: {ErrorResponse(error=timeout_error().info).model_dump_json()}\n\n"
          break
      yield "data: [DONE]\n\n"
    finally:  # a client that leaves mid-stream cancels this generator
      scheduler.cancel(job, "disconnect")
      if uncounted:
        metrics.requests.labels(uncounted).inc()

  return app


async def disconnected(request: Request):
  """Returns when the client closes the connection (the body has been read, so the next message is that)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass
