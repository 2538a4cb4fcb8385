"""The scheduler's gathering rule, with the engine replaced by a fixed-duration batch (no model, no HTTP)."""
import threading
import time
import types

from m3_jax.serve.metrics import Metrics
from m3_jax.serve.scheduler import Job, Scheduler


def test_closed_loop_clients_that_arrive_staggered_merge_into_full_batches():
  """8 closed-loop clients of 5 requests start 20 ms apart: the first batch takes the first three (its 50 ms wait),
  the other five queue while it runs. A worker that at once ran the queued five would answer the two cohorts in turn
  (3, 5, 3, 5, ...); waiting --batch-wait-ms after a batch ends lets the answered clients' next requests join: one
  cohort of 8 from the second batch on, and the late starters' last requests at the end."""
  model = types.SimpleNamespace(scales=(1,), engine=types.SimpleNamespace(length_step=16))
  sched = Scheduler(model, Metrics(), max_batch=8, max_queue=64, batch_wait_s=0.05)
  sizes, done = [], {}

  def run_batch(batch):
    sizes.append(len(batch))
    time.sleep(0.1)
    for job in batch:
      done[id(job)].set()

  sched.run_batch = run_batch
  sched.start()

  def client(rounds=5):
    for _ in range(rounds):
      job = Job(types.SimpleNamespace(scale=1, max_tokens=8), None, None, 0.0, 1.0, 0, False, None, None)
      done[id(job)] = threading.Event()
      sched.submit(job)
      assert done[id(job)].wait(10)

  threads = [threading.Thread(target=client) for _ in range(8)]
  for t in threads:
    t.start()
    time.sleep(0.02)
  for t in threads:
    t.join()
  sched.stop(5)
  assert sum(sizes) == 40
  assert sizes[1:-1] == [8] * 4 and sizes[0] + sizes[-1] == 8, sizes
