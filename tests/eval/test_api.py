"""User conveniences: `load(...).generate` with plain strings, finish reasons and timing; task options reaching
the task (`--task-option`) and a video sample's collage option reaching the image the model sees."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from m3_jax import cli
from m3_jax.checkpoint import m3dir
from m3_jax.cli.score import make_task
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import evaluator
from m3_jax.eval.loader import load
from m3_jax.eval.tasks import Sample
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig


def test_plain_strings_give_one_result_with_finish_reason_and_timing(tmp_path):
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  ckpt = m3dir.save(tmp_path / "m3", cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
                    template="vicuna_v1")
  Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "cat.png")
  model = load(ckpt)
  one = model.generate(str(tmp_path / "cat.png"), "What?", scale=9, max_new_tokens=2)
  listed = model.generate([str(tmp_path / "cat.png")], ["What?"], scale=9, max_new_tokens=2)
  assert isinstance(one, dict) and isinstance(listed, list) and len(listed) == 1
  assert {k: v for k, v in one.items() if k != "seconds"} == {k: v for k, v in listed[0].items() if k != "seconds"}
  assert one["scale"] == 9 and one["visual_tokens"] == 9 and one["seconds"] > 0
  if len(one["token_ids"]) == 2:  # the random model did not stop within two tokens
    assert one["finish_reason"] == "length"
    # With its first token as a stop token the same answer ends at once.
    model.engine.stop_ids = (one["token_ids"][0],)
    stopped = model.generate(str(tmp_path / "cat.png"), "What?", scale=9, max_new_tokens=2)
    assert stopped["token_ids"] == [] and stopped["finish_reason"] == "stop"
  else:
    assert one["finish_reason"] == "stop"


def test_load_caches_the_chat_templates_header_as_a_prefix(tmp_path):
  """m3_jax.load's engine takes prompt prefixes up to the template's header (system prompt and first role marker):
  the probe tokenizer writes vicuna_v1's header in 32 tokens, BOS included, the tokens every prompt starts with."""
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  params = llava.init_params(cfg, jax.random.key(0))
  model = load(m3dir.save(tmp_path / "v", cfg, params, tokenizer_src=probe_tokenizer(), template="vicuna_v1"))
  words = ("<s> a chat between a curious user and an artificial intelligence assistant . the assistant gives "
           "helpful , detailed , and polite answers to the user ' s questions . user :").split()
  assert model.engine.prefix_limit == model.header_tokens() == len(words) == 32
  for question in ("What?", "How many?"):
    ids = model.prompt_ids(question, has_image=True)
    assert model.tokenizer.convert_ids_to_tokens(ids[:32].tolist()) == words
  image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
  model.generate([image, image], ["What?", "How many?"], scale=9, max_new_tokens=2)
  assert [len(k) for k in model.engine._prefix_cache] == [32]
  # A template without a system prompt shares no header: no prefix caching.
  hf = load(m3dir.save(tmp_path / "h", cfg, params, tokenizer_src=probe_tokenizer(), template="llava_hf"))
  assert hf.engine.prefix_limit == 0


def test_a_video_sample_is_shown_with_its_collage(tmp_path):
  for i in range(12):
    Image.fromarray(np.full((8, 10, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:03d}.png")
  sample = lambda collage: Sample("v", "q", "A", video=str(tmp_path), meta={"collage": collage})
  # igvlm: 3 rows x 2 columns of 10x8 frames; linspace_2x3: 2 rows x 3 columns
  assert evaluator.sample_image(sample("igvlm")).size == (20, 24)
  assert evaluator.sample_image(sample("linspace_2x3")).size == (30, 16)


def test_task_options_reach_the_task_and_bad_ones_are_named(tmp_path, capsys):
  task = make_task("nextqa", {"prompt": "llava", "collage": "linspace_2x3"})
  assert (task.prompt, task.collage) == ("llava", "linspace_2x3")
  with pytest.raises(ValueError, match=r"task 'pope' rejects the options \['foo'\]"):
    make_task("pope", {"foo": "1"})
  assert cli.main(["score", "pope", "--data", str(tmp_path), "--predictions", str(tmp_path / "p.jsonl"),
                   "--task-option", "foo=1"]) == 2
  assert "task 'pope' rejects the options ['foo']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["score", "pope", "--data", str(tmp_path), "--predictions", "p", "--task-option", "novalue"])
  assert "'novalue' is not KEY=VALUE" in capsys.readouterr().err
