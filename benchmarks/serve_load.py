"""`m3 serve` under load: what batching buys over one request at a time, over HTTP and, as its ceiling, in the
engine alone.

    python -m benchmarks.serve_load [--configs tiny] [--clients 8] [--requests 6] [--max-tokens 16] [--scales 9,1]
                                    [--batch-wait-ms 5] [--batching static,continuous] [--data-parallel N]
                                    [--repeats 3] [--rounds 5] [--out benchmarks/serve_load.md]

For each config a random checkpoint (the probe tokenizer, vicuna_v1) is written. The workload: client c's r-th
request asks about its own random PNG (a data: URI) at scale `scales[(c + r) % len(scales)]` (`--scales`, default
the checkpoint's chain), greedy, `--max-tokens` (random weights rarely stop early).

- Engine only (in this process, no HTTP): the clients' r-th requests for each r < len(scales), their prompt ids and
  pixels made as the server makes them, run (a) one at a time (`engine.visual_tokens` + `engine.generate_rows`,
  batch 1), (b) as one engine batch per r (the encoder once per scale group, rows padded to a power of two, then one
  `generate_rows`: the scheduler's way of running a batch) and (c) in the batches the scheduler's rule makes of them
  when they wait together in client order (the oldest leads; others join only when their visual tokens fit its
  padded count); with `--data-parallel N` (d) as (b) split into N shares run concurrently on N engine replicas, one
  per device (this process asks JAX for N CPU devices), as the server splits a batch. Median of `--repeats`. (b) /
  (a) is the most one engine batch can buy on this machine; (c) / (a) what the rule leaves of it.
- Served: `python -m m3_jax serve --ckpt CKPT --port P --max-batch B --batching MODE --warmup` as subprocesses on
  127.0.0.1 (each its own GIL), B = 8 with each `--batching` mode, B = 8 static with `--data-parallel N` when N > 1,
  and B = 1 (sequential, the baseline of every ratio; when N > 1 also a sequential server with `--data-parallel N`,
  which one request at a time cannot use, reported beside it), all up at once and each ended by SIGTERM (it drains;
  its exit status is reported); with continuous batching, "mean batch" is the mean of active rows per chunk of
  decode steps and "worker busy" the chunks' share of the wall. The clients are asyncio tasks of this process over
  one aiohttp session, each a closed loop sending `--requests` requests one after the other. Warm-up passes (2
  requests per client) run until one compiles nothing. Then `--rounds` timed passes a server, alternating between
  the servers round by round, in reverse order every other round (this machine's speed drifts by 2x within
  minutes: one server timed after another measured the drift as much as the batching); the ratio to sequential is
  each round's batched pass over that round's sequential pass, their median reported with their range.

Every XLA program the server can meet is compiled here first (`Scheduler.warmup` for this prompt and max_tokens,
which the engine-only runs need anyway) into the persistent compilation cache the server reads; the server logs its
compilations (JAX_LOG_COMPILES) and the table counts those inside the timed pass (0 when the warm-up did its job).
Served rows: requests/s, generated tokens/s, client p50 / p95 latency, mean client and server-side latency (the
server's from the handler's start to its answer, /metrics), mean batch, the worker's busy fraction (its batch
seconds over the wall), the load average before -> after.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import httpx
import jax
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from m3_jax import compile_cache
from m3_jax.checkpoint import m3dir
from m3_jax.cli.serve import cpu_devices
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval.generate import replicas
from m3_jax.eval.loader import load
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax.serve import chat, images
from m3_jax.serve.metrics import Metrics
from m3_jax.serve.protocol import ChatRequest
from m3_jax.serve.scheduler import Job, Scheduler, encode_by_scale, run_shares, shares

PROMPT = "what colour is the picture?"
COMPILED = re.compile(r"Finished XLA compilation of \S+ in ([0-9.]+) sec")


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


def request(image: str, scale: int, max_tokens: int) -> dict:
  return {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                    {"type": "image_url", "image_url": {"url": image}}]}],
          "max_tokens": max_tokens, "visual_tokens": scale}


# ------------------------------------------------------------------------------------------------- engine only
def job(model, body: dict) -> Job:
  """The request as the server makes it a Job: prompt ids and scale (chat.prepare), CLIP pixels float32[H, W, 3]."""
  prompt = chat.prepare(ChatRequest.model_validate(body), model, False)
  pixels = model.pixels([images.resolve(prompt.image_url, None, 4096 * 4096)])[0]
  return Job(prompt, pixels, None, 0.0, 1.0, 0, False, None, None)


def run_batch(engine, jobs: list[Job]) -> tuple[float, float]:
  """One engine batch as the scheduler runs it (LLaVA-1.5): the encoder once per scale group, its rows padded to a
  power of two, then one generate_rows -> (encoder seconds, generate seconds)."""
  start = time.perf_counter()
  for j in jobs:
    j.scale = j.prompt.scale
  encode_by_scale(engine, jobs)
  encoded = time.perf_counter()
  n = len(jobs)
  engine.generate_rows([j.prompt.ids for j in jobs], [j.visual for j in jobs],
                       max(j.prompt.max_tokens for j in jobs), [0.0] * n, [1.0] * n, [0] * n)
  return encoded - start, time.perf_counter() - encoded


def run_split(engines, jobs: list[Job], pool: ThreadPoolExecutor) -> float:
  """One engine batch split between replicas as the scheduler splits it (a share each, concurrently) -> seconds."""
  start = time.perf_counter()
  for e in run_shares(engines, shares(jobs, len(engines)), run_batch, pool):
    if e is not None:
      raise e
  return time.perf_counter() - start


def scheduler_batches(model, waiting: list[Job], max_batch: int) -> list[list[Job]]:
  """The batches the scheduler's own rule (Scheduler._next_batch) makes of `waiting`, oldest first."""
  scheduler = Scheduler(model, Metrics(), max_batch=max_batch, max_queue=len(waiting), batch_wait_s=0.0)
  scheduler.waiting.extend(waiting)
  batches = []
  while scheduler.waiting:
    batches.append(scheduler._next_batch())
  return batches


def engine_only(model, rounds: list[list[dict]], max_batch: int, repeats: int, data_parallel: int = 1
                ) -> tuple[list[dict], float]:
  """rounds[r]: the clients' r-th requests in client order -> (rows, host ms per request: validate + tokenize +
  PNG decode + CLIP preprocessing, the work the server does per request before the engine)."""
  start = time.perf_counter()
  jobs = [[job(model, body) for body in bodies] for bodies in rounds]
  host_ms = 1000 * (time.perf_counter() - start) / sum(map(len, jobs))
  plans = {
      "one at a time (batch 1)": [[j] for r in jobs for j in r],
      f"batches of {min(max_batch, len(jobs[0]))}": [r[i:i + max_batch] for r in jobs
                                                    for i in range(0, len(r), max_batch)],
      "the scheduler's batches": [b for r in jobs for b in scheduler_batches(model, r, max_batch)],
  }
  rows = []
  for label, batches in plans.items():
    before = loadavg()
    for batch in batches:  # untimed: any program not yet compiled
      run_batch(model.engine, batch)
    times = []
    for _ in range(repeats):
      enc = gen = 0.0
      for batch in batches:
        e, g = run_batch(model.engine, batch)
        enc, gen = enc + e, gen + g
      times.append((enc + gen, enc, gen))
    wall, enc, gen = sorted(times)[len(times) // 2]
    n = sum(map(len, batches))
    rows.append({"mode": label, "requests": n, "req_s": n / wall, "encode_ms": 1000 * enc / n,
                 "generate_ms": 1000 * gen / n, "mean_batch": n / len(batches), "load": f"{before} -> {loadavg()}"})
    print(rows[-1], flush=True)
  if data_parallel > 1:
    engines = replicas(model.engine, data_parallel)
    batches = plans[f"batches of {min(max_batch, len(jobs[0]))}"]
    before = loadavg()
    with ThreadPoolExecutor(data_parallel - 1) as pool:
      for batch in batches:  # untimed: each replica's programs
        run_split(engines, batch, pool)
      wall = sorted(sum(run_split(engines, b, pool) for b in batches) for _ in range(repeats))[repeats // 2]
    n = sum(map(len, batches))
    rows.append({"mode": f"batches of {min(max_batch, len(jobs[0]))} split over {data_parallel} replicas",
                 "requests": n, "req_s": n / wall, "encode_ms": None, "generate_ms": None,
                 "mean_batch": n / len(batches), "load": f"{before} -> {loadavg()}"})
    print(rows[-1], flush=True)
  return rows, host_ms


# ------------------------------------------------------------------------------------------------------ served
class Server:
  """`python -m m3_jax serve` in a subprocess on 127.0.0.1, its output (compilations logged) in `log`."""

  def __init__(self, ckpt: pathlib.Path, log: pathlib.Path, max_batch: int, batch_wait_ms: float,
               batching: str = "static", data_parallel: int = 1, start_timeout: float = 3600):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url, self.log = f"http://127.0.0.1:{port}", log
    self.cmd = [sys.executable, "-m", "m3_jax", "serve", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port",
                str(port), "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms), "--warmup",
                "--served-model-name", "bench", "--batching", batching, "--data-parallel", str(data_parallel)]
    with open(log, "wb") as out:
      self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, JAX_LOG_COMPILES="1"))
    deadline = time.monotonic() + start_timeout
    try:
      while not self.healthy():
        if self.proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"`{shlex.join(self.cmd)}` did not serve (exit {self.proc.poll()}):\n"
                             + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    except BaseException:  # (not serving, or interrupted while it starts: no server is left behind)
      self.stop()
      raise

  def healthy(self) -> bool:
    try:
      return httpx.get(self.url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
      return False

  def metrics(self) -> dict[str, float]:
    text = httpx.get(self.url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

  def compiles(self, since: int) -> tuple[int, float]:
    """XLA compilations (persistent-cache loads included) logged past byte `since` -> (count, seconds)."""
    with open(self.log, "rb") as f:
      f.seek(since)
      found = [float(s) for s in COMPILED.findall(f.read().decode(errors="replace"))]
    return len(found), sum(found)

  def log_size(self) -> int:
    return self.log.stat().st_size

  def stop(self) -> int:
    """SIGTERM: the server stops accepting, drains and should exit 0 -> its exit status."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode


def drive(url: str, bodies: list[list[bytes]], scales: list[list[int]], status: int = 200):
  """Client c sends bodies[c] one after the other, each answered `status` -> (wall seconds, latencies, generated
  tokens). The clients are asyncio tasks over one aiohttp session (as vLLM's benchmark_serving drives a server):
  a load generator on the server's 2 cores must cost little beside it. httpx clients in threads cost 7-9 ms of
  CPU per request here, more than the server's HTTP work (aiohttp: 0.4-0.5 ms)."""

  async def client(session: aiohttp.ClientSession, c: int):
    out = []
    for data, scale in zip(bodies[c], scales[c]):
      t = time.monotonic()
      async with session.post(url + "/v1/chat/completions", data=data,
                              headers={"content-type": "application/json"}) as resp:
        text = await resp.text()
      if resp.status != status:
        raise AssertionError(f"client {c}: HTTP {resp.status} ({text[:300]}), expected {status}")
      answer = json.loads(text)
      if status == 200 and answer["scale"] != scale:
        raise AssertionError(f"client {c} asked for scale {scale}, the answer used {answer['scale']}")
      out.append((time.monotonic() - t, answer["usage"]["completion_tokens"] if status == 200 else 0))
    return out

  async def run():
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
      start = time.monotonic()
      results = await asyncio.gather(*(client(session, c) for c in range(len(bodies))))
      return time.monotonic() - start, [x for xs in results for x in xs]

  wall, results = asyncio.run(run())
  return wall, [lat for lat, _ in results], sum(n for _, n in results)


def served(ckpt: pathlib.Path, log_prefix: pathlib.Path, images_: list[str], scales: list[int], args) -> list[dict]:
  def workload(requests: int, scales: list[int], clients: int = args.clients):
    sc = [[scales[(c + r) % len(scales)] for r in range(requests)] for c in range(clients)]
    return [[json.dumps(request(images_[c], s, args.max_tokens)).encode() for s in sc[c]] for c in range(clients)], sc

  timed, warm = workload(args.requests, scales), workload(2, scales)
  # The same bodies with a scale the checkpoint lacks: answered 400 by chat.prepare, before the image is decoded
  # and before the engine; what HTTP, JSON and pydantic cost per request.
  refused = workload(max(args.requests, 8), [-1])
  dp = args.data_parallel
  modes = [(f"batching (--max-batch 8, --batching {b})", 8, b, 1) for b in args.batching.split(",")]
  if dp > 1:
    modes.append((f"batching (--max-batch 8, --batching static, --data-parallel {dp})", 8, "static", dp))
    modes.append((f"sequential (--max-batch 1, --data-parallel {dp})", 1, "static", dp))
  modes.append(("sequential (--max-batch 1)", 1, "static", 1))  # the baseline: last
  servers, codes = {}, {}
  try:
    for label, max_batch, batching, replicas_ in modes:
      server = servers[label] = Server(
          ckpt, pathlib.Path(f"{log_prefix}serve-{max_batch}-{batching}-dp{replicas_}.log"), max_batch,
          args.batch_wait_ms, batching, replicas_)
      # Warm-up until a round compiles nothing (`--warmup` compiled the decode for max_tokens 32 only): bursts of
      # b requests at one scale, which the scheduler batches into each power-of-two size, then the workload.
      for _ in range(3):
        mark = server.log_size()
        for scale in sorted(scales, reverse=True):
          for b in (8, 4, 2, 1):
            drive(server.url, *workload(1, [scale], clients=min(b, max_batch)))
        if server.compiles(mark)[0] == 0:
          break
      for _ in range(5):
        mark = server.log_size()
        drive(server.url, *warm)
        if server.compiles(mark)[0] == 0:
          break
    # The timed passes alternate between the servers, round by round: this machine's speed drifts by 2x within
    # minutes, and one server timed after another measured the drift as much as the batching. Each round's ratio
    # compares passes a few seconds apart.
    passes: dict[str, list[dict]] = {label: [] for label, *_ in modes}
    for r in range(args.rounds):
      for label, *_ in (modes if r % 2 == 0 else modes[::-1]):  # (drift within a round: both ways in turn)
        server = servers[label]
        m0, mark, before = server.metrics(), server.log_size(), loadavg()
        wall, lat, tokens = drive(server.url, *timed)
        passes[label].append({"wall": wall, "lat": lat, "tokens": tokens, "load": (before, loadavg()),
                              "compiles": server.compiles(mark), "m0": m0, "m1": server.metrics()})
    sequential = servers[modes[-1][0]]
    drive(sequential.url, *refused, status=400)  # warm
    before_400 = loadavg()
    wall_400, lat_400, _ = drive(sequential.url, *refused, status=400)
    after_400 = loadavg()
  finally:
    for label, server in servers.items():
      try:
        codes[label] = server.stop()
      except BaseException:  # (an interrupt while one drains: the others are still stopped)
        server.proc.kill()
        codes[label] = "killed"

  rows = []
  seq = passes[modes[-1][0]]
  for label, *_ in modes:
    ps = passes[label]
    lat = [x for p in ps for x in p["lat"]]
    d = {k: sum(p["m1"][k] - p["m0"].get(k, 0.0) for p in ps) for k in ps[0]["m1"]}
    wall, tokens = sum(p["wall"] for p in ps), sum(p["tokens"] for p in ps)
    rates = [len(p["lat"]) / p["wall"] for p in ps]
    ratios = [r / (len(q["lat"]) / q["wall"]) for r, q in zip(rates, seq)]
    rows.append({"mode": label, "requests": len(lat), "req_s": float(np.median(rates)),
                 "req_s_range": f"{min(rates):.1f}-{max(rates):.1f}", "ratios": ratios,
                 "tok_s": f"{tokens / wall:.0f}",
                 "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                 "client_ms": 1000 * float(np.mean(lat)),
                 "server_ms": f"{1000 * d['m3_request_latency_seconds_sum'] / len(lat):.1f}",
                 "mean_batch": f"{d['m3_batch_size_sum'] / d['m3_batch_size_count']:.1f}",
                 "busy": f"{100 * d['m3_batch_seconds_sum'] / wall:.0f}%",
                 "compiles": f"{sum(p['compiles'][0] for p in ps)} ({sum(p['compiles'][1] for p in ps):.1f} s)",
                 "exit": codes[label], "load": f"{ps[0]['load'][0]} -> {ps[-1]['load'][1]}"})
    print(rows[-1], flush=True)
  rows.append({"mode": "HTTP only: the same bodies refused (400, invalid visual_tokens) before image and engine",
               "requests": len(lat_400), "req_s": len(lat_400) / wall_400, "req_s_range": "-", "tok_s": "-",
               "p50": float(np.percentile(lat_400, 50)), "p95": float(np.percentile(lat_400, 95)),
               "client_ms": 1000 * float(np.mean(lat_400)), "server_ms": "-", "mean_batch": "-", "busy": "-",
               "compiles": "-", "exit": rows[-1]["exit"], "load": f"{before_400} -> {after_400}"})
  print(rows[-1], flush=True)
  return rows


# -------------------------------------------------------------------------------------------------------- main
def run(name: str, args, root: pathlib.Path) -> list[str]:
  ckpt = checkpoint(name, root)
  model = load(ckpt)
  scales = [int(s) for s in args.scales.split(",")] if args.scales else sorted(model.scales)
  for s in scales:
    model.config.check_scale(s)
  size = model.config.vision.image_size
  images_ = [png(c, size) for c in range(args.clients)]
  print(f"{name}: compiling every batch size x scale for this prompt and max_tokens "
        f"({Scheduler(model, Metrics(), max_batch=8, max_queue=1, batch_wait_s=0).warmup(PROMPT, args.max_tokens)} "
        "engine calls)", flush=True)
  rounds = [[request(images_[c], scales[(c + r) % len(scales)], args.max_tokens) for c in range(args.clients)]
            for r in range(len(scales))]
  engine_rows, host_ms = engine_only(model, rounds, 8, args.repeats, args.data_parallel)
  served_rows = served(ckpt, root / f"{name}-", images_, scales, args)

  lines = [f"{name}, engine only (in-process, no HTTP; the clients' first {len(scales)} rounds of requests, "
           f"median of {args.repeats}):", "",
           "| config | how | requests | requests/s | encoder ms / request | generate ms / request | mean batch "
           "| load average |", "|---|---|---|---|---|---|---|---|"]
  ms = lambda v: "-" if v is None else f"{v:.2f}"  # (a split batch's shares overlap: no encoder / decode split)
  for r in engine_rows:
    lines.append(f"| {name} | {r['mode']} | {r['requests']} | {r['req_s']:.1f} | {ms(r['encode_ms'])} | "
                 f"{ms(r['generate_ms'])} | {r['mean_batch']:.1f} | {r['load']} |")
  lines += ["", f"{name}, served (`m3 serve` subprocesses on 127.0.0.1, {args.clients} closed-loop aiohttp clients x "
            f"{args.requests} requests a pass, {args.rounds} timed passes a server, alternating between the servers "
            "round by round; requests/s: the median pass (the range); tokens/s and latencies: over all passes):", "",
            "| config | mode | requests | requests/s | tokens/s | p50 (s) | p95 (s) | mean latency client / server "
            "(ms) | mean batch | worker busy | compiles in timed passes | exit | load average |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in served_rows:
    lines.append(f"| {name} | {r['mode']} | {r['requests']} | {r['req_s']:.1f} ({r['req_s_range']}) | {r['tok_s']} | "
                 f"{r['p50']:.3f} | {r['p95']:.3f} | {r['client_ms']:.1f} / {r['server_ms']} | {r['mean_batch']} | "
                 f"{r['busy']} | {r['compiles']} | {r['exit']} | {r['load']} |")
  seq, one, rule = (r["req_s"] for r in engine_rows[:3])
  split = (f", one batch split over {args.data_parallel} replicas / one at a time = "
           f"**{engine_rows[3]['req_s'] / seq:.2f}x**" if len(engine_rows) > 3 else "")
  # Each round's batched pass over the sequential pass of the same round: the median, and the range over rounds.
  ratios = ", ".join(f"{r['mode'].split('--batching ')[1].rstrip(')')} **{np.median(r['ratios']):.2f}x** "
                     f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
                     for r in served_rows if "--batching" in r["mode"])
  if args.data_parallel > 1:  # the baseline given the replicas too (one request at a time uses one)
    r = next(r for r in served_rows if r["mode"] == f"sequential (--max-batch 1, --data-parallel {args.data_parallel})")
    ratios += (f"; sequential with --data-parallel {args.data_parallel} {np.median(r['ratios']):.2f}x "
               f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f})")
  lines += ["", f"{name}: served batching / sequential, the median of the rounds' ratios (their range): {ratios};"
            f" engine alone (no HTTP; the ceiling is the better of the two): one batch / one at a time = "
            f"**{one / seq:.2f}x**, the scheduler's batches / one at a time = **{rule / seq:.2f}x** (mean batch "
            f"{engine_rows[2]['mean_batch']:.1f}){split}; host work per "
            f"request in-process (validate, tokenize, PNG decode, CLIP preprocessing) {host_ms:.1f} ms."]
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny")
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--requests", type=int, default=6, help="per client, timed")
  p.add_argument("--max-tokens", type=int, default=16)
  p.add_argument("--scales", default=None,
                 help="comma-separated visual-token scales the requests cycle over (default: the checkpoint's)")
  p.add_argument("--batch-wait-ms", type=float, default=5.0)
  p.add_argument("--batching", default="static",
                 help="the server's batching modes to measure at --max-batch 8, comma-separated (static,continuous)")
  p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                 help="also measure static batching over N engine replicas (m3 serve --data-parallel N; the "
                      "sequential server gets it too); this process and the servers ask JAX for N CPU devices")
  p.add_argument("--repeats", type=int, default=3, help="engine-only timings: the median of this many")
  p.add_argument("--rounds", type=int, default=5, help="served: timed passes a server, alternating between them")
  p.add_argument("--out", default=None, help="write the tables (markdown) here")
  p.add_argument("--workdir", default=None, help="keep the checkpoints and the servers' logs here (default: a "
                 "temporary folder)")
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds {args.rounds}: expected at least 1 timed pass a server")
  if args.data_parallel < 1:
    p.error(f"--data-parallel {args.data_parallel}: expected at least 1 engine replica")
  if args.data_parallel > 1:
    cpu_devices(args.data_parallel)
  compile_cache.enable()  # the server subprocess reads what the warm-up here compiles
  command = "python -m benchmarks.serve_load " + shlex.join(sys.argv[1:] if argv is None else argv)
  lines = [f"`{command}`"]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(args.workdir or tmp)
    root.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
      lines += [""] + run(name, args, root)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
