"""`m3 serve --ckpt CKPT [--host H] [--port P] [--max-batch B] [--max-queue Q] [--allowed-image-dir DIR]
[--request-timeout S] [--batch-wait-ms MS] [--batching static|continuous] [--data-parallel N]`: an
OpenAI-compatible chat server (m3_jax/serve/)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import signal

import uvicorn


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--ckpt", required=True, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--template", default="auto", choices=["auto", "vicuna_v1", "llava_hf", "plain", "none"],
                 help="chat template; auto = the one recorded at conversion")
  p.add_argument("--router", default=None, metavar="PATH",
                 help='the scale router answering visual_tokens "auto" (default: router/ in the checkpoint\'s '
                      'folder, written by `m3 router fit`; none: "auto" is answered 400)')
  p.add_argument("--served-model-name", default=None,
                 help="the model id of /v1/models and requests' `model` (default: the checkpoint folder's name)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
  p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
  p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one engine batch")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests waiting for a batch; beyond it the server answers 503 with Retry-After")
  p.add_argument("--batch-wait-ms", type=float, default=5.0,
                 help="a batch gathers requests while they arrive less than this apart (from the first waiting "
                 "request's arrival or the previous batch's end, whichever is later; at most 4 such waits, within "
                 "which a gather after a batch waits for one new arrival; default 5)")
  p.add_argument("--batching", choices=("static", "continuous"), default="static",
                 help="static (default): a batch decodes until its longest answer ends, then the next batch is "
                 "gathered; continuous: requests join and leave the running decode every 8 steps, in --max-batch "
                 "rows (LLaVA-1.5 and NeXT)")
  p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                 help="engine replicas on the first N devices; each batch's requests are split between them and run "
                      "concurrently (static batching; one request at a time uses one). On CPU, JAX is asked for N "
                      "devices before it starts (default: 1)")
  p.add_argument("--request-timeout", type=float, default=600.0,
                 help="seconds from receipt to answer; later requests get 504 and leave the queue")
  p.add_argument("--allowed-image-dir", default=None,
                 help="image_url may be a local path under this folder (default: data: URIs only)")
  p.add_argument("--warmup", action="store_true",
                 help="compile every power-of-two batch size x scale before serving (a prompt of a few words, "
                 "max_tokens 32), so that first requests do not wait for XLA; with --batching continuous only "
                 "the encoder's programs are among them (the timeline's prefill and decode chunks compile on "
                 "first use)")
  p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                 help="larger images are refused (400) from their header, before decoding, and so are images "
                      "whose preprocessing would make a larger one (LLaVA-1.5 pads to a square: 8192x1 is 8192^2)")
  p.epilog = ("example:\n  m3 serve --ckpt runs/demo/train --served-model-name m3 --port 8000 --allowed-image-dir .\n"
              "  curl -s http://127.0.0.1:8000/v1/models")


def run(args) -> int:
  from m3_jax.eval.loader import load
  from m3_jax.serve.app import create_app

  for flag in ("max_batch", "max_queue", "max_image_pixels", "data_parallel"):
    if getattr(args, flag) < 1:
      raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
  if args.allowed_image_dir is not None and not pathlib.Path(args.allowed_image_dir).is_dir():
    raise ValueError(f"--allowed-image-dir {args.allowed_image_dir}: not a directory")
  if args.data_parallel > 1 and args.batching != "static":
    raise ValueError(f"--data-parallel {args.data_parallel} needs --batching static: continuous batching runs "
                     "one decode timeline on one device")
  if args.data_parallel > 1:
    cpu_devices(args.data_parallel)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  model = load(args.ckpt, step=args.step, template=args.template, router=args.router)
  name = args.served_model_name or pathlib.Path(args.ckpt).resolve().name
  app = create_app(model, name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                   batch_wait_ms=args.batch_wait_ms, request_timeout=args.request_timeout,
                   allowed_image_dir=args.allowed_image_dir, max_image_pixels=args.max_image_pixels,
                   batching=args.batching, data_parallel=args.data_parallel)
  if args.warmup:
    logging.getLogger("m3.serve").info("warm-up: %d engine calls", app.state.scheduler.warmup())
  # On SIGTERM / SIGINT uvicorn stops accepting and waits for the requests in flight, then the app's lifespan
  # ends the batching worker.
  DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run()
  return 0


def cpu_devices(n: int):
  """Asks JAX for n CPU devices, if it has not started and XLA_FLAGS does not already force a count (the user's, kept).
  On GPU / TPU the accelerators are the devices and this changes nothing; `replicas` checks what there is."""
  import jax
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # JAX has started: its devices are what they are
    pass


class DrainingServer(uvicorn.Server):
  @contextlib.contextmanager
  def capture_signals(self):
    # uvicorn's own re-raises the signal after the graceful shutdown, so a drained SIGTERM would still end the
    # process as killed (-15); here run() returns and `m3 serve` exits 0.
    previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
