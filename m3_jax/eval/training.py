"""Evaluation during training (big_vision style): `train.eval_task` at every trained scale on the current params.

`callback(config, workdir)` -> `on_eval(step, params)` for `train.loop.fit` (cli/train.py joins the two, so train
never imports eval). The samples are read once; the model (tokenizer, image preprocessing, generation engine) is
built once from the run config and gets each evaluation's params in place, so its programs compile once and no
checkpoint is written or read. The scores are `eval/<task>/scale_<N>`: the task's metric (the probe: accuracy).
"""
from __future__ import annotations

import logging
import tempfile
from typing import Callable

import ml_collections
from etils import epath

from m3_jax.checkpoint.reader import Checkpoint
from m3_jax.eval import evaluator
from m3_jax.eval.tasks import get_task
from m3_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


def options(text: str) -> dict[str, str]:
  """`train.eval_options` ("KEY=VALUE,KEY=VALUE") -> the task's options."""
  out = {}
  for item in filter(None, (t.strip() for t in str(text or "").split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"train.eval_options={text!r}: {item!r} is not KEY=VALUE (e.g. split=validation)")
    out[key] = value
  return out


def eval_data(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> str:
  """`train.eval_data`, or the run's own probe folder (data.path, else WORKDIR/probe) when it trains on the probe."""
  if config.train.eval_data:
    return str(config.train.eval_data)
  if config.data.source != "probe":
    raise ValueError(f"train.eval_every={config.train.eval_every} with train.eval_task={config.train.eval_task!r} "
                     f"needs train.eval_data (data.source={config.data.source!r} has no probe folder to default to)")
  return str(config.data.path or epath.Path(workdir) / "probe")


def callback(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> Callable[[int, dict], dict]:
  """-> on_eval(step, params) -> {"eval/<task>/scale_<N>": score} over the scales the run trains."""
  from m3_jax.data import pipeline
  t = config.train
  task = get_task(str(t.eval_task), **options(t.eval_options))
  data = eval_data(config, workdir)
  scales = tuple(int(s) for s in (t.scales or config.model.m3.scales))
  tokenizer = pipeline.tokenizer_for(config)
  preprocessor = pipeline.preprocess_for(config, tokenizer).image_cfg.to_dict()
  model_config = ModelConfig.from_config(config.model).replace(dtype=str(t.dtype), remat="none")
  holder: dict = {}

  def samples():  # read at the first evaluation: the run builds its probe when its data starts
    if "samples" not in holder:
      limit, found = int(t.eval_limit), []
      for s in task.samples(data):
        if limit and len(found) >= limit:
          break
        found.append(s)
      if not found:
        raise ValueError(f"train.eval_task={t.eval_task!r} found no samples in {data}")
      holder["samples"] = found
      log.info("evaluating %s on %d samples of %s at scales %s", task.name, len(found), data,
               ", ".join(map(str, scales)))
    return holder["samples"]

  def model(params):
    if "model" not in holder:
      from m3_jax.eval.loader import M3Model
      holder["tokenizer_dir"] = tempfile.TemporaryDirectory(prefix="m3_eval_tokenizer_")
      tokenizer.save_pretrained(holder["tokenizer_dir"].name)
      ckpt = Checkpoint(model_config, params, str(config.data.template), holder["tokenizer_dir"].name, preprocessor,
                        str(config.data.get("image_aspect", "pad")))
      holder["model"] = M3Model(ckpt, name="the training state")
    holder["model"].engine.params = params  # same shapes and shardings: the compiled programs are reused
    return holder["model"]

  def on_eval(step: int, params) -> dict:
    chosen = samples()
    m = model(params)
    generate, _ = evaluator.model_functions(m, max_new_tokens=int(t.eval_max_new_tokens),
                                            batch_size=min(16, len(chosen)))
    out = {}
    try:
      for scale in scales:
        answers = generate(chosen, scale)
        summary = task.summarize(chosen, {s.question_id: a for s, a in zip(chosen, answers)})
        out[f"eval/{task.name}/scale_{scale}"] = float(summary[task.metric])
    finally:
      m.engine.params = None  # the engine's unscanned copy of the decoder is freed until the next evaluation
    return out

  return on_eval
