"""Run configs the trainer refuses, with an error that says why."""
import pytest

from m3_jax.configs import base as m3_config
from m3_jax.train.state import model_config_of


def test_llava_next_training_is_refused_clearly():
  with pytest.raises(ValueError, match="training with LLaVA-NeXT anyres crops .* is not implemented"):
    model_config_of(m3_config.load("configs/llava_next_7b_m3.py"))


def test_the_7b_recipe_is_the_papers():
  c = m3_config.load("configs/llava15_7b_m3.py:init=ckpt/llava15")
  assert model_config_of(c).m3.scales == (576, 144, 36, 9, 1)
  assert (c.train.lr, c.train.batch_size, c.train.warmup_ratio, c.data.max_length) == (2e-5, 128, 0.03, 2048)
  assert c.checkpoint.init_from == "ckpt/llava15"


def test_finest_first_phase_has_its_own_schedule_then_the_full_one_resumes():
  import math
  from m3_jax.train import optim
  c = m3_config.load("configs/tiny.py", ["train.num_steps=100", "train.finest_first_steps=40",
                                         "train.warmup_ratio=0.1", "train.lr=1.0"])
  f = optim.schedule(1.0, c.train)
  full = lambda s: 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))   # warmup 10 of 100, then cosine to 0 at 100
  phase1 = lambda s: 0.5 * (1 + math.cos(math.pi * (s - 4) / 36))  # warmup 4 of 40, then cosine to 0 at 40
  assert float(f(2)) == 0.5                                           # 2 of 4 warmup steps
  for s in (10, 25, 39):
    assert abs(float(f(s)) - phase1(s)) < 1e-6
  for s in (40, 70, 99):
    assert abs(float(f(s)) - full(s)) < 1e-6
