"""A several-scale eval encodes each image once: a chunk of samples is answered at every scale from one encoder
pass, and its answers equal the per-scale path's (tiny random checkpoint)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import evaluator, predictions
from m3_jax.eval.loader import load
from m3_jax.eval.tasks import Sample, Task
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

SCALES = [144, 36, 9, 1]


class Exact(Task):
  name = "exact"

  def samples(self, path):
    raise NotImplementedError

  def score(self, sample, prediction):
    return float(prediction == sample.answers)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
  m3dir.save(ckpt, cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
             template="vicuna_v1")
  return load(ckpt)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
  data = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  out = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out.append(Sample(f"q{i}", "what colour is the picture?", "red", image=str(data / f"{i}.png")))
  out.insert(3, Sample("text", "say something", "hi"))  # a text-only sample inside a chunk
  return out


def count_encoder(monkeypatch, engine) -> dict:
  """Counts the engine's encoder programs: `_visual` (one scale) and `_visual_scales` (every scale at once)."""
  calls = {"_visual": 0, "_visual_scales": 0}
  for name in calls:
    real = getattr(engine, name)

    def counted(*a, _real=real, _name=name, **k):
      calls[_name] += 1
      return _real(*a, **k)
    monkeypatch.setattr(engine, name, counted)
  return calls


def test_tokens_of_every_scale_equal_the_per_scale_encoder(model):
  rng = np.random.default_rng(1)
  pixels = model.pixels([Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(3)])
  together = model.engine.visual_tokens_scales(pixels, SCALES, batch_size=2)
  assert sorted(together) == sorted(SCALES)
  for scale in SCALES:
    alone = model.engine.visual_tokens(pixels, scale, batch_size=2)
    for a, b in zip(together[scale], alone):
      assert a.shape == (scale, model.config.llm.width)
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_chunked_eval_encodes_each_chunk_once_and_answers_as_per_scale(model, samples, tmp_path, monkeypatch):
  calls = count_encoder(monkeypatch, model.engine)
  generate, _ = evaluator.model_functions(model, max_new_tokens=3, batch_size=2, scales=SCALES)
  evaluator.evaluate(generate, Exact(), samples, SCALES, tmp_path, batch_size=2, progress=False)
  # 6 samples in chunks of 2 (one chunk holds the text-only sample, so it encodes one image): 3 encoder passes
  # for 4 scales, where the per-scale path ran 4 x 3.
  assert calls == {"_visual": 0, "_visual_scales": 3}
  got = {(r["question_id"], r["scale"]): r["prediction"]
         for r in predictions.read(tmp_path / predictions.PREDICTIONS)}
  assert len(got) == len(samples) * len(SCALES)
  for scale in SCALES:  # the per-scale path: model.generate encodes at that one scale
    want = model.generate([s.image for s in samples], [s.prompt for s in samples], scale=scale, max_new_tokens=3,
                          batch_size=2)
    assert [got[s.question_id, scale] for s in samples] == [w["text"] for w in want], scale
  assert calls["_visual"] == 4 * 3

  # Resume: a line of q0 and one of q4 lost -> the samples still missing a scale form one chunk, encoded in one
  # pass, and the answers are the same.
  lines = (tmp_path / predictions.PREDICTIONS).read_text().splitlines()
  lost = [next(x for x in lines if json.loads(x)["question_id"] == q) for q in ("q0", "q4")]
  keep = [x for x in lines if x not in lost]
  (tmp_path / predictions.PREDICTIONS).write_text("\n".join(keep) + "\n")
  calls.update(_visual=0, _visual_scales=0)
  generate, _ = evaluator.model_functions(model, max_new_tokens=3, batch_size=2, scales=SCALES)
  evaluator.evaluate(generate, Exact(), samples, SCALES, tmp_path, batch_size=2, progress=False)
  assert calls == {"_visual": 0, "_visual_scales": 1}
  again = predictions.latest(predictions.read(tmp_path / predictions.PREDICTIONS))
  assert {k: v["prediction"] for k, v in again.items()} == got


def test_likelihood_mode_encodes_once_and_picks_as_per_scale(model, samples, tmp_path, monkeypatch):
  mc = [Sample(s.question_id, s.prompt + "\nA. red\nB. blue\nC. green", "A", image=s.image,
               options=["red", "blue", "green"]) for s in samples if s.image][:3]
  calls = count_encoder(monkeypatch, model.engine)
  generate, choose = evaluator.model_functions(model, batch_size=4, likelihood=True, scales=SCALES)
  evaluator.evaluate(generate, Exact(), mc, SCALES, tmp_path, choose=choose, batch_size=4, progress=False)
  assert calls == {"_visual": 0, "_visual_scales": 1}
  got = predictions.latest(predictions.read(tmp_path / predictions.PREDICTIONS))
  for scale in SCALES:
    want = model.choose([s.image for s in mc], [s.prompt for s in mc], [3] * len(mc), scale)
    assert [got[s.question_id, scale]["prediction"] for s in mc] == want, scale
