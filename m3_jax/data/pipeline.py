"""The grain input pipeline: records -> shuffled, host-sharded, preprocessed, padded batches.

  source --shuffle(seed), repeat (reshuffled each epoch)--> [process_index::process_count]
         --preprocess + tokenize (in `num_workers` processes)--> drop/raise bad records (main process)
         --batch, pad to the smallest bucket length--> prefetch --> host-local numpy batches

Batch (host-local rows = global batch / process_count):
  input_ids int32[B, T]   one placeholder (model.image_token_id) per image-bearing sample, padded with pad id
  labels    int32[B, T]   -100 = not trained
  attention_mask int32[B, T]
  pixels    float32[B, H, W, 3]   CLIP-normalised (zeros for text-only samples; workers ship uint8, the batcher
                                  normalises)
  has_image bool[B]
Record ids stay out of the batch (strings are not device arrays); `Example.id` carries them to the batcher's log.

The iterator is grain's `DatasetIterator`: `get_state()` / `set_state()` make a resumed run see exactly the batches
it would have seen. `global_batch(batch, mesh)` assembles the jax.Arrays of the global batch on a mesh.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any, Sequence

import grain
import numpy as np

from m3_jax.data import conversation as cv
from m3_jax.data import image as image_lib
from m3_jax.data import sources
from m3_jax.data.errors import BadRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Preprocess:
  """record -> example dict (or a {"_bad": id, "_problem": ...} marker; workers never raise)."""
  tokenizer: Any
  image_cfg: image_lib.ImageProcessorConfig
  image_token_id: int
  template: str = "vicuna_v1"
  max_length: int | None = None
  max_scale: int = 1
  aspect: str = "pad"
  labels: str = "exact"
  max_pixels: int = image_lib.DEFAULT_MAX_PIXELS

  def __call__(self, rec: dict) -> dict:
    try:
      return self.example(rec)
    except BadRecord as e:
      return {"_bad": e.record_id, "_problem": e.problem}

  def example(self, rec: dict) -> dict:
    rid = rec.get("id", "?")
    if rec.get("_problem"):
      raise BadRecord(rid, rec["_problem"])
    img = rec.get("image")
    has_image = img is not None
    tok = cv.tokenize_conversation(rec.get("conversations"), self.tokenizer, template=self.template,
                                   image_token_id=self.image_token_id, has_image=has_image,
                                   max_length=self.max_length, max_scale=self.max_scale, labels=self.labels,
                                   record_id=rid)
    h, w = self.image_cfg.output_size
    if has_image:
      try:
        pil = image_lib.to_rgb(_as_pil(img)) if isinstance(img, np.ndarray) else \
            image_lib.load_image(img, max_pixels=self.max_pixels, name=str(img) if isinstance(img, str) else rid)
      except image_lib.ImageError as e:
        raise BadRecord(rid, str(e)) from None
      pixels = image_lib.resize_crop(pil, self.image_cfg, aspect=self.aspect)   # uint8: normalised by Collate
    else:
      pixels = np.zeros((h, w, 3), np.uint8)
    return {"id": rid, "input_ids": tok.input_ids, "labels": tok.labels, "pixels": pixels,
            "has_image": np.bool_(has_image)}


def _as_pil(a: np.ndarray):
  from PIL import Image
  if a.dtype != np.uint8 or a.ndim not in (2, 3):
    raise image_lib.ImageError(f"image array must be uint8[H, W(, C)], got {a.dtype}{list(a.shape)}")
  return Image.fromarray(a)


@dataclasses.dataclass
class Collate:
  """Pads a list of examples to the smallest bucket length that holds the longest one; normalises the pixels
  (workers ship uint8; text-only rows get zeros)."""
  buckets: tuple[int, ...]
  pad_id: int
  image_cfg: image_lib.ImageProcessorConfig
  keep_ids: bool = False   # adds "id": str[B] (for tests and reports; not a device array)

  def __call__(self, examples: Sequence[dict]) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    t = next((b for b in self.buckets if b >= longest), None)
    if t is None:
      raise ValueError(f"example of {longest} tokens exceeds the largest bucket {self.buckets[-1]} "
                       "(truncation should have prevented this)")
    b = len(examples)
    ids = np.full((b, t), self.pad_id, np.int32)
    labels = np.full((b, t), cv.IGNORE, np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, e in enumerate(examples):
      n = len(e["input_ids"])
      ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    has_image = np.array([bool(e["has_image"]) for e in examples])
    pixels = image_lib.normalize(np.stack([e["pixels"] for e in examples]), self.image_cfg)
    pixels[~has_image] = 0.0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixels": pixels, "has_image": has_image,
            **({"id": np.array([e["id"] for e in examples])} if self.keep_ids else {})}


class BadRecords:
  """The main-process filter for `on_bad_record`: raise naming the record, or skip counting and logging once."""

  def __init__(self, mode: str):
    if mode not in ("raise", "skip"):
      raise ValueError(f"on_bad_record={mode!r} is not 'raise' or 'skip'")
    self.mode = mode
    self.seen: dict[str, str] = {}
    self.skipped = 0

  def __call__(self, ex: dict) -> bool:
    if "_bad" not in ex:
      return True
    if self.mode == "raise":
      raise BadRecord(ex["_bad"], ex["_problem"] + " (set data.on_bad_record='skip' to train without it)")
    self.skipped += 1
    if ex["_bad"] not in self.seen:
      self.seen[ex["_bad"]] = ex["_problem"]
      log.warning("skipping bad record %s: %s", ex["_bad"], ex["_problem"])
    return False


def default_buckets(max_text_len: int, n: int = 3, multiple: int = 8) -> tuple[int, ...]:
  """`n` lengths up to `max_text_len` (halving), rounded up to `multiple`: few shapes, so few compilations."""
  out = {max_text_len}
  for k in range(1, n):
    out.add(min(max_text_len, max(multiple, math.ceil(max_text_len / 2 ** k / multiple) * multiple)))
  return tuple(sorted(out))


def make_dataset(source, preprocess: Preprocess, *, batch_size: int, seed: int = 0, num_epochs: int | None = None,
                 shuffle: bool = True, process_index: int | None = None, process_count: int | None = None,
                 buckets: Sequence[int] | None = None, pad_id: int = 0, num_workers: int = 0,
                 prefetch: int = 2, on_bad_record: str = "raise", drop_remainder: bool = True,
                 bad_records: BadRecords | None = None, keep_ids: bool = False) -> grain.IterDataset:
  """The pipeline as a grain IterDataset; `iter(ds)` is the checkpointable iterator. `batch_size` is host-local."""
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs)          # a fresh permutation every epoch
  ds = ds[pi::pc]                     # host shard: disjoint, together every record once per epoch
  ds = ds.map(preprocess)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; `m3` does not parse them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
  it = it.filter(bad_records or BadRecords(on_bad_record))
  if buckets is None:
    text = (preprocess.max_length or 2048) - (preprocess.max_scale - 1)
    buckets = default_buckets(text)
  collate = Collate(tuple(sorted(buckets)), pad_id, preprocess.image_cfg, keep_ids)
  it = it.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
  if prefetch:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  return it


# ---------------------------------------------------------------------------------------- from a run config


def tokenizer_for(config) -> Any:
  """`data.tokenizer` (a directory transformers loads); when empty, the tokenizer of `checkpoint.init_from` (an m3
  checkpoint carries one); with neither, the tiny word-level probe tokenizer."""
  path = config.data.get("tokenizer", "") or config.get("checkpoint", {}).get("init_from", "")
  if path:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
  from m3_jax.data.tokenizer import probe_tokenizer
  return probe_tokenizer()


def source_for(config, workdir: str | pathlib.Path | None = None, split: str = "train"):
  d = config.data
  if d.source == "probe":
    path = d.path or str(pathlib.Path(workdir or ".") / "probe")
    n = int(d.get("probe_size", 0) or 0)   # train examples (validation, test: n // 10); 0 = the default 4000
    sizes = dict(train=n, validation=max(1, n // 10), test=max(1, n // 10)) if n else None
    return sources.Probe(path, split, seed=int(d.get("seed", 0)), sizes=sizes,
                         family_set=d.get("probe_families", "binding"))
  if d.source == "llava_json":
    return sources.LlavaJson(d.path, d.image_folder)
  if d.source == "tfds":
    name, _, data_dir = d.path.partition("@")  # "name[:version]@data_dir"
    return sources.Tfds(name, split, data_dir or None)
  raise ValueError(f"data.source={d.source!r} is not 'probe', 'llava_json', 'tfds' (or 'synthetic' in train)")


def preprocess_for(config, tokenizer) -> Preprocess:
  m, d = config.model, config.data
  scales = tuple(config.train.get("scales", ()) or m.m3.scales)
  return Preprocess(tokenizer=tokenizer, image_cfg=image_lib.ImageProcessorConfig.for_size(int(m.vision.image_size)),
                    image_token_id=int(m.image_token_id), template=d.template, max_length=int(d.max_length),
                    max_scale=max(scales), aspect=d.get("image_aspect", "pad"))


def train_iterator(config, workdir: str | pathlib.Path | None = None, *, split: str = "train"):
  """Host-local training batches for `m3 train` (checkpointable: get_state / set_state).

  Writes the tokenizer and `preprocessor_config.json` into `workdir` (once) so checkpoints can carry them.
  """
  import jax
  tokenizer = tokenizer_for(config)
  pre = preprocess_for(config, tokenizer)
  if workdir is not None and jax.process_index() == 0:
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if not (wd / "preprocessor_config.json").exists():
      pre.image_cfg.to_json(wd / "preprocessor_config.json")
      tokenizer.save_pretrained(str(wd / "tokenizer"))
  bs = int(config.train.batch_size)
  if bs % jax.process_count():
    raise ValueError(f"train.batch_size {bs} does not split over {jax.process_count()} processes")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(config.model.pad_token_id)
  ds = make_dataset(source_for(config, workdir, split), pre, batch_size=bs // jax.process_count(),
                    seed=int(config.data.get("seed", 0)), pad_id=int(pad),
                    num_workers=int(config.data.get("num_workers", 0)),
                    on_bad_record=config.data.get("on_bad_record", "raise"))
  return iter(ds)


def global_batch(batch: dict, mesh, batch_axes=("data", "fsdp")) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over `batch_axes` on the leading dimension."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  out = {}
  for k, v in batch.items():
    spec = P(axes, *([None] * (np.ndim(v) - 1)))
    out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
  return out
