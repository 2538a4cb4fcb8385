"""Run configs the trainer refuses, with an error that says why."""
import pytest

from m3_jax.configs import base as m3_config
from m3_jax.train.state import model_config_of


def test_random_per_sample_needs_batches_that_split_into_equal_groups():
  from m3_jax.train.curriculum import check_groups
  check_groups("random_per_sample", 16, 4)
  with pytest.raises(ValueError, match=r"splits each batch into 5 equal groups \(one per scale\), but "
                                       r"train.batch_size / train.grad_accum = 8 rows is not a multiple of 5"):
    check_groups("random_per_sample", 8, 5)
  assert model_config_of(m3_config.load("configs/llava_next_7b_m3.py")).type == "llava_next"   # trainable


def test_the_7b_recipe_is_the_papers():
  c = m3_config.load("configs/llava15_7b_m3.py:init=ckpt/llava15")
  assert model_config_of(c).m3.scales == (576, 144, 36, 9, 1)
  assert (c.train.lr, c.train.batch_size, c.train.warmup_ratio, c.data.max_length) == (2e-5, 128, 0.03, 2048)
  assert c.checkpoint.init_from == "ckpt/llava15"


def test_finest_first_phase_has_its_own_schedule_then_the_full_one_resumes():
  import math
  from m3_jax.train import curriculum
  c = m3_config.load("configs/tiny.py", ["train.num_steps=100", "train.finest_first_steps=40",
                                         "train.warmup_ratio=0.1", "train.lr=1.0"])
  f = curriculum.schedule(1.0, c.train)
  full = lambda s: 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))   # warmup 10 of 100, then cosine to 0 at 100
  phase1 = lambda s: 0.5 * (1 + math.cos(math.pi * (s - 4) / 36))  # warmup 4 of 40, then cosine to 0 at 40
  assert float(f(2)) == 0.5                                           # 2 of 4 warmup steps
  for s in (10, 25, 39):
    assert abs(float(f(s)) - phase1(s)) < 1e-6
  for s in (40, 70, 99):
    assert abs(float(f(s)) - full(s)) < 1e-6


def test_finest_first_steps_takes_a_fraction_of_num_steps_and_says_which_steps_train_which_scales():
  from m3_jax.train.curriculum import Curriculum
  c = m3_config.load("configs/tiny.py")
  assert c.train.num_steps == 900 and abs(c.train.finest_first_steps - 2 / 3) < 1e-12
  cur = Curriculum.of(c.train, (144, 36, 9, 1))
  assert cur.finest_first == 600
  assert cur.phases(900) == [(0, 600, (144,)), (600, 900, (144, 36, 9, 1))]
  assert cur.describe(900) == ("steps 0-599 train scale 144 only (train.finest_first_steps); steps 600-899 train "
                               "scales 144, 36, 9, 1 (the loss averaged over them)")
  short = m3_config.load("configs/tiny.py", ["train.num_steps=30"])   # the fraction follows num_steps
  assert Curriculum.of(short.train, (144, 36, 9, 1)).phases(30) == [(0, 20, (144,)), (20, 30, (144, 36, 9, 1))]
  steps = m3_config.load("configs/tiny.py", ["train.num_steps=30", "train.finest_first_steps=50"])
  assert Curriculum.of(steps.train, (144, 36, 9, 1)).describe(30) == (
      "steps 0-29 train scale 144 only (train.finest_first_steps); every scale is never trained "
      "(train.finest_first_steps=50 >= train.num_steps=30)")
  rand = m3_config.load("configs/tiny.py", ["train.num_steps=10", "train.scale_sampling='random'"])
  assert Curriculum.of(rand.train, (9, 1)).describe(10) == (  # tiny's finest-first 2/3 is not silently dropped
      "steps 0-9 train one scale drawn per step from 9, 1; no finest-first phase (train.finest_first_steps=7 "
      "applies to train.scale_sampling='all' only, not 'random')")


@pytest.mark.parametrize("key,value,match", [
    ("train.finest_first_steps", "-1", r"train.finest_first_steps=-1.0: expected 0 \(off\), a step count >= 1"),
    ("train.finest_first_steps", "1.5", r"train.finest_first_steps=1.5: expected"),
    ("train.scale_sampling", "'each'", r"train.scale_sampling='each': expected one of all, random"),
])
def test_bad_curriculum_values_are_named(key, value, match):
  from m3_jax.train.curriculum import Curriculum
  c = m3_config.load("configs/tiny.py", [f"{key}={value}"])
  with pytest.raises(ValueError, match=match):
    Curriculum.of(c.train, (9, 1))


def test_every_model_config_field_is_overridable():
  import dataclasses
  from m3_jax.models.config import ModelConfig
  c = m3_config.load("configs/tiny.py", ["model.llm.head_dim=64", "model.m3.pool=spatial"])
  assert (c.model.llm.head_dim, c.model.m3.pool) == (64, "spatial")
  assert m3_config.base().model.to_dict() == ModelConfig().to_dict()
  for f in dataclasses.fields(ModelConfig):
    assert f.name in c.model


@pytest.mark.parametrize("override,error,match", [
    ("model.llm.head_dimm=64", KeyError, r"config has no field 'model.llm.head_dimm' \(known in model.llm: .*'head_dim'"),
    ("train.lr=fast", TypeError, r"config field train.lr='fast': expected float .* got str"),
    ("train.num_steps=1.5", TypeError, r"config field train.num_steps='1.5': expected int"),
    ("train", ValueError, r"config override 'train' is not KEY=VALUE"),
])
def test_bad_overrides_name_the_key_and_the_expected_type(override, error, match):
  with pytest.raises(error, match=match):
    m3_config.load("tiny", [override])


def test_a_bad_pool_names_the_value_and_the_choices():
  from m3_jax.train.state import model_config_of
  with pytest.raises(ValueError, match="model.m3.pool='max': expected one of avg, spatial, sequential"):
    model_config_of(m3_config.load("tiny", ["model.m3.pool=max"]))


def test_the_released_checkpoints_recipe_freezes_clip():
  """`:released` is how the official code trained the released M3 checkpoints: CLIP's forward under no_grad."""
  released = m3_config.load("configs/llava15_7b_m3.py:init=ckpt/llava15,released")
  assert tuple(released.train.freeze) == ("vision",)
  assert (released.train.lr, released.train.batch_size, released.checkpoint.init_from) == (2e-5, 128, "ckpt/llava15")
  assert tuple(m3_config.load("configs/llava15_7b_m3.py:init=ckpt/llava15").train.freeze) == ()   # the paper's


def test_next_without_pinpoints_or_on_synthetic_batches_is_refused_by_name():
  from m3_jax.data import pipeline
  from m3_jax.errors import BadValue
  from m3_jax.train import loop
  config = m3_config.load("tiny:next", ["data.source='synthetic'"])
  with pytest.raises(BadValue, match=r"data.source='synthetic' makes LLaVA-1.5 batches .* model.type='llava_next'"):
    loop.make_batches(config, None)
  config = m3_config.load("tiny:next", ["model.anyres.grid_pinpoints=[]"])
  with pytest.raises(BadValue, match=r"model.type='llava_next' with model.anyres.grid_pinpoints empty"):
    pipeline.preprocess_for(config, None)
