"""The scheduler's gathering rule, with the engine replaced by a fixed-duration batch (no model, no HTTP); how it
answers a batch's rows; how it splits a batch between engine replicas."""
import queue
import threading
import time
import types

import numpy as np
import pytest

from m3_jax.serve.metrics import Metrics
from m3_jax.serve.scheduler import Job, Scheduler, shares


def batch_sizes(starts_ms: list[int], wait_ms: int, run_ms: int, rounds: int = 5, think_ms: int = 10) -> list[int]:
  """Closed-loop clients (client i starts at starts_ms[i], then sends its next request think_ms after each answer)
  against a scheduler whose batches take run_ms; --batch-wait-ms wait_ms, --max-batch 8. The batch sizes, in order.
  The margins are tens of ms: a loaded machine wakes threads late."""
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16))
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=64, batch_wait_s=wait_ms / 1000)
  sizes, done = [], {}

  def run_batch(batch):
    sizes.append(len(batch))
    time.sleep(run_ms / 1000)
    for job in batch:
      done[id(job)].set()

  sched.run_batch = run_batch
  sched.start()
  t0 = time.monotonic()

  def client(start_ms):
    time.sleep(max(0.0, t0 + start_ms / 1000 - time.monotonic()))
    for _ in range(rounds):
      job = Job(types.SimpleNamespace(scale=1, max_tokens=8), None, None, 0.0, 1.0, 0, False, None, None)
      done[id(job)] = threading.Event()
      sched.submit(job)
      assert done[id(job)].wait(10)
      time.sleep(think_ms / 1000)

  threads = [threading.Thread(target=client, args=(s,)) for s in starts_ms]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  sched.stop(5)
  assert sum(sizes) == rounds * len(starts_ms)
  return sizes


def test_a_batch_gathers_while_requests_keep_arriving():
  """8 clients 20 ms apart (less than --batch-wait-ms, 100): the first batch waits for all of them."""
  assert batch_sizes([20 * i for i in range(8)], wait_ms=100, run_ms=100) == [8] * 5


def test_answered_clients_rejoin_the_requests_that_queued_during_their_batch():
  """3 clients at 0 ms and 5 at 150 ms: the first batch closes at 50 ms (--batch-wait-ms) with 3 and runs for
  300 ms; the 5 queue while it runs. A worker that at once ran the queued 5 would answer the two cohorts in turn
  (3, 5, 3, 5, ...); gathering after a batch ends lets the 3 answered clients' next requests (10 ms later) join."""
  assert batch_sizes([0, 0, 0] + [150] * 5, wait_ms=50, run_ms=300) == [3, 8, 8, 8, 8, 5]


def test_answered_clients_that_come_back_later_than_one_wait_still_rejoin():
  """As above, but the answered clients' next requests come 50 ms after their answers, more than --batch-wait-ms
  (20) and less than the gather's cap (4 waits): the gather after a batch waits for a first new arrival instead of
  closing one wait after the batch's end over the 5 that queued (the cohorts then alternated: 3, 5, 3, 5, ...)."""
  assert batch_sizes([0, 0, 0] + [150] * 5, wait_ms=20, run_ms=300, think_ms=50) == [3, 8, 8, 8, 8, 5]


def test_a_request_cancelled_during_the_gather_leaves_the_worker_serving():
  """The only waiting request is cancelled (timeout, disconnect) while its batch gathers: the worker waits again
  and serves the next request (it used to raise IndexError on the empty queue and die)."""
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16))
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=64, batch_wait_s=0.2)
  ran = []
  sched.run_batch = lambda batch: ran.append(len(batch))
  sched.start()
  jobs = [Job(types.SimpleNamespace(scale=1, max_tokens=8), None, None, 0.0, 1.0, 0, False, None, None)
          for _ in range(2)]
  sched.submit(jobs[0])
  time.sleep(0.05)
  sched.cancel(jobs[0], "disconnect")
  time.sleep(0.3)
  assert sched.thread.is_alive() and ran == []
  sched.submit(jobs[1])
  sched.stop(5)
  assert ran == [1] and not sched.thread.is_alive()


def test_continuous_admission_takes_the_longest_run_of_a_group_that_fits():
  """Two requests of one scale that each fit an idle timeline but not together (a long prompt with a short answer,
  a short prompt with a long answer): the first is admitted now, the second goes back to the queue's front (all or
  nothing kept both waiting forever)."""
  import numpy as np

  class FakeSlots:  # a timeline of 100 slots: a group fits when its longest prompt + largest max_tokens do
    def __init__(self):
      self.admitted = []

    def free_rows(self):
      return [0, 1, 2, 3]

    def prefill_length(self, prompts, visual):
      return max(len(p) for p in prompts)

    def fits(self, t, max_new):
      return t + max_new <= 100

    def admit(self, rows, prompts, *rest):
      self.admitted.append((list(rows), [len(p) for p in prompts]))

  model = types.SimpleNamespace(scales=(1,), config=types.SimpleNamespace(type="llava15"), tokenizer=None,
                                engine=types.SimpleNamespace(length_step=16))
  sched = Scheduler(model, Metrics(), max_batch=4, max_queue=64, batch_wait_s=0.0, batching="continuous")

  def job(n_ids, max_tokens):
    prompt = types.SimpleNamespace(ids=np.zeros(n_ids, np.int32), scale=None, max_tokens=max_tokens, stops=())
    return Job(prompt, None, None, 0.0, 1.0, 0, False, None, None)

  long_prompt, long_answer = job(60, 10), job(5, 60)
  slots, rows = FakeSlots(), {}
  assert sched._admit(slots, rows, [long_prompt, long_answer]) == [0]
  assert slots.admitted == [([0], [60])] and rows == {0: long_prompt}
  assert list(sched.waiting) == [long_answer] and not long_answer.finished


def test_a_queue_shorter_than_a_batch_runs_once_full_without_waiting():
  """--max-queue 2 < --max-batch 8: two waiting requests fill the queue (a third gets a 503), so the batch starts at
  once instead of gathering for more that cannot come (--batch-wait-ms 2000 here)."""
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16))
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=2, batch_wait_s=2.0)
  ran = threading.Event()
  sched.run_batch = lambda batch: ran.set()
  sched.start()
  start = time.monotonic()
  for _ in range(2):
    sched.submit(Job(types.SimpleNamespace(scale=1, max_tokens=8), None, None, 0.0, 1.0, 0, False, None, None))
  assert ran.wait(5) and time.monotonic() - start < 1.0
  sched.stop(5)


def test_a_non_streamed_row_is_answered_whole_with_the_per_token_rules():
  """Non-streamed rows without stop strings are taken whole: a row cut at a stop id before max_tokens ends with
  "stop", a row reaching max_tokens (the batch decodes to its largest) is cut there with "length", an empty row is
  an empty "stop" answer, and a cancelled request gets nothing."""
  rows = [[7] * 10, [7] * 16, [7] * 10, [], [7] * 16]
  engine = types.SimpleNamespace(length_step=16, stop_ids=(2,),
                                 generate_rows=lambda prompts, visual, max_new, *rest, on_token=None: rows)
  tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
  model = types.SimpleNamespace(scales=(1,), engine=engine, tokenizer=tokenizer)
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=64, batch_wait_s=0.0)
  sched._route = lambda batch: batch
  sched._encode_visual = lambda batch, engine=None: batch
  inline = types.SimpleNamespace(call_soon_threadsafe=lambda f, *a: f(*a))

  def job(max_tokens):
    prompt = types.SimpleNamespace(ids=np.zeros(3, np.int32), scale=None, max_tokens=max_tokens, stops=())
    return Job(prompt, None, None, 0.0, 1.0, 0, False, inline, queue.Queue())

  jobs = [job(16), job(8), job(10), job(4), job(16)]
  jobs[4].cancelled = True
  sched._run_batch(jobs)
  answers = [j.events.get_nowait()[1] for j in jobs[:4]]
  assert [(len(a.token_ids), a.finish_reason) for a in answers] == [(10, "stop"), (8, "length"), (10, "length"),
                                                                     (0, "stop")]
  assert answers[1].text == " ".join(["7"] * 8) and jobs[4].events.empty()


def test_shares_cut_a_batch_into_contiguous_near_equal_parts():
  assert shares(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert shares(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
  assert shares(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
  assert shares([0], 2) == [[0]]  # a batch smaller than the replicas uses as many as it has requests
  assert shares(list(range(4)), 1) == [[0, 1, 2, 3]]


def replica_server(fail_second: bool):
  """A scheduler over two fake engine replicas whose decodes must overlap (each waits for the other at a barrier),
  the second failing when asked; jobs without images whose prompt is their number, answered [100 + number] * 3."""
  meeting = threading.Barrier(2, timeout=30)
  ran = {}

  def engine(name, fail=False):
    def generate_rows(prompts, visual, max_new, *rest, on_token=None):
      ran[name] = [int(p[0]) for p in prompts]
      meeting.wait()  # (a share run after the other would break the barrier: the shares run concurrently)
      if fail:
        raise RuntimeError(f"{name} lost its device")
      return [[100 + int(p[0])] * 3 for p in prompts]
    return types.SimpleNamespace(length_step=16, stop_ids=(2,), generate_rows=generate_rows)

  first, second = engine("first"), engine("second", fail_second)
  tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
  model = types.SimpleNamespace(scales=(1,), engine=first, tokenizer=tokenizer,
                                config=types.SimpleNamespace(type="llava15"))
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=64, batch_wait_s=0.0, engines=[first, second])
  inline = types.SimpleNamespace(call_soon_threadsafe=lambda f, *a: f(*a))
  jobs = [Job(types.SimpleNamespace(ids=np.array([i], np.int32), scale=None, max_tokens=3, stops=()), None, None,
              0.0, 1.0, 0, False, inline, queue.Queue()) for i in range(5)]
  with sched.cond:  # all five wait before the worker starts: one batch
    sched.waiting.extend(jobs)
  return sched, jobs, ran


@pytest.mark.parametrize("fail_second", [False, True])
def test_a_batch_is_split_between_replicas_that_run_at_once_and_a_failed_share_answers_only_its_requests(
    fail_second):
  sched, jobs, ran = replica_server(fail_second)
  sched.start()
  try:
    events = [j.events.get(timeout=30) for j in jobs]
  finally:
    sched.stop(30)
  assert ran == {"first": [0, 1, 2], "second": [3, 4]}
  for i, (kind, payload) in enumerate(events):
    if fail_second and i >= 3:
      assert kind == "error" and payload.status == 500 and "second lost its device" in payload.info.message
    else:
      assert kind == "done" and payload.token_ids == [100 + i] * 3 and payload.finish_reason == "length"
  assert all(j.events.empty() for j in jobs)  # one answer each
  assert not sched.thread.is_alive() and sched.pool._shutdown


def test_continuous_batching_refuses_replicas():
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16))
  with pytest.raises(ValueError, match="--batching static"):
    Scheduler(model, Metrics(), max_batch=8, max_queue=8, batch_wait_s=0.0, batching="continuous",
              engines=[model.engine, model.engine])


def test_warmup_compiles_every_share_shape_on_every_replica():
  """--max-batch 8 over 2 replicas: a share has at most 4 requests, padded to 1, 2 or 4 rows; each replica's
  encoder and decode are called at each of those sizes and every scale before serving."""
  calls = []

  def engine(name):
    def visual_tokens(pixels, scale, batch_size):
      calls.append((name, "encode", len(pixels), scale))
      return [np.zeros((scale, 4), np.float32)] * len(pixels)

    def generate_rows(prompts, visual, max_new, *rest):
      calls.append((name, "decode", len(prompts), len(visual[0])))
    return types.SimpleNamespace(length_step=16, visual_tokens=visual_tokens, generate_rows=generate_rows)

  first, second = engine("first"), engine("second")
  model = types.SimpleNamespace(scales=(9, 1), engine=first, config=types.SimpleNamespace(
      type="llava15", vision=types.SimpleNamespace(image_size=8)), prompt_ids=lambda prompt, image: [1, 2])
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=8, batch_wait_s=0.0, engines=[first, second])
  assert sched.warmup() == 2 * 2 * 3 * 2
  want = {(name, kind, rows, scale) for name in ("first", "second") for kind in ("encode", "decode")
          for rows in (1, 2, 4) for scale in (1, 9)}
  assert set(calls) == want and len(calls) == len(want)


def test_a_continuous_joiner_sent_back_is_counted_and_encoded_once():
  """A joiner that does not fit the running timeline goes back to the front of the queue; taken again after the
  next chunk, it is not new: its queue wait is observed once and it is not routed and encoded again."""
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16),
                                config=types.SimpleNamespace(type="llava15"), tokenizer=None)
  metrics = Metrics()
  sched = Scheduler(model, metrics, max_batch=2, max_queue=4, batch_wait_s=0.0, batching="continuous")
  encoded = []
  encode = sched._encode_visual
  sched._encode_visual = lambda batch, engine: (encoded.extend(batch), encode(batch, engine))[1]
  full = types.SimpleNamespace(free_rows=lambda: [0, 1], prefill_length=lambda ids, visual: 16,
                               fits=lambda length, max_new: False)   # a timeline with no room for the joiner
  job = Job(types.SimpleNamespace(scale=None, max_tokens=8, ids=np.arange(3)), None, None, 0.0, 1.0, 0, False,
            None, None)  # text only: its visual tokens stay None
  for _ in range(3):
    assert sched._admit(full, {}, [job]) == [] and list(sched.waiting) == [job]
    sched.waiting.clear()
  assert encoded == [job]
  assert metrics.registry.get_sample_value("m3_queue_wait_seconds_count") == 1
