"""`m3 serve` as a process: SIGTERM stops accepting, finishes the requests in flight, and exits 0."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port

MAX = 6


def metric(url: str, name: str) -> float:
  for line in httpx.get(url + "/metrics").text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[1])
  raise KeyError(name)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(ckpt, model):
  """With --data-parallel 2 (each batch of 2 split between two engine replicas): `m3 serve` asks JAX for the two
  CPU devices itself (this test's XLA_FLAGS device count is taken away from the process)."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  proc = subprocess.Popen([sys.executable, "-m", "m3_jax", "serve", "--ckpt", str(ckpt), "--port", str(port),
                           "--max-batch", "2", "--batch-wait-ms", "200", "--data-parallel", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, XLA_FLAGS=flags))
  try:
    deadline = time.monotonic() + 300
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "the server did not come up"
      try:
        if httpx.get(url + "/health").status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    questions = ["hi", "what colour is the picture?", "hi there", "what is it?"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(httpx.post, url + "/v1/chat/completions", timeout=600, json={
          "messages": [{"role": "user", "content": q}], "max_tokens": MAX}) for q in questions]
      # Every request is in (decoding or queued; the first batch, split between the replicas, compiles for
      # seconds) before SIGTERM.
      replica = lambda r: metric(url, f'm3_replica_requests_total{{replica="{r}"}}')
      while metric(url, "m3_requests_running") + metric(url, "m3_queue_depth") < 4 or replica("1") < 1:
        assert not any(f.done() for f in futures), "a request finished before all were in: nothing to drain"
        time.sleep(0.05)
      replicas = {r: replica(r) for r in "01"}
      proc.send_signal(signal.SIGTERM)
      answers = [f.result() for f in futures]
    assert proc.wait(120) == 0
    assert replicas == {"0": 1, "1": 1}, replicas  # the first batch of 2 was split
  finally:
    if proc.poll() is None:
      proc.kill()
  want = [r["text"] for r in model.generate([None] * 4, questions, max_new_tokens=MAX)]
  assert [(a.status_code, a.json()["choices"][0]["message"]["content"]) for a in answers] == \
      [(200, w) for w in want]
  with pytest.raises(httpx.ConnectError):
    httpx.get(url + "/health")
  log = proc.stdout.read()
  assert "Shutting down" in log and "Finished server process" in log, log
