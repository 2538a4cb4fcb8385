"""`m3 serve` in-process, through the real `openai` client: answers equal `m3_jax.load(ckpt).generate` at every
scale, streaming equals non-streaming, batched equals alone, every malformed request gets its 4xx and the server
keeps serving, a full queue answers 503, timeouts and disconnects free their slot."""
import concurrent.futures
import functools
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, PngImagePlugin

from conftest import NAME, data_uri, png_uri, serving

from m3_jax.serve import app as app_module
from m3_jax.serve import images as images_module

Q = "what colour is the picture?"
MAX = 6  # max_tokens: the server decodes 8 (a power of two) and cuts, the reference decodes exactly 6


def ask(client, content, **body):
  kw = {k: body.pop(k) for k in ("max_tokens", "temperature", "seed", "stream", "stop", "stream_options",
                                 "top_p") if k in body}
  kw.setdefault("max_tokens", MAX)
  return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                        extra_body=body or None, **kw)


def content(image_url=None, text=Q):
  parts = [{"type": "text", "text": text}]
  return parts + [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else parts


@pytest.fixture(scope="module")
def served(model, images):
  with serving(model, max_batch=8, batch_wait_ms=50, allowed_image_dir=images, max_image_pixels=4096) as (url, app):
    yield url, app, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def reference(model, images):
  @functools.cache
  def answer(image: int | None, scale: int | None, temperature: float = 0.0, seed: int = 0):
    path = None if image is None else str(images / f"{image}.png")
    return model.generate([path], [Q], scale=scale, max_new_tokens=MAX, temperature=temperature, seed=seed)[0]
  return answer


def stream_text(chunks):
  chunks = list(chunks)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  return text, chunks


def test_answers_equal_m3_load_generate_at_every_scale_streamed_or_not(served, model, images, reference):
  url, app, client = served
  for scale in (*model.scales, None):
    want = reference(0 if scale else None, scale)
    uri = data_uri(images / "0.png") if scale else None
    got = ask(client, content(uri), visual_tokens=scale)
    assert got.choices[0].message.content == want["text"], scale
    assert got.usage.completion_tokens == len(want["token_ids"]), scale
    assert (got.usage.visual_tokens, got.model_extra["scale"]) == (want["visual_tokens"], scale)
    assert got.usage.prompt_tokens == len(model.prompt_ids(Q, scale is not None)) - bool(scale) + (scale or 0)
    text, chunks = stream_text(ask(client, content(uri), visual_tokens=scale, stream=True,
                                   stream_options={"include_usage": True}))
    assert text == want["text"], scale
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"]) and not chunks[-1].choices
  # Sampling with a seed, the largest scale under a cap, and a path under --allowed-image-dir.
  want = reference(1, 9, 1.0, 7)
  assert ask(client, content(data_uri(images / "1.png")), visual_tokens=9, temperature=1.0,
             seed=7).choices[0].message.content == want["text"]
  capped = ask(client, content(data_uri(images / "1.png")), max_visual_tokens=40)
  assert capped.model_extra["scale"] == 36 and capped.choices[0].message.content == reference(1, 36)["text"]
  local = ask(client, content("1.png"), visual_tokens=36)
  assert local.choices[0].message.content == reference(1, 36)["text"]
  # A stop string cuts the answer before it, streamed or not.
  full = reference(1, 36)["text"]
  stop = full.split()[1]
  cut = ask(client, content("1.png"), visual_tokens=36, stop=[stop])
  assert cut.choices[0].message.content == full[:full.index(stop)].strip()
  assert cut.choices[0].finish_reason == "stop"
  assert stream_text(ask(client, content("1.png"), visual_tokens=36, stop=[stop], stream=True))[0] == \
      cut.choices[0].message.content
  # Literal placeholders are removed from the text, also those a removal would join: the answer is the plain one.
  nested = ask(client, content(data_uri(images / "0.png"), text="<<image>image>" + Q + "<<<image>image>image>"),
               visual_tokens=9)
  assert nested.choices[0].message.content == reference(0, 9)["text"]
  assert ask(client, content(text="<<image>image>" + Q)).choices[0].message.content == reference(None, None)["text"]
  # A prompt long enough to be tokenized off the event loop is refused (over the context) with its 400 all the same.
  with pytest.raises(openai.BadRequestError, match="context"):
    ask(client, content(text="colour " * 4000))
  models = client.models.list().data
  assert [(m.id, m.model_extra["scales"], m.model_extra["router"]) for m in models] == \
      [(NAME, sorted(model.scales), False)]


def test_a_small_data_uri_is_decoded_on_the_event_loop_and_others_in_a_worker_thread(served, images, reference,
                                                                                      monkeypatch):
  """app.INLINE_URI_CHARS / INLINE_IMAGE_PIXELS: a small data: URI is decoded where the request is handled; a long
  one (here the same pixels with 20 KB of PNG text), a large image or a local file in the thread pool, before any
  base64 or header work on the loop. The answers are the same."""
  url, app, client = served
  loaded = []
  real = images_module.load
  monkeypatch.setattr(images_module, "load", lambda *a: loaded.append(threading.current_thread()) or real(*a))
  pixels = np.asarray(Image.open(images / "2.png"))
  text = PngImagePlugin.PngInfo()
  text.add_text("padding", "x" * 20_000)
  small, long_uri = data_uri(images / "2.png"), png_uri(pixels, pnginfo=text)
  assert len(small) <= app_module.INLINE_URI_CHARS < len(long_uri)
  want = reference(2, 9)["text"]
  for uri in (small, long_uri, "2.png"):
    assert ask(client, content(uri), visual_tokens=9).choices[0].message.content == want
  loop, pool, path = loaded
  assert loop.name != pool.name and pool.name == path.name and "AnyIO" in pool.name, (loop, pool, path)
  bad = httpx.post(url + "/v1/chat/completions", timeout=60, json={
      "messages": [{"role": "user", "content": content("data:image/png;base64,aGVsbG8=")}], "max_tokens": 2})
  assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_image")


def test_64_concurrent_mixed_scale_requests_equal_their_single_answers(served, model, images, reference):
  url, app, client = served
  scales = sorted(model.scales)
  jobs = [(i % 4, scales[(i // 4) % 4], i % 3 == 0) for i in range(64)]  # (image, scale, stream)

  def one(job):
    image, scale, stream = job
    r = ask(client, content(data_uri(images / f"{image}.png")), visual_tokens=scale, stream=stream)
    return stream_text(r)[0] if stream else r.choices[0].message.content

  # The previous test's last batch may still be finishing (the scheduler records a batch's size after its
  # clients have their answers): count from an idle scheduler.
  metrics = app.state.metrics
  deadline = time.monotonic() + 60
  while any(metrics.registry.get_sample_value(g) for g in ("m3_requests_running", "m3_queue_depth")):
    assert time.monotonic() < deadline, "the scheduler did not go idle"
    time.sleep(0.01)
  before = metrics.batch_size.collect()[0].samples
  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    got = list(pool.map(one, jobs))
  seconds = time.monotonic() - start
  assert got == [reference(image, scale)["text"] for image, scale, _ in jobs]
  assert seconds < 300, seconds
  after = {s.name: s.value for s in app.state.metrics.batch_size.collect()[0].samples}
  was = {s.name: s.value for s in before}
  batches = after["m3_batch_size_count"] - was["m3_batch_size_count"]
  assert after["m3_batch_size_sum"] - was["m3_batch_size_sum"] == 64
  assert batches <= 32, batches  # requests were batched (16 clients, up to 8 per batch)


def test_data_parallel_replicas_split_each_batch_and_answer_as_one_engine(model, images, reference):
  """--data-parallel 2: a second engine on the second device takes half of each batch; every answer (streamed or
  not, mixed scales) still equals the request's single answer."""
  import jax

  scales = sorted(model.scales)[:2]
  jobs = [(i % 4, scales[i % 2], i % 2 == 1) for i in range(8)]  # (image, scale, stream)
  with serving(model, max_batch=8, batch_wait_ms=200, allowed_image_dir=images, max_image_pixels=4096,
               data_parallel=2) as (url, app):
    engines = app.state.scheduler.engines
    assert len(engines) == 2 and engines[0] is model.engine
    assert {d for x in jax.tree.leaves(engines[1].params) for d in x.devices()} == {jax.devices()[1]}
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(job):
      image, scale, stream = job
      r = ask(client, content(data_uri(images / f"{image}.png")), visual_tokens=scale, stream=stream)
      return stream_text(r)[0] if stream else r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      got = list(pool.map(one, jobs))
    assert got == [reference(image, scale)["text"] for image, scale, _ in jobs]
    shares = {r: app.state.metrics.registry.get_sample_value("m3_replica_requests_total", {"replica": r})
              for r in "01"}
    assert shares["0"] >= 1 and shares["1"] >= 1 and shares["0"] + shares["1"] == 8, shares
  with pytest.raises(ValueError, match="data-parallel replicas: expected 1 to 8"):
    app_module.create_app(model, name=NAME, data_parallel=9)


def error_of(excinfo):
  e = excinfo.value
  return e.status_code, e.body


@pytest.mark.parametrize("case", [
    "bad_json", "no_messages", "empty_messages", "invalid_scale", "auto_without_router", "two_images",
    "undecodable_image", "bad_base64", "too_many_pixels", "context_length", "http_url", "dotdot_path",
    "symlink_escape", "absolute_outside", "missing_file", "unknown_model", "n_2", "seed_range",
    "assistant_last", "unknown_route", "nul_in_path", "name_too_long", "thin_image", "thin_image_file",
    "lone_surrogate"])
def test_malformed_requests_get_their_4xx_and_the_server_keeps_serving(served, images, tmp_path, case):
  url, app, client = served
  img = data_uri(images / "2.png")
  outside = tmp_path / "secret.png"
  outside.write_bytes((images / "2.png").read_bytes())
  want = {"bad_json": (400, "invalid_json"), "no_messages": (400, "missing"), "empty_messages": (400, "too_short"),
          "invalid_scale": (400, "invalid_scale"), "auto_without_router": (400, "no_router"),
          "two_images": (400, "too_many_images"), "undecodable_image": (400, "invalid_image"),
          "bad_base64": (400, "invalid_data_uri"), "too_many_pixels": (400, "image_too_large"),
          "context_length": (400, "context_length_exceeded"), "http_url": (400, "url_not_allowed"),
          "dotdot_path": (400, "path_not_allowed"), "symlink_escape": (400, "path_not_allowed"),
          "absolute_outside": (400, "path_not_allowed"), "missing_file": (400, "image_not_found"),
          "unknown_model": (404, "model_not_found"), "n_2": (400, "less_than_equal"),
          "seed_range": (400, "less_than_equal"), "assistant_last": (400, None), "unknown_route": (404, None),
          "nul_in_path": (400, "path_not_allowed"), "name_too_long": (400, "path_not_allowed"),
          "thin_image": (400, "image_too_large"), "thin_image_file": (400, "image_too_large"),
          "lone_surrogate": (400, "invalid_text")}[case]
  raw = {"bad_json": b'{"messages": [', "no_messages": b'{"model": "tiny-m3"}',
         "empty_messages": b'{"messages": []}',
         "lone_surrogate": b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'}  # json.loads keeps it
  if case in raw:
    r = httpx.post(url + "/v1/chat/completions", content=raw[case], headers={"content-type": "application/json"})
    status, body = r.status_code, r.json()
  elif case == "unknown_route":
    r = httpx.get(url + "/v1/nothing")
    status, body = r.status_code, r.json()
  else:
    if case == "symlink_escape":
      link = images / "link.png"
      if not link.exists():
        os.symlink(outside, link)
    big = png_uri(np.zeros((80, 80, 3), np.uint8))  # 6400 pixels > --max-image-pixels 4096
    # 100 pixels (decoded on the event loop), and 4000 (in a thread); LLaVA-1.5 pads them to 100^2 and 4000^2 squares.
    thin = png_uri(np.zeros((1, 100, 3), np.uint8))
    if case == "thin_image_file":
      Image.new("RGB", (4000, 1)).save(images / "thin.png")
    request = {
        "invalid_scale": lambda: ask(client, content(img), visual_tokens=10),
        "auto_without_router": lambda: ask(client, content(img), visual_tokens="auto"),
        "two_images": lambda: ask(client, content(img) + [{"type": "image_url", "image_url": {"url": img}}]),
        "undecodable_image": lambda: ask(client, content("data:image/png;base64,bm90IGFuIGltYWdl")),
        "bad_base64": lambda: ask(client, content("data:image/png;base64,@@@")),
        "too_many_pixels": lambda: ask(client, content(big)),
        "thin_image": lambda: ask(client, content(thin)),
        "thin_image_file": lambda: ask(client, content("thin.png")),
        "context_length": lambda: ask(client, content(img), max_tokens=1000),
        "http_url": lambda: ask(client, content("https://example.com/cat.png")),
        "dotdot_path": lambda: ask(client, content(f"../{tmp_path.name}/secret.png")),
        "symlink_escape": lambda: ask(client, content("link.png")),
        "absolute_outside": lambda: ask(client, content(str(outside))),
        "missing_file": lambda: ask(client, content("nope.png")),
        "nul_in_path": lambda: ask(client, content("a\x00.png")),
        "name_too_long": lambda: ask(client, content("x" * 300 + ".png")),
        "unknown_model": lambda: client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "hi"}]),
        "n_2": lambda: client.chat.completions.create(model=NAME, n=2, messages=[{"role": "user", "content": "hi"}]),
        "seed_range": lambda: client.chat.completions.create(model=NAME, seed=2**40, messages=[
            {"role": "user", "content": "hi"}]),
        "assistant_last": lambda: client.chat.completions.create(model=NAME, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
    }[case]
    with pytest.raises(openai.APIStatusError) as excinfo:
      request()
    status, body = error_of(excinfo)
    body = {"error": body}  # the client unwraps "error"
  assert status == want[0], body
  assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
  if want[1] is not None:
    assert body["error"]["code"] == want[1], body
  if case == "auto_without_router":
    assert "m3 router fit" in body["error"]["message"]
  if case == "symlink_escape":
    assert "outside the allowed image directory" in body["error"]["message"]
  if case.startswith("thin_image"):
    side = 100 if case == "thin_image" else 4000
    assert f"pads it to a {side}x{side} square" in body["error"]["message"], body
  assert httpx.get(url + "/health").json() == {"status": "ok"}


@pytest.fixture
def gated(model):
  """A server whose batches wait for `gate` (so that requests pile up deterministically)."""
  def start(**options):
    gate = threading.Event()
    ctx = serving(model, **options)
    url, app = ctx.__enter__()
    sched = app.state.scheduler
    run = sched.run_batch
    sched.run_batch = lambda batch: (gate.wait(), run(batch))
    opened.append((ctx, gate))
    return url, app, gate
  opened = []
  yield start
  for ctx, gate in opened:
    gate.set()
    ctx.__exit__(None, None, None)


def sample(app, name, **labels):
  return app.state.metrics.registry.get_sample_value(name, labels)


def wait_for(condition, seconds=60):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out waiting"
    time.sleep(0.02)


def post(url, timeout=600, **body):
  body.setdefault("messages", [{"role": "user", "content": "hi"}])
  body.setdefault("max_tokens", MAX)
  return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def test_a_full_queue_answers_503_with_retry_after(gated, model):
  url, app, gate = gated(max_batch=1, max_queue=2, batch_wait_ms=0)
  sched = app.state.scheduler
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    first = pool.submit(post, url)
    wait_for(lambda: not sched.waiting and sample(app, "m3_requests_running") == 1)  # in the held batch
    queued = [pool.submit(post, url) for _ in range(2)]
    wait_for(lambda: len(sched.waiting) == 2)
    full = post(url)
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    gate.set()
    answers = [f.result() for f in [first, *queued]]
  want = model.generate([None], ["hi"], max_new_tokens=MAX)[0]["text"]
  assert [(r.status_code, r.json()["choices"][0]["message"]["content"]) for r in answers] == [(200, want)] * 3


def test_timeouts_and_disconnects_free_their_slot(gated, model):
  url, app, gate = gated(max_batch=1, max_queue=1, batch_wait_ms=0, request_timeout=1.0)
  sched = app.state.scheduler
  dropped = lambda reason: sample(app, "m3_requests_dropped_total", reason=reason)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    held = pool.submit(post, url)   # runs (held by the gate) past its timeout
    wait_for(lambda: sample(app, "m3_requests_running") == 1)
    queued = post(url)              # waits in the queue past its timeout
    assert queued.status_code == 504 and queued.json()["error"]["code"] == "request_timeout"
    assert held.result().status_code == 504
    assert not sched.waiting and dropped("timeout") == 2
    # A client that gives up while queued leaves the queue: the slot takes the next request.
    with pytest.raises(httpx.ReadTimeout):
      post(url, timeout=0.3)
    wait_for(lambda: dropped("disconnect") == 1 and not sched.waiting)
    gate.set()
  wait_for(lambda: sample(app, "m3_requests_running") == 0)  # the held batch had nothing left to decode
  assert httpx.get(url + "/health").json() == {"status": "ok"}
  assert sample(app, "m3_requests_total", status="504") == 2


def test_every_stream_is_counted_once_on_metrics(gated):
  """A stream that ends in an error chunk counts as 200 (its status line went out with the first chunk); one whose
  client leaves mid-way as 499."""
  from m3_jax.serve.protocol import ApiError
  url, app, gate = gated(max_batch=1, batch_wait_ms=0)
  sched, left = app.state.scheduler, threading.Event()

  def fails_after_a_delta(batch):  # in place of the engine: one delta, then the batch fails
    for job in batch:
      job.post("delta", "partial")
      if job.prompt.max_tokens == 3:
        left.wait(60)   # (until that client has gone)
      sched._finish(job, error=ApiError(500, "generation failed: boom", type="server_error"))
  sched.run_batch = fails_after_a_delta
  gate.set()
  count = lambda status: sample(app, "m3_requests_total", status=status) or 0
  body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
  with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60) as r:
    lines = [line for line in r.iter_lines() if line]
  assert r.status_code == 200 and '"partial"' in lines[1] and "boom" in lines[-2] and lines[-1] == "data: [DONE]"
  assert count("200") == 1 and count("499") == 0
  with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60) as r:
    next(line for line in r.iter_lines() if "partial" in line)
  wait_for(lambda: count("499") == 1)
  left.set()
  wait_for(lambda: sample(app, "m3_requests_running") == 0)
  assert count("200") == 1 and count("499") == 1
