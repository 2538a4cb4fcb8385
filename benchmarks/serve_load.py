"""`m3 serve` under load: throughput and latency with and without batching, 8 concurrent clients, mixed scales.

    python -m benchmarks.serve_load [--configs tiny] [--clients 8] [--requests 6] [--max-tokens 16]
                                    [--batch-wait-ms 5] [--out benchmarks/serve_load.md]

For each config a random checkpoint (the probe tokenizer, vicuna_v1) is served in this process (uvicorn in a thread on
127.0.0.1) twice: `--max-batch 8` (batching) and `--max-batch 1` (one request at a time). Each client is a closed
loop: it sends `--requests` chat requests one after the other (its own random 48x48 PNG as a data: URI, scales cycling
over the checkpoint's chain, greedy, `max_tokens` tokens; random weights rarely stop early) over plain HTTP. Reported: requests/s and generated tokens/s over
the wall time of the timed pass, p50 / p95 request latency, mean batch size; the load average before and after.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import pathlib
import tempfile
import threading
import time

import httpx
import jax
import numpy as np
from PIL import Image

from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval.loader import load
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax.serve.app import create_app


def loadavg() -> str:
  return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def checkpoint(name: str, root: pathlib.Path) -> pathlib.Path:
  cfg = ModelConfig.from_config(m3_config.load(name).model)
  path = root / name
  m3dir.save(path, cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
             template="vicuna_v1")
  return path


def png(seed: int, size: int) -> str:
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def serve(model, **options):
  import socket
  import uvicorn
  app = create_app(model, name="bench", **options)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.02)
  return server, thread, app, f"http://127.0.0.1:{port}"


def drive(url: str, clients: int, requests: int, scales, max_tokens: int, size: int):
  """-> (wall seconds, latencies, generated tokens)."""
  images = [png(c, size) for c in range(clients)]

  def client(c: int):
    out = []
    with httpx.Client(timeout=600) as http:
      for r in range(requests):
        body = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what colour is the picture?"},
            {"type": "image_url", "image_url": {"url": images[c]}}]}],
            "max_tokens": max_tokens, "visual_tokens": scales[(c + r) % len(scales)]}
        t = time.monotonic()
        resp = http.post(url + "/v1/chat/completions", json=body)
        resp.raise_for_status()
        out.append((time.monotonic() - t, resp.json()["usage"]["completion_tokens"]))
    return out

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [x for xs in pool.map(client, range(clients)) for x in xs]
  return time.monotonic() - start, [lat for lat, _ in results], sum(n for _, n in results)


def run(name: str, args, root: pathlib.Path) -> list[dict]:
  model = load(checkpoint(name, root))
  rows = []
  for label, max_batch in (("batching (--max-batch 8)", 8), ("sequential (--max-batch 1)", 1)):
    server, thread, app, url = serve(model, max_batch=max_batch, batch_wait_ms=args.batch_wait_ms)
    try:
      app.state.scheduler.warmup("what colour is the picture?", args.max_tokens)
      drive(url, args.clients, 2, sorted(model.scales), args.max_tokens, model.config.vision.image_size)  # warm-up
      hist = app.state.metrics.registry
      n0, s0 = hist.get_sample_value("m3_batch_size_count"), hist.get_sample_value("m3_batch_size_sum")
      before = loadavg()
      wall, lat, tokens = drive(url, args.clients, args.requests, sorted(model.scales), args.max_tokens,
                                model.config.vision.image_size)
      batches = hist.get_sample_value("m3_batch_size_count") - n0
      mean_batch = (hist.get_sample_value("m3_batch_size_sum") - s0) / batches
    finally:
      server.should_exit = True
      thread.join()
    rows.append({"config": name, "mode": label, "requests": len(lat), "req_s": len(lat) / wall,
                 "tok_s": tokens / wall, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                 "mean_batch": mean_batch, "load": f"{before} -> {loadavg()}"})
    print(rows[-1], flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny")
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--requests", type=int, default=6, help="per client, timed")
  p.add_argument("--max-tokens", type=int, default=16)
  p.add_argument("--batch-wait-ms", type=float, default=5.0)
  p.add_argument("--out", default=None, help="write the table (markdown) here")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    rows = [r for name in args.configs.split(",") for r in run(name, args, pathlib.Path(tmp))]
  lines = [f"{args.clients} closed-loop clients x {args.requests} requests, max_tokens {args.max_tokens}, scales "
           "cycling, greedy; `m3 serve` in-process on 127.0.0.1", "",
           "| config | mode | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | mean batch | load average |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r['mode']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | "
                 f"{r['p95']:.2f} | {r['mean_batch']:.1f} | {r['load']} |")
  by = {(r["config"], r["mode"].split()[0]): r for r in rows}
  for name in args.configs.split(","):
    lines.append(f"\n{name}: batching / sequential throughput = "
                 f"{by[name, 'batching']['req_s'] / by[name, 'sequential']['req_s']:.2f}x")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
