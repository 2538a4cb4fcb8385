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
LLaVA-NeXT (model.type="llava_next": `Preprocess.grid_pinpoints` set) instead:
  pixels    float32[B, C, H, W, 3]  each row's anyres crops (m3_jax.data.anyres, inference's preprocessing): the
                                  base, the grid crops, then zero crops up to C, the smallest crop bucket holding
                                  the batch's most crops (`crop_buckets`, default every count the pinpoints give)
  anyres_index_{s} int32[B, N_s]  per trained scale s: the packing plan (data.anyres.training_index), N_s =
                                  geometry.bucket_tokens(C, s): a function of C, so the programs compiled are
                                  (text buckets) x (crop buckets) x (label budgets)
Truncation counts a NeXT sample's own visual tokens at its largest scale (base, unpadded grid, newlines).
Record ids stay out of the batch (strings are not device arrays); `Example.id` carries them to the batcher's log.

The iterator is grain's `DatasetIterator`: `get_state()` / `set_state()` make a resumed run see exactly the batches
it would have seen. `m3_jax.sharding.shard_batch(batch, mesh)` assembles the global batch's jax.Arrays on a mesh.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Sequence

import grain
import numpy as np
from etils import epath

from m3_jax import geometry
from m3_jax.data import anyres as anyres_lib
from m3_jax.data import conversation as cv
from m3_jax.data import image as image_lib
from m3_jax.data import sources
from m3_jax.data.errors import BadRecord
from m3_jax.errors import BadFile, BadValue
from m3_jax.labels import IGNORE

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
  scales: tuple[int, ...] = ()   # the trained scales (NeXT: a packing plan per scale)
  aspect: str = "pad"
  labels: str = "exact"
  max_pixels: int = image_lib.DEFAULT_MAX_PIXELS
  grid_pinpoints: tuple = ()          # LLaVA-NeXT: anyres crops when set (model.anyres.grid_pinpoints)
  pinpoint_order: str = "hw"
  crop_buckets: tuple[int, ...] = ()  # NeXT: crop counts a batch pads to (() = every count the pinpoints give)
  max_label_tokens: int = 0           # train.max_label_tokens: a record with more labelled tokens is a bad record

  def __post_init__(self):
    if self.grid_pinpoints:
      crop = self.image_cfg.output_size[0]
      try:
        counts = geometry.crop_counts(self.grid_pinpoints, self.pinpoint_order, crop)
      except geometry.AnyresError as e:
        raise geometry.AnyresError(f"model.anyres.grid_pinpoints={[list(p) for p in self.grid_pinpoints]}: "
                                   f"{e}") from None
      self.crop_buckets = tuple(sorted(int(c) for c in self.crop_buckets)) or counts

  def __call__(self, rec: dict) -> dict:
    try:
      ex = self.example(rec)
      if self.max_label_tokens and (labelled := int((ex["labels"] != IGNORE).sum())) > self.max_label_tokens:
        raise BadRecord(ex["id"], f"{labelled} labelled tokens, more than train.max_label_tokens="
                        f"{self.max_label_tokens} (logits are computed at that many labelled positions per row; "
                        "raise it, or 0 = chosen per batch)")
      return ex
    except BadRecord as e:
      return {"_bad": e.record_id, "_problem": e.problem}

  def example(self, rec: dict) -> dict:
    rid = rec.get("id", "?")
    if rec.get("_problem"):
      raise BadRecord(rid, rec["_problem"])
    img = rec.get("image")
    has_image = img is not None
    if self.grid_pinpoints:
      return self.next_example(rec, rid, img)
    tok = cv.tokenize_conversation(rec.get("conversations"), self.tokenizer, template=self.template,
                                   image_token_id=self.image_token_id, has_image=has_image,
                                   max_length=self.max_length, max_scale=self.max_scale, labels=self.labels,
                                   record_id=rid)
    h, w = self.image_cfg.output_size
    if has_image:
      try:  # uint8: Collate normalises
        pixels = image_lib.resize_crop(self.load(img, rid), self.image_cfg, aspect=self.aspect,
                                       max_pixels=self.max_pixels)
      except image_lib.ImageError as e:
        raise BadRecord(rid, str(e)) from None
    else:
      pixels = np.zeros((h, w, 3), np.uint8)
    return {"id": rid, "input_ids": tok.input_ids, "labels": tok.labels, "pixels": pixels, "truncated": tok.truncated,
            "has_image": np.bool_(has_image)}


  def load(self, img, rid: str):
    try:
      return image_lib.to_rgb(_as_pil(img)) if isinstance(img, np.ndarray) else \
          image_lib.load_image(img, max_pixels=self.max_pixels, name=str(img) if isinstance(img, str) else rid)
    except image_lib.ImageError as e:
      raise BadRecord(rid, str(e)) from None

  def next_example(self, rec: dict, rid: str, img) -> dict:
    """A LLaVA-NeXT example: its anyres crops (float32[1 + rows*cols, S, S, 3]) and image size; the text is
    truncated counting the image's own visual tokens at the largest scale."""
    h, w = self.image_cfg.output_size
    crops, hw, visual = np.zeros((1, h, w, 3), np.float32), (0, 0), 1
    if img is not None:
      crops, hw = anyres_lib.anyres_crops(self.load(img, rid), self.image_cfg, self.grid_pinpoints,
                                          self.pinpoint_order)
      rows, cols = geometry.grid_shape(hw, self.grid_pinpoints, self.pinpoint_order, h)
      if len(crops) > self.crop_buckets[-1]:
        raise BadRecord(rid, f"image (h, w) = {hw} gives {len(crops)} crops (a {rows}x{cols} grid and the base), "
                        f"more than the largest crop bucket {self.crop_buckets[-1]} (data.crop_buckets="
                        f"{list(self.crop_buckets)})")
      visual = geometry.visual_tokens(hw, self.max_scale, self.grid_pinpoints, self.pinpoint_order, h)
      if self.max_length is not None and visual > self.max_length:
        raise BadRecord(rid, f"image (h, w) = {hw} ({rows}x{cols} crops) takes {visual} visual tokens at scale "
                        f"{self.max_scale}, more than data.max_length {self.max_length} before any text")
    tok = cv.tokenize_conversation(rec.get("conversations"), self.tokenizer, template=self.template,
                                   image_token_id=self.image_token_id, has_image=img is not None,
                                   max_length=self.max_length, max_scale=visual, labels=self.labels,
                                   record_id=rid)
    return {"id": rid, "input_ids": tok.input_ids, "labels": tok.labels, "crops": crops.astype(np.float32),
            "truncated": tok.truncated,
            "image_hw": np.asarray(hw, np.int32), "has_image": np.bool_(img is not None)}


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
  anyres: dict | None = None   # NeXT: grid_pinpoints, order, crop, scales, crop_buckets (see `next_pixels`)

  def __call__(self, examples: Sequence[dict]) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    t = next((b for b in self.buckets if b >= longest), None)
    if t is None:
      raise ValueError(f"example of {longest} tokens exceeds the largest bucket {self.buckets[-1]} "
                       "(truncation should have prevented this)")
    b = len(examples)
    ids = np.full((b, t), self.pad_id, np.int32)
    labels = np.full((b, t), IGNORE, np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, e in enumerate(examples):
      n = len(e["input_ids"])
      ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    has_image = np.array([bool(e["has_image"]) for e in examples])
    if self.anyres:
      visual = next_pixels(examples, **self.anyres)
    else:
      pixels = image_lib.normalize(np.stack([e["pixels"] for e in examples]), self.image_cfg)
      pixels[~has_image] = 0.0
      visual = {"pixels": pixels}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **visual, "has_image": has_image,
            **({"id": np.array([e["id"] for e in examples])} if self.keep_ids else {})}


def next_pixels(examples: Sequence[dict], *, grid_pinpoints, order: str, crop: int, scales, crop_buckets
                ) -> dict[str, np.ndarray]:
  """NeXT examples -> {"pixels": float32[B, C, S, S, 3], "anyres_index_{s}": int32[B, N_s] per scale}."""
  most = max(len(e["crops"]) for e in examples)
  c = next((b for b in crop_buckets if b >= most), None)
  if c is None:
    raise ValueError(f"an example of {most} crops exceeds the largest crop bucket {crop_buckets[-1]} "
                     "(the preprocessing should have rejected it)")
  pixels = np.zeros((len(examples), c, *examples[0]["crops"].shape[1:]), np.float32)
  for i, e in enumerate(examples):
    if e["has_image"]:
      pixels[i, :len(e["crops"])] = e["crops"]
  out = {"pixels": pixels}
  for s in scales:
    n = geometry.bucket_tokens(c, s, grid_pinpoints, order, crop)
    out[f"anyres_index_{s}"] = np.stack([
        anyres_lib.training_index(tuple(e["image_hw"]) if e["has_image"] else None, s, c, n, grid_pinpoints,
                                  order, crop) for e in examples])
  return out


class BadRecords:
  """The main-process filter for `on_bad_record`: raise naming the record, or skip counting and logging once.

  Skipping, a source whose records are all bad would be repeated and filtered forever: with `num_records` (the
  source's length, split over `process_count` processes) known, 2 * ceil(num_records / process_count) - 1 bad
  records in a row (a window that holds a whole epoch of this process's share, wherever it starts, resumed runs
  included) raise BadFile naming the count and the first of them.

  `report` (a JSON-lines file, e.g. WORKDIR/bad_records.jsonl): each skipped record's {"id", "problem"} is appended
  once; the ids already there (an earlier run of this workdir) are not written again."""

  def __init__(self, mode: str, num_records: int | None = None, process_count: int = 1, name: str = "the source",
               report: epath.PathLike | None = None):
    if mode not in ("raise", "skip"):
      raise ValueError(f"on_bad_record={mode!r} is not 'raise' or 'skip'")
    self.mode = mode
    self.report = epath.Path(report) if report is not None else None
    self.seen: dict[str, str] = {}
    if self.report is not None and self.report.exists():
      text = self.report.read_text()
      self.seen = dict(_report_lines(self.report, text))
      whole = "".join(_report_entry(k, v) for k, v in self.seen.items())
      if whole != text:   # blank or cut lines: rewritten whole, so that appending goes on from a line's start
        self.report.write_text(whole)
    self.skipped = 0
    self.truncated: set[str] = set()   # ids of records trained on with their end cut at data.max_length
    self.num_records, self.process_count, self.name = num_records, process_count, name
    self.limit = 2 * max(1, math.ceil(num_records / process_count)) - 1 if num_records else 0
    self.in_a_row, self.first = 0, ("", "")

  def __call__(self, ex: dict) -> bool:
    if "_bad" not in ex:
      self.in_a_row = 0
      if ex.get("truncated") and ex["id"] not in self.truncated:  # trained on, but not whole: said once per id
        self.truncated.add(ex["id"])
        log.warning("record %s is longer than data.max_length: its end is cut (the labels kept are trained on)",
                    ex["id"])
      return True
    if self.mode == "raise":
      raise BadRecord(ex["_bad"], ex["_problem"] + " (set data.on_bad_record='skip' to train without it)")
    self.skipped += 1
    if ex["_bad"] not in self.seen:
      self.seen[ex["_bad"]] = ex["_problem"]
      log.warning("skipping bad record %s: %s", ex["_bad"], ex["_problem"])
      if self.report is not None:
        with self.report.open("a") as f:
          f.write(_report_entry(ex["_bad"], ex["_problem"]))
    if self.in_a_row == 0:
      self.first = (ex["_bad"], ex["_problem"])
    self.in_a_row += 1
    if self.limit and self.in_a_row >= self.limit:
      raise BadFile(self._nothing_to_train())
    return False

  def _nothing_to_train(self) -> str:
    first = f"first: record {self.first[0]}: {self.first[1]}"
    if self.process_count == 1:
      return (f"all {self.num_records} records of {self.name} were bad ({first}); data.on_bad_record='skip' "
              "leaves nothing to train on")
    return (f"{self.in_a_row} records of {self.name} in a row were bad on this process, a whole epoch of its share "
            f"({self.num_records} records over {self.process_count} processes; {first}); "
            "data.on_bad_record='skip' leaves it nothing to train on")


def _report_entry(record_id: str, problem: str) -> str:
  return json.dumps({"id": record_id, "problem": problem}) + "\n"


def _report_lines(path: epath.Path, text: str):
  """(id, problem) of each whole line of a bad-records report `text`; a blank line, or a last line cut by a kill in
  the middle of its write, is passed over (that record is reported again when it comes round)."""
  for line in text.splitlines():
    try:
      r = json.loads(line)
      yield r["id"], r["problem"]
    except (json.JSONDecodeError, KeyError, TypeError):
      if line.strip():
        log.warning("%s: passing over a line that is not a whole report entry: %.80s", path, line)


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
                 bad_records: BadRecords | None = None, keep_ids: bool = False, name: str = "") -> grain.IterDataset:
  """The pipeline as a grain IterDataset; `iter(ds)` is the checkpointable iterator. `batch_size` is host-local.
  `name` names the source in errors (e.g. "data.path=train.json"); a source without records is a BadFile."""
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  name = name or f"the {type(source).__name__} source"
  if len(source) == 0:
    raise BadFile(f"{name} has no records; expected at least one to train on")
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
  it = it.filter(bad_records or BadRecords(on_bad_record, len(source) if num_epochs is None else None, pc, name))
  anyres = None
  if preprocess.grid_pinpoints:   # NeXT: a sample's text may fill what its image leaves of max_length
    anyres = dict(grid_pinpoints=preprocess.grid_pinpoints, order=preprocess.pinpoint_order,
                  crop=preprocess.image_cfg.output_size[0], scales=preprocess.scales,
                  crop_buckets=preprocess.crop_buckets)
  if buckets is None:
    text = (preprocess.max_length or 2048) - (0 if anyres else preprocess.max_scale - 1)
    buckets = default_buckets(text, n=5 if anyres else 3)   # NeXT: text is what the image leaves, often short
    # A text-only record may fill all of max_length (no visual tokens to leave room for): its own bucket.
    buckets = tuple(sorted({*buckets, preprocess.max_length or 2048}))
  if pc > 1:
    # Each host collates its own rows, and the hosts' arrays form one global batch of one shape: a bucket chosen
    # per host would differ between hosts (different shapes, different programs, hung collectives). Several
    # processes pad to the largest text and crop bucket (one program; the padding costs compute).
    buckets = (max(buckets),)
    if anyres:
      anyres["crop_buckets"] = (max(anyres["crop_buckets"]),)
  collate = Collate(tuple(sorted(buckets)), pad_id, preprocess.image_cfg, keep_ids, anyres)
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
    from etils import epath
    path = d.path or str(epath.Path(workdir or ".") / "probe")  # gs://... stays a URL (pathlib would make gs:/)
    n = int(d.get("probe_size", 0) or 0)   # train examples (validation, test: n // 10)
    seed, families, aspects = int(d.get("seed", 0)), d.get("probe_families", "binding"), d.get("probe_aspects", "1:1")
    if n:
      sizes = dict(train=n, validation=max(1, n // 10), test=max(1, n // 10))
    else:  # 0: the probe already built there (`m3 data probe --train N`), else the default sizes
      from m3_jax.data import probe
      sizes = probe.built_sizes(path, seed=seed, family_set=families, aspects=aspects)  # gs:// included
    return sources.Probe(path, split, seed=seed, sizes=sizes, family_set=families, aspects=aspects)
  if d.source == "llava_json":
    return sources.LlavaJson(d.path, d.image_folder, follow_symlinks=bool(d.get("follow_symlinks", False)))
  if d.source == "tfds":
    name, _, data_dir = d.path.partition("@")  # "name[:version]@data_dir"
    return sources.Tfds(name, split, data_dir or None)
  raise ValueError(f"data.source={d.source!r} is not 'probe', 'llava_json', 'tfds' (or 'synthetic' in train)")


def preprocess_for(config, tokenizer) -> Preprocess:
  m, d = config.model, config.data
  scales = tuple(int(s) for s in (config.train.get("scales", ()) or m.m3.scales))
  anyres = {}
  if m.type == "llava_next":
    if not m.anyres.grid_pinpoints:
      raise BadValue("model.type='llava_next' with model.anyres.grid_pinpoints empty: LLaVA-NeXT needs its "
                     "anyres grid pinpoints (e.g. llava-v1.6's [[336, 672], [672, 336], [672, 672], [1008, 336], "
                     "[336, 1008]])")
    anyres = dict(grid_pinpoints=tuple(tuple(int(x) for x in p) for p in m.anyres.grid_pinpoints),
                  pinpoint_order=str(m.anyres.pinpoint_order),
                  crop_buckets=tuple(int(c) for c in d.get("crop_buckets", ()) or ()))
  return Preprocess(tokenizer=tokenizer, image_cfg=image_lib.ImageProcessorConfig.for_size(int(m.vision.image_size)),
                    image_token_id=int(m.image_token_id), template=d.template, max_length=int(d.max_length),
                    max_scale=max(scales), scales=scales, aspect=d.get("image_aspect", "pad"),
                    max_label_tokens=int(config.train.get("max_label_tokens", 0) or 0), **anyres)


def train_iterator(config, workdir: str | pathlib.Path | None = None, *, split: str = "train"):
  """Host-local training batches for `m3 train` (checkpointable: get_state / set_state).

  Writes the tokenizer and `preprocessor_config.json` into `workdir` (once) so checkpoints can carry them.
  """
  import jax
  tokenizer = tokenizer_for(config)
  pre = preprocess_for(config, tokenizer)
  if workdir is not None and jax.process_index() == 0:
    from m3_jax.checkpoint import workdir as workdir_lib
    workdir_lib.write_processor(workdir, tokenizer, pre.image_cfg.to_dict())
  bs = int(config.train.batch_size)
  if bs % jax.process_count():
    raise ValueError(f"train.batch_size {bs} does not split over {jax.process_count()} processes")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(config.model.pad_token_id)
  source = source_for(config, workdir, split)
  name = f"data.source={config.data.source}" + (f" data.path={config.data.path}" if config.data.path else "")
  mode, pc = config.data.get("on_bad_record", "raise"), jax.process_count()
  report = None
  if workdir is not None and mode == "skip":  # the skipped records' ids, kept beside the run
    report = epath.Path(workdir) / ("bad_records.jsonl" if pc == 1 else
                                    f"bad_records.process_{jax.process_index()}.jsonl")
  ds = make_dataset(source, pre, batch_size=bs // pc, seed=int(config.data.get("seed", 0)), pad_id=int(pad),
                    num_workers=int(config.data.get("num_workers", 0)), on_bad_record=mode, name=name,
                    bad_records=BadRecords(mode, len(source), pc, name, report))
  return iter(ds)

