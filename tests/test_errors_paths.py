"""Issue 11's path and silent-answer cases: task images stay in the task's image folder (unless
--allow-outside-images), the LLaVA JSON loader's data.follow_symlinks, a convert index naming files outside its
directory, a vision config without its shape fields, and an input longer than the model's context."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from m3_jax.convert import hf, reader
from m3_jax.data import sources
from m3_jax.data.errors import BadRecord
from m3_jax.errors import BadPath, InputTooLong
from m3_jax.eval.generate import Engine, Sampling
from m3_jax.eval.tasks import get_task
from m3_jax.eval.tasks.common import outside_images


@pytest.fixture
def outside(tmp_path) -> pathlib.Path:
  """tmp/images (the image folder, with link -> tmp/elsewhere and a.png) and tmp/elsewhere/b.png."""
  (tmp_path / "images").mkdir()
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "images" / "a.png").write_bytes(b"")
  (tmp_path / "elsewhere" / "b.png").write_bytes(b"")
  (tmp_path / "images" / "link").symlink_to(tmp_path / "elsewhere")
  return tmp_path


def _questions(path: pathlib.Path, images: list[str]) -> str:
  path.write_text("".join(json.dumps({"question_id": i, "image": im, "text": "q", "answer": "a"}) + "\n"
                          for i, im in enumerate(images)))
  return str(path)


@pytest.mark.parametrize("image,why", [
    ("{tmp}/elsewhere/b.png", "(an absolute path or a '..' part)"),
    ("../elsewhere/b.png", "(an absolute path or a '..' part)"),
    ("link/b.png", "through a symlink (to {tmp}/elsewhere/b.png)"),
])
def test_task_images_stay_in_their_folder(outside, image, why):
  image = image.format(tmp=outside)
  data = _questions(outside / "q.jsonl", ["a.png", image])
  task = get_task("llava_jsonl", image_folder=str(outside / "images"))
  with pytest.raises(BadPath) as e:
    list(task.samples(data))
  assert str(e.value) == (f"{data}, line 2: image path {image!r} escapes the image folder {outside}/images "
                          f"{why.format(tmp=outside)}; pass --allow-outside-images to read it anyway")
  with outside_images(True):
    got = [s.image for s in task.samples(data)]
  assert got == [f"{outside}/images/a.png", os.path.join(outside, "images", image)]


def test_llava_json_follows_symlinks_only_when_asked(outside):
  records = [{"id": "in", "image": "a.png", "conversations": []},
             {"id": "linked", "image": "link/b.png", "conversations": []},
             {"id": "dotdot", "image": "link/../../elsewhere/b.png", "conversations": []},
             {"id": "abs", "image": str(outside / "elsewhere" / "b.png"), "conversations": []}]
  (outside / "train.json").write_text(json.dumps(records))
  strict = sources.LlavaJson(outside / "train.json", outside / "images")
  assert strict[0]["image"] == str(outside / "images" / "a.png")
  assert strict[1]["_problem"] == (f"image path 'link/b.png' escapes the image folder {outside}/images through a "
                                   f"symlink (to {outside}/elsewhere/b.png); set data.follow_symlinks=True to allow "
                                   "links you made")
  follow = sources.LlavaJson(outside / "train.json", outside / "images", follow_symlinks=True)
  assert follow[1]["image"] == str(outside / "images" / "link" / "b.png") and "_problem" not in follow[1]
  for i in (2, 3):  # '..' and absolute record paths stay refused
    assert "(an absolute path or a '..' part)" in follow[i]["_problem"]
  with pytest.raises(BadRecord, match="record abs: image path"):
    sources.resolve_image(outside / "images", records[3]["image"], "abs", follow_symlinks=True)


def test_data_follow_symlinks_is_a_config_field():
  from m3_jax.configs import base
  assert base.load("tiny", ["data.follow_symlinks=True"]).data.follow_symlinks is True
  assert base.base().data.follow_symlinks is False


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/model.safetensors"])
def test_convert_index_may_not_leave_its_directory(tmp_path, name):
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
  with pytest.raises(reader.ReaderError) as e:
    reader.weight_files(tmp_path, allow_pickle=False)
  assert str(e.value) == (f"{tmp_path}/model.safetensors.index.json names shard files outside {tmp_path}: "
                          f"[{name!r}]; expected file names inside the checkpoint directory")


def test_vision_config_without_patch_size_is_an_error(fixtures_dir):
  config = json.loads((fixtures_dir / "transformers-4.57.1" / "llava-1.5" / "config.json").read_text())
  assert config["vision_config"]["patch_size"] == 2  # which the fixture conversions read
  del config["vision_config"]["patch_size"]
  with pytest.raises(hf.ConversionError) as e:
    hf.model_config(config, "llava_hf", where="src/config.json")
  assert str(e.value) == ("src/config.json vision_config has no patch_size: these decide the vision tower's shapes, "
                          "so they are not filled with defaults; add them as the source model has them")


def test_input_longer_than_the_context_is_an_error():
  """A prompt past model.llm.max_len gave garbage with exit 0; now it names the lengths (checked before any
  compile)."""
  from m3_jax.configs import base
  from m3_jax.models import llava
  from m3_jax.models.config import ModelConfig
  cfg = ModelConfig.from_config(base.load("tiny").model)   # max_len 1024
  shapes = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.key(0)))
  engine = Engine(cfg, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  prompt = np.ones(1000, np.int32)
  prompt[1] = cfg.image_token_id
  visual = np.zeros((36, cfg.llm.width), np.float32)
  with pytest.raises(InputTooLong) as e:
    engine.generate([prompt], [visual], Sampling(max_new_tokens=32))
  assert str(e.value) == ("prompt 0 of the batch is 1035 tokens (999 text + 36 visual) + 32 to generate = 1067, "
                          "over the model's context of 1024 tokens (model.llm.max_len); shorten the prompt, lower "
                          "--max-new-tokens or use a smaller scale")
  with pytest.raises(InputTooLong, match=r"prompt 0 of the batch is 1031 tokens \(1031 text"):  # + continuation
    engine.loglikelihood([np.ones(1030, np.int32)], [np.ones(1, np.int32)], [None])
