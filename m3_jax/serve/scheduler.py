"""Batching: concurrent requests wait in a bounded queue; one worker thread gathers up to --max-batch of them (from
the first one's arrival or the last batch's end, while they keep arriving less than --batch-wait-ms apart, for at
most 4 of those waits; after a batch's end, until one more arrives) into one engine batch with mixed scales,
per-request sampling and streaming, and hands each request its tokens as they are decoded. `--batching continuous`
instead lets requests join and leave a running decode (`eval/continuous.Slots`). With engine replicas on several
devices (`--data-parallel N`, static batching), each batch is split into N contiguous shares that run concurrently,
one per replica.

A request's answer does not depend on its batch: the engine's padding is out of attention and of the RoPE
positions, and each row samples from its own seed (`Engine.generate_rows`). A request that times out or whose
client disconnects leaves the queue at once; once its batch runs, its row finishes with the batch, unanswered.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from m3_jax.eval.continuous import Slots
from m3_jax.eval.generate import power_of_two
from m3_jax.serve import chat
from m3_jax.serve.detok import TextStream, answer_text
from m3_jax.serve.metrics import Metrics
from m3_jax.serve.protocol import ApiError

log = logging.getLogger("m3.serve")


@dataclasses.dataclass
class Result:
  text: str
  token_ids: list[int]
  finish_reason: str      # "stop" | "length"
  scale: int | None
  visual_tokens: int
  prompt_tokens: int


@dataclasses.dataclass(eq=False)
class Job:
  """One request. `events` receives ("delta", str) while decoding (streams only), then ("done", Result) or
  ("error", ApiError), posted from the worker thread."""
  prompt: chat.Prompt
  pixels: np.ndarray | None    # float32[H, W, 3] (LLaVA-1.5)
  image: Any                   # the PIL image (LLaVA-NeXT cuts crops at batch time)
  temperature: float
  top_p: float
  seed: int
  stream: bool
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue
  queued_at: float = dataclasses.field(default_factory=time.monotonic)
  cancelled: bool = False
  finished: bool = False
  tokens: list[int] = dataclasses.field(default_factory=list)
  scale: int | None = None
  visual: np.ndarray | None = None   # float[n, D] once encoded
  visual_tokens: int = 0
  encoded: bool = False              # routed and encoded (a continuous joiner sent back keeps it)
  text: TextStream | None = None

  def post(self, kind: str, payload):
    self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


# static: a batch runs to its longest answer, then the next is gathered; continuous: requests join and leave the
# running decode between chunks of CHUNK steps (`eval/continuous.Slots`, --max-batch rows).
BATCHING = ("static", "continuous")
CHUNK = 8

# A gather lasts at most this many --batch-wait-ms (while requests keep arriving less than one apart).
GATHER_WAITS = 4


class QueueFull(Exception):
  pass


def row_bucket(n: int) -> int:
  """Rows of one encoder call: powers of two, as the engine pads decode batches (few compilations)."""
  return power_of_two(n)


def shares(jobs: list, n: int) -> list[list]:
  """`jobs` cut into at most n contiguous shares of near-equal size (the first ones one larger), none empty."""
  size, extra = divmod(len(jobs), n)
  out, start = [], 0
  for i in range(min(n, len(jobs))):
    end = start + size + (i < extra)
    out.append(jobs[start:end])
    start = end
  return out


def run_shares(engines: list, parts: list[list], run: Callable, pool: ThreadPoolExecutor) -> list[Exception | None]:
  """`run(engines[i], parts[i])` for every share at once (the first in this thread, the others in `pool`) -> each
  share's exception, or None."""
  running = [pool.submit(run, e, p) for e, p in zip(engines[1:], parts[1:])]
  try:
    run(engines[0], parts[0])
    first = None
  except Exception as e:
    first = e
  return [first] + [future.exception() for future in running]


def encode_by_scale(engine, jobs: list[Job]) -> None:
  """LLaVA-1.5: sets each job's `visual` (float[scale, D]) from its `pixels` at its `scale`, the encoder run once per
  scale group with the group's rows padded to a power of two (few compilations)."""
  for scale in sorted({j.scale for j in jobs}):
    group = [j for j in jobs if j.scale == scale]
    px = np.stack([j.pixels for j in group])
    px = np.concatenate([px, np.zeros((row_bucket(len(px)) - len(px), *px.shape[1:]), px.dtype)])
    for j, v in zip(group, engine.visual_tokens(px, scale, batch_size=len(px))):
      j.visual = v


class Scheduler:
  def __init__(self, model, metrics: Metrics, *, max_batch: int, max_queue: int, batch_wait_s: float,
               router=None, batching: str = "static", engines: list | None = None):
    """`engines`: the model's engine and its replicas on other devices (`generate.replicas`); default: the
    model's engine alone."""
    if batching not in BATCHING:
      raise ValueError(f"batching={batching!r}: expected one of {', '.join(BATCHING)}")
    self.engines = list(engines) if engines else [model.engine]
    if batching == "continuous" and len(self.engines) > 1:
      raise ValueError(f"{len(self.engines)} data-parallel engine replicas with continuous batching: replicas "
                       "split static batches (--batching static); continuous batching runs one decode timeline "
                       "on one device")
    self.pool = (ThreadPoolExecutor(len(self.engines) - 1, thread_name_prefix="m3-serve-replica")
                 if len(self.engines) > 1 else None)
    for replica in range(len(self.engines)):  # every replica on /metrics from the start, at 0
      metrics.replica_requests.labels(str(replica))
    self.model, self.metrics, self.router, self.batching = model, metrics, router, batching
    self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
    self.waiting: collections.deque[Job] = collections.deque()
    self.cond = threading.Condition()
    self.stopping = False
    self.batch_seconds = 1.0  # running mean, for Retry-After
    self.last_batch_end = float("-inf")
    self.thread = threading.Thread(target=self._loop, name="m3-serve-scheduler", daemon=True)
    self.run_batch: Callable[[list[Job]], None] = self._run_batch  # tests may wrap it (to hold a batch)

  def start(self):
    self.thread.start()

  def stop(self, timeout: float | None = None):
    """Finishes the batch in flight and what is queued, then ends the worker."""
    with self.cond:
      self.stopping = True
      self.cond.notify_all()
    self.thread.join(timeout)
    if self.pool is not None:  # (a worker still running past `timeout`: its shares are not waited for)
      self.pool.shutdown(wait=not self.thread.is_alive(), cancel_futures=True)

  def submit(self, job: Job):
    with self.cond:
      if self.stopping:
        raise ApiError(503, "the server is shutting down", type="service_unavailable")
      if len(self.waiting) >= self.max_queue:
        retry = max(1, round(self.batch_seconds * (1 + len(self.waiting) // self.max_batch)))
        raise ApiError(503, f"the queue is full ({self.max_queue} requests waiting); retry in {retry} s",
                       type="server_overloaded", code="queue_full", headers={"Retry-After": str(retry)})
      self.waiting.append(job)
      self.metrics.queue_depth.set(len(self.waiting))
      self.cond.notify_all()

  def cancel(self, job: Job, reason: str):
    """The request is gone (timeout, disconnect): it leaves the queue, or its row's tokens are dropped."""
    with self.cond:
      if job.finished or job.cancelled:
        return
      job.cancelled = True
      if job in self.waiting:
        self.waiting.remove(job)
        self.metrics.queue_depth.set(len(self.waiting))
    self.metrics.dropped.labels(reason).inc()

  def warmup(self, prompt: str = "Describe the image.", max_tokens: int = chat.DEFAULT_MAX_TOKENS) -> int:
    """Compiles, before serving, the shapes that batches of this prompt's length and `max_tokens` meet: the
    encoder for every scale and power-of-two group up to --max-batch (a replica's share of it, with replicas), the
    greedy non-streamed decode for every power-of-two batch and every scale as the batch's largest (LLaVA-1.5), on
    every replica. Returns the number of engine calls."""
    model = self.model
    if model.config.type != "llava15":
      return 0
    size, calls = model.config.vision.image_size, 0
    share = -(-self.max_batch // len(self.engines))
    rows = [1 << k for k in range(row_bucket(share).bit_length())]
    ids = model.prompt_ids(prompt, True)
    for engine in self.engines:
      for scale in sorted(model.scales):
        for b in rows:
          visual = engine.visual_tokens(np.zeros((b, size, size, 3), np.float32), scale, batch_size=b)
          engine.generate_rows([ids] * b, visual, max_tokens, [0.0] * b, [1.0] * b, [0] * b)
          calls += 2
    return calls

  # ------------------------------------------------------------------------------------------ worker thread
  def _next_batch(self) -> list[Job] | None:
    with self.cond:
      while True:
        while not self.waiting and not self.stopping:
          self.cond.wait()
        if not self.waiting:
          return None
        # Gather from the oldest request's arrival or the last batch's end, whichever is later, while requests
        # keep arriving less than batch_wait_s apart, for at most GATHER_WAITS x batch_wait_s. The gather after a
        # batch lets the clients it just answered send their next requests and join the ones that queued during
        # it: closed-loop clients otherwise split into cohorts that alternate in half-full batches. Until a first
        # request arrives after that batch's end, the gather waits for one (up to the cap): an answered client's
        # next request (its answer sent, read, the next one parsed) often takes longer than batch_wait_s.
        opened = max(self.waiting[0].queued_at, self.last_batch_end)
        cap = opened + GATHER_WAITS * self.batch_wait_s
        fill = min(self.max_batch, self.max_queue)  # (a queue shorter than a batch is full before the batch)
        while self.waiting and len(self.waiting) < fill and not self.stopping:
          last = self.waiting[-1].queued_at
          quiet = last + self.batch_wait_s if last >= opened else cap
          left = min(quiet, cap) - time.monotonic()
          if left <= 0:
            break
          self.cond.wait(left)
        if self.waiting:  # (a cancel may have emptied the queue during the gather: wait again)
          break
      # The oldest request leads; others join when their visual tokens fit its padded count (the engine pads
      # every row to the batch's largest image: a 1-token request in a 576-token batch pays for 576).
      limit = self.visual_slots(self.waiting[0])
      batch = [j for j in self.waiting if self.visual_slots(j) <= limit][:self.max_batch]
      for j in batch:
        self.waiting.remove(j)
      self.metrics.queue_depth.set(len(self.waiting))
      return batch

  def visual_slots(self, job: Job) -> int:
    """The visual positions the engine pads `job`'s image to (an upper bound for "auto" and LLaVA-NeXT)."""
    scale = job.prompt.scale
    n = 0 if scale is None else scale if isinstance(scale, int) else (scale.cap or max(self.model.scales))
    return n if n <= 1 else -(-n // self.model.engine.length_step) * self.model.engine.length_step

  def _loop(self):
    if self.batching == "continuous":
      return self._loop_continuous()
    while (batch := self._next_batch()) is not None:
      start = time.monotonic()
      for job in batch:
        self.metrics.queue_wait.observe(start - job.queued_at)
      self.metrics.running.set(len(batch))
      try:
        self.run_batch(batch)
      except Exception as e:  # the server keeps serving; this batch's requests get a 500
        self._fail(batch, "batch of %d" % len(batch), e)
      self.last_batch_end = time.monotonic()
      seconds = self.last_batch_end - start
      self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
      self.metrics.batch_seconds.observe(seconds)
      self.metrics.batch_size.observe(len(batch))
      self.metrics.running.set(0)

  def _loop_continuous(self):
    """Between chunks of decode steps, waiting requests take free rows (prefilled together, a group per scale) and
    finished or abandoned ones leave. When no row is active, the first requests are gathered as in static mode."""
    slots = Slots(self.model.engine, self.max_batch, chunk=CHUNK)
    rows: dict[int, Job] = {}
    admitted: dict[int, float] = {}   # row -> when its request joined (its service time feeds Retry-After)
    while True:
      if not rows:
        joiners = self._next_batch()
        if joiners is None:
          return
      else:
        with self.cond:
          joiners = list(self.waiting)[:len(slots.free_rows())]
          for j in joiners:
            self.waiting.remove(j)
          self.metrics.queue_depth.set(len(self.waiting))
      if joiners:
        for row in self._admit(slots, rows, joiners):
          admitted[row] = time.monotonic()
      if not rows:
        continue
      start = time.monotonic()
      self.metrics.running.set(len(rows))
      self.metrics.batch_size.observe(len(rows))
      try:
        tokens = slots.run()
        for row, job in list(rows.items()):
          for tok in tokens[row].tolist():
            self._step(job, tok)
            if job.finished or job.cancelled:
              break
          if job.finished or job.cancelled:
            slots.free(row)
            del rows[row]
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - admitted.pop(row))
      except Exception as e:  # the server keeps serving; the requests in the rows get a 500
        self._fail(list(rows.values()), "continuous decode of %d rows" % len(rows), e)
        rows.clear()
        admitted.clear()
        slots = Slots(self.model.engine, self.max_batch, chunk=CHUNK)
      self.metrics.batch_seconds.observe(time.monotonic() - start)
      self.metrics.running.set(len(rows))

  def _admit(self, slots, rows: dict[int, Job], joiners: list[Job]) -> list[int]:
    """Moves `joiners` (taken from the queue) into free rows of `slots`, those that fit the timeline now (the rest
    go back to the front of the queue, their visual tokens kept); returns the rows filled. A failure answers the
    joiners with a 500 and leaves the running rows alone."""
    fresh = [j for j in joiners if not j.encoded]   # new here (a request sent back keeps its tokens and wait)
    now = time.monotonic()
    for job in fresh:
      self.metrics.queue_wait.observe(now - job.queued_at)
    filled, later = [], []
    try:
      self._encode([j for j in fresh if not j.cancelled])
    except Exception as e:  # these requests get a 500; those sent back earlier keep their tokens and go on
      self._fail(fresh, "encoding %d joiners" % len(fresh), e)
    jobs = [j for j in joiners if not j.finished and not j.cancelled]
    for scale in sorted({j.visual_tokens for j in jobs}):
      group = [j for j in jobs if j.visual_tokens == scale]
      # The longest run of the group, in queue order, that fits the timeline now (on an idle one, the first
      # request alone always does); the rest wait for rows to finish.
      k = len(group)
      while k and not slots.fits(slots.prefill_length([j.prompt.ids for j in group[:k]],
                                                      [j.visual for j in group[:k]]),
                                 max(j.prompt.max_tokens for j in group[:k])):
        k -= 1
      group, rest = group[:k], group[k:]
      later += rest
      if not group:
        continue
      free = slots.free_rows()[:len(group)]
      try:
        slots.admit(free, [j.prompt.ids for j in group], [j.visual for j in group], [j.temperature for j in group],
                    [j.top_p for j in group], [j.seed for j in group], max(j.prompt.max_tokens for j in group))
      except Exception as e:  # this group's requests get a 500; rows it half-filled are freed
        for row in free:
          slots.free(row)
        self._fail(group, "admitting %d requests" % len(group), e)
        continue
      rows.update(zip(free, group))
      filled += free
    if later:  # back to the front of the queue
      with self.cond:
        self.waiting.extendleft(reversed(later))
        self.metrics.queue_depth.set(len(self.waiting))
    return filled

  def _run_batch(self, batch: list[Job]):
    """Runs `batch` on the engine, or split between the replicas: one share each, run concurrently (the first
    in this thread); a share that fails answers its own requests with a 500."""
    batch = self._route([j for j in batch if not j.cancelled])  # "auto": the router once, for the whole batch
    if len(self.engines) == 1:
      return self._run_share(self.engines[0], batch)
    parts = shares(batch, len(self.engines))
    for replica, part in enumerate(parts):
      self.metrics.replica_requests.labels(str(replica)).inc(len(part))
    for replica, (part, e) in enumerate(zip(parts, run_shares(self.engines, parts, self._run_share, self.pool))):
      if e is not None:  # this share's requests get a 500 naming its error; the other shares' are answered
        self._fail(part, "replica %d's share of a batch of %d" % (replica, len(batch)), e)

  def _run_share(self, engine, batch: list[Job]):
    # Cancelled again after encoding too: a request that left while the encoder ran has no tokens.
    batch = [j for j in self._encode_visual([j for j in batch if not j.cancelled], engine)
             if not j.finished and not j.cancelled]
    if not batch:
      return

    def on_token(step: int, tokens: np.ndarray):
      for job, tok in zip(batch, tokens.tolist()):
        self._step(job, tok)

    # Tokens come out of the decode loop one step at a time only for streams (a host callback per step costs).
    streaming = any(j.stream for j in batch)
    # The engine compiles a power-of-two answer length and its loop stops at the batch's largest max_tokens.
    max_new = max(j.prompt.max_tokens for j in batch)
    rows = engine.generate_rows(
        [j.prompt.ids for j in batch], [j.visual for j in batch], max_new,
        [j.temperature for j in batch], [j.top_p for j in batch], [j.seed for j in batch],
        on_token=on_token if streaming else None)
    for job, row in zip(batch, rows):
      if streaming or job.prompt.stops:  # token by token: a stop string may end the answer at any of them
        for tok in row[len(job.tokens):]:  # without streaming the tokens arrive here
          self._step(job, tok)
      elif not job.finished and not job.cancelled:  # the row whole (generate_rows cut it at its first stop id)
        job.tokens = row[:job.prompt.max_tokens]
        self._finish(job, reason="length" if len(row) >= job.prompt.max_tokens else "stop")
      if not job.finished:  # the row ended before max_tokens: at a stop id, which generate_rows cuts off
        self._finish(job, reason="stop")

  def _encode(self, batch: list[Job]) -> list[Job]:
    """Sets each job's scale (`_route`) and visual tokens (`_encode_visual`, the model's engine)."""
    return self._encode_visual(self._route(batch), self.engines[0])

  def _route(self, batch: list[Job]) -> list[Job]:
    """Sets each job's scale: its own, or the router's choice for "auto" (once for the whole batch)."""
    model = self.model
    auto = [j for j in batch if isinstance(j.prompt.scale, chat.Auto)]
    if auto:  # the router hook (the `--scale auto` issue): its choice, capped by max_visual_tokens
      chosen = self.router.choose(model, np.stack([j.pixels for j in auto]), [j.prompt.ids for j in auto],
                                  [j.prompt.scale.cap for j in auto])
      for j, s in zip(auto, chosen):
        j.scale = int(s)
    for j in batch:
      if isinstance(j.prompt.scale, int):
        j.scale = j.prompt.scale
    return batch

  def _encode_visual(self, batch: list[Job], engine) -> list[Job]:
    """Sets each routed job's visual tokens (float[n, D] or None) with `engine`, the encoder run once per scale
    group (LLaVA-1.5) or per image (LLaVA-NeXT's crops)."""
    model = self.model
    with_image = [j for j in batch if j.scale is not None and not j.cancelled]
    if model.config.type == "llava15":
      encode_by_scale(engine, with_image)
    else:
      for j in with_image:
        j.visual = model.visual([j.image], [j.scale], engine=engine)[0]
        try:
          chat.check_context(model, j.prompt.ids, j.scale, j.prompt.max_tokens, visual=len(j.visual))
        except ApiError as e:
          self._finish(j, error=e)
    for j in batch:
      j.visual_tokens = 0 if j.visual is None else len(j.visual)
      j.encoded = True
      j.text = TextStream(model.tokenizer, j.prompt.stops) if j.stream else None
    return batch

  def _step(self, job: Job, tok: int):
    """One decoded token of `job` (called from inside the decode loop)."""
    if job.finished or job.cancelled:
      return
    if tok in self.model.engine.stop_ids:
      return self._finish(job, reason="stop")
    job.tokens.append(tok)
    if job.prompt.stops and answer_text(self.model.tokenizer, job.tokens, job.prompt.stops)[1]:
      return self._finish(job, reason="stop")
    if len(job.tokens) >= job.prompt.max_tokens:
      return self._finish(job, reason="length")
    if job.text is not None and (delta := job.text.delta(job.tokens)):
      job.post("delta", delta)

  def _fail(self, jobs: list[Job], what: str, e: Exception):
    """Answers `jobs` with a 500 (the server keeps serving)."""
    log.exception("%s failed", what)
    for job in jobs:
      self._finish(job, error=ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))

  def _finish(self, job: Job, reason: str | None = None, error: ApiError | None = None):
    with self.cond:
      if job.finished:
        return
      job.finished = True
    if job.cancelled:
      return
    delta = None
    if error is None:
      try:  # the job is finished now: whatever goes wrong here must still answer it
        text, _ = answer_text(self.model.tokenizer, job.tokens, job.prompt.stops)
        delta = job.text.final(text) if job.text is not None else None
        prompt_tokens = len(job.prompt.ids) - (job.scale is not None) + job.visual_tokens
        result = Result(text, list(job.tokens), reason, job.scale, job.visual_tokens, prompt_tokens)
      except Exception as e:
        log.exception("answering a finished request failed")
        error = ApiError(500, f"detokenizing failed: {type(e).__name__}: {e}", type="server_error")
    if error is not None:
      return job.post("error", error)
    if delta:
      job.post("delta", delta)
    job.post("done", result)
