"""Run configs the trainer refuses, with an error that says why."""
import pytest

from m3_jax import config as m3_config
from m3_jax.train.trainer import model_config_of


def test_llava_next_training_is_refused_clearly():
  with pytest.raises(ValueError, match="training with LLaVA-NeXT anyres crops .* is not implemented"):
    model_config_of(m3_config.load("configs/llava_next_7b_m3.py"))


def test_the_7b_recipe_is_the_papers():
  c = m3_config.load("configs/llava15_7b_m3.py:init=ckpt/llava15")
  assert model_config_of(c).m3.scales == (576, 144, 36, 9, 1)
  assert (c.train.lr, c.train.batch_size, c.train.warmup_ratio, c.data.max_length) == (2e-5, 128, 0.03, 2048)
  assert c.checkpoint.init_from == "ckpt/llava15"
