"""`m3 serve --batching continuous`: requests join and leave a running decode between chunks of steps; each answer
still equals `m3_jax.load(ckpt).generate` of that request alone (greedy and seeded sampling, every scale, streamed
or not, different max_tokens in one decode)."""
import concurrent.futures
import dataclasses
import functools

import openai
import numpy as np
import pytest

from conftest import NAME, data_uri, serving
from m3_jax.eval.continuous import Slots
from m3_jax.eval.generate import Engine

Q = "what colour is the picture?"


@pytest.fixture(scope="module")
def client(model):
  with serving(model, max_batch=4, batch_wait_ms=20, batching="continuous") as (url, _):
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def reference(model, images):
  @functools.cache
  def answer(image: int, scale: int, max_tokens: int, temperature: float = 0.0, seed: int = 0):
    return model.generate([str(images / f"{image}.png")], [Q], scale=scale, max_new_tokens=max_tokens,
                          temperature=temperature, seed=seed)[0]["text"]
  return answer


def test_concurrent_requests_joining_a_running_decode_equal_their_single_answers(client, model, images, reference):
  """12 requests on 4 rows, scales cycling, answers of 3 to 21 tokens (rows leave and are refilled mid-decode),
  a third streamed, two sampled with a seed."""
  scales = sorted(model.scales)
  jobs = [(i % 4, scales[i % len(scales)], 3 + (5 * i) % 19, i % 3 == 0, 1.0 if i in (4, 9) else 0.0)
          for i in range(12)]

  def one(job):
    image, scale, max_tokens, stream, temperature = job
    r = client.chat.completions.create(
        model=NAME, max_tokens=max_tokens, stream=stream, temperature=temperature, seed=7,
        messages=[{"role": "user", "content": [{"type": "text", "text": Q}, {"type": "image_url", "image_url": {
            "url": data_uri(images / f"{image}.png")}}]}], extra_body={"visual_tokens": scale})
    if stream:
      return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content

  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    got = list(pool.map(one, jobs))
  assert got == [reference(image, scale, n, t, 7) for image, scale, n, _, t in jobs]


def test_the_timeline_drops_unused_front_slots_and_rows_keep_their_answers(model, images):
  """Slots directly, 2 rows: A and B decode, A leaves, C takes its row (its prompt ends at the shared write slot,
  so it starts past slot 0), B leaves; when C's decode reaches the end of the timeline, the front slots no row
  uses are dropped (w moves back). Every request's tokens equal generate_rows of it alone."""
  engine = model.engine
  pixels = model.pixels([str(images / f"{i}.png") for i in range(3)])
  ids = model.prompt_ids(Q, True)
  visual = [engine.visual_tokens(pixels[i:i + 1], s)[0] for i, s in enumerate((1, 9, 1))]
  alone = [engine.generate_rows([ids], [v], 64, [0.0], [1.0], [0])[0] for v in visual]
  slots = Slots(engine, 2, chunk=8)
  out = {0: [], 1: [], 2: []}

  def run(rows: dict[int, int], chunks: int):
    for _ in range(chunks):
      tokens = slots.run()
      for row, req in rows.items():
        out[req] += tokens[row].tolist()

  slots.admit([0, 1], [ids, ids], visual[:2], [0.0] * 2, [1.0] * 2, [0] * 2, 64)
  run({0: 0, 1: 1}, 2)
  slots.free(0)
  slots.admit([0], [ids], [visual[2]], [0.0], [1.0], [0], 64)
  c_start = int(slots.start[0])
  assert c_start > 0
  run({0: 2, 1: 1}, 2)
  slots.free(1)
  ws = []
  for _ in range(5):
    run({0: 2}, 1)
    ws.append(slots.w)
  assert any(b < a for a, b in zip(ws, ws[1:])), f"the timeline never dropped its front slots: w {ws}"
  assert slots.start[0] == 0  # C's first slot moved to the front
  for req in range(3):
    cut = next((i for i, t in enumerate(out[req]) if t in engine.stop_ids), len(out[req]))
    n = min(cut, len(alone[req]))
    assert n >= 16 and out[req][:n] == alone[req][:n], req


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_long_joiner_after_the_front_was_dropped_and_bfloat16(model, images, dtype):
  """A (1 token) decodes 3 chunks, B (1 token) joins behind it and decodes one, A leaves, then C (144 tokens, a
  prefill longer than the whole timeline) joins: C's prompt ends at the write slot (dropping B's unused front slots
  after the jump would have put it at a negative slot). B's and
  C's tokens equal generate_rows of each alone, in float32 and in a bfloat16 engine (the timeline in the
  model's dtype, as generate's cache)."""
  engine = model.engine
  if dtype != "float32":
    engine = Engine(dataclasses.replace(engine.config, dtype=dtype), engine.params, stop_ids=engine.stop_ids)
  pixels = model.pixels([str(images / f"{i}.png") for i in range(3)])
  ids = model.prompt_ids(Q, True)
  visual = [engine.visual_tokens(pixels[i:i + 1], s)[0] for i, s in enumerate((1, 1, 144))]
  alone = [engine.generate_rows([ids], [v], 32, [0.0], [1.0], [0])[0] for v in visual]
  slots = Slots(engine, 2, chunk=8)
  out = {1: [], 2: []}
  slots.admit([0], [ids], [visual[0]], [0.0], [1.0], [0], 32)
  for _ in range(3):  # the timeline grows to 128 slots
    slots.run()
  slots.admit([1], [ids], [visual[1]], [0.0], [1.0], [0], 32)
  assert slots.capacity == 128 and 0 < 4 * slots.start[1] < 128  # too few front slots to drop yet
  out[1] += slots.run()[1].tolist()
  slots.free(0)
  slots.admit([0], [ids], [visual[2]], [0.0], [1.0], [0], 32)
  for _ in range(3):
    tokens = slots.run()
    out[1] += tokens[1].tolist()
    out[2] += tokens[0].tolist()
  for req in (1, 2):
    cut = next((i for i, t in enumerate(out[req]) if t in engine.stop_ids), len(out[req]))
    n = min(cut, len(alone[req]))
    assert n >= 8 and out[req][:n] == alone[req][:n], (req, out[req][:n], alone[req][:n])


def test_joining_accounts_for_the_write_slot_jump_of_the_running_rows(model, images):
  """A long prompt moves the shared write slot up to its length, and the rows already decoding move with it:
  `fits` counts that move (a joiner that would push a running row past the largest timeline waits), and
  `admit` moves the running rows' ends, so they decode to the end without running out of timeline."""
  engine = model.engine
  max_len = engine.config.llm.max_len
  ids = model.prompt_ids(Q, True)
  visual = engine.visual_tokens(model.pixels([str(images / "0.png")]), 9)[0]
  text = lambda n: np.full(n, 5, np.int32)  # noqa: E731
  a = text(10)
  a_new = max_len - len(a)                 # A alone fills the context
  slots = Slots(engine, 2, chunk=8)
  slots.admit([0], [a], [None], [0.0], [1.0], [0], a_new)
  slots.run()
  # B alone fits the context (prompt + its 9 visual tokens + 1 new token), but placed now it moves the write slot
  # so far that A's remaining ~1000 tokens would not fit the largest timeline.
  b = np.concatenate([ids, text(max_len - len(ids) - len(visual))])
  assert len(b) - 1 + len(visual) + 1 == max_len
  assert not slots.fits(slots.prefill_length([b], [visual]), 1)
  # A shorter one fits; it jumps the write slot, and A's end moves by as much.
  c = np.concatenate([ids, text(400)])
  t = slots.prefill_length([c], [visual])
  assert slots.fits(t, 1) and t > slots.w
  before = int(slots.end[0]) - slots.w
  slots.admit([1], [c], [visual], [0.0], [1.0], [0], 1)
  assert int(slots.end[0]) - slots.w == before
  slots.free(1)
  decoded = 8
  while decoded < a_new:                   # A decodes the rest without running out of timeline
    slots.run()
    decoded += 8
  assert slots.w <= slots.max_capacity
