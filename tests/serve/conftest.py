"""A tiny m3 checkpoint, its loaded model, and `m3 serve` in this process (uvicorn in a thread, loopback, a free
port) for the serve tests."""
import base64
import contextlib
import io
import socket
import threading
import time

import jax
import numpy as np
import pytest
import uvicorn
from PIL import Image

from m3_jax.configs import base as m3_config
from m3_jax.checkpoint import m3dir
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval.loader import load
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax.serve.app import create_app

NAME = "tiny-m3"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
  cfg = ModelConfig.from_config(m3_config.load("tiny").model)
  path = tmp_path_factory.mktemp("ckpt") / NAME
  m3dir.save(path, cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
                  template="vicuna_v1")
  return path


@pytest.fixture(scope="session")
def model(ckpt):
  return load(ckpt)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
  """Four PNG files (40x56, random) in an allowed folder."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / f"{i}.png")
  return root


def data_uri(path) -> str:
  return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_uri(array: np.ndarray, **save) -> str:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", **save)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(model, **options):
  """-> (base URL, the app): the server runs until the block ends."""
  app = create_app(model, name=NAME, **options)
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}", app
  finally:
    server.should_exit = True
    thread.join(60)
