"""The engine's per-row sampling (`Engine.generate_rows`), which the server batches requests with: a row's tokens
equal the same request generated alone, whatever its batch, position, neighbours' settings or streaming."""
import jax
import numpy as np
import pytest

from m3_jax.configs import base as m3_config
from m3_jax.eval.generate import Engine, Sampling, row_keys
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

IMG, EOS = 4, 2


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.from_config(m3_config.load("tiny").model)
  engine = Engine(cfg, llava.init_params(cfg, jax.random.key(0)), stop_ids=(EOS,))
  pixels = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype(np.float32)
  prompts = [np.array([1, IMG, 10, 11, 12]), np.array([1, 20, IMG, 30]), np.array([1, 5, 6, 7, 8, 9, 10])]
  visual = engine.visual_tokens(pixels, [9, 36, 1])
  visual[2] = None
  return engine, prompts, visual


def test_row_keys_are_the_keys_of_each_seed_alone():
  # The whole range a request's seed may take (protocol.SEED_MAX), where int32 and uint32 readings differ.
  seeds = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
  got = np.asarray(jax.random.key_data(row_keys(seeds)))
  want = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
  np.testing.assert_array_equal(got, want)


def test_rows_equal_each_request_alone_at_its_own_sampling(setup):
  engine, prompts, visual = setup
  temps, tops, seeds = [1.0, 0.0, 0.7], [0.9, 1.0, 1.0], [11, 0, 5]
  batched = engine.generate_rows(prompts, visual, 8, temps, tops, seeds)
  alone = [engine.generate([p], [v], Sampling(8, t, q, s))[0]
           for p, v, t, q, s in zip(prompts, visual, temps, tops, seeds)]
  assert batched == alone
  # Reordered: the same answers, so a row's draw does not depend on its position or batch size.
  order = [2, 0, 1]
  again = engine.generate_rows([prompts[i] for i in order], [visual[i] for i in order], 8,
                               [temps[i] for i in order], [tops[i] for i in order], [seeds[i] for i in order])
  assert [again[order.index(i)] for i in range(3)] == batched
  # Sampling really samples: another seed changes the sampled row, not the greedy one.
  other = engine.generate_rows(prompts, visual, 8, temps, tops, [12, 0, 6])
  assert other[0] != batched[0] and other[1] == batched[1]


def test_on_token_streams_every_step_of_every_row(setup):
  engine, prompts, visual = setup
  steps = []
  out = engine.generate_rows(prompts, visual, 6, [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0, 3, 0],
                             on_token=lambda step, tok: steps.append((step, tok.tolist())))
  assert [s for s, _ in steps] == list(range(len(steps))) and len(steps) <= 6   # never past max_new (bucket 8)
  assert all(len(tok) == 3 for _, tok in steps)
  for i, row in enumerate(out):
    assert [tok[i] for _, tok in steps][:len(row)] == row
  assert out == engine.generate_rows(prompts, visual, 6, [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0, 3, 0])
