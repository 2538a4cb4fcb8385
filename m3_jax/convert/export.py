"""m3 checkpoint (a directory, or a training workdir's step) -> llava-hf directory (config.json, safetensors, tokenizer, preprocessor_config.json).

The weights are written in the llava-hf on-disk layout that transformers 4.5x saves and every later version loads
(`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`,
`image_newline`), in the checkpoint's stored dtype. Tensors are streamed into the files one at a time (the
safetensors header is computed from the mapping table first), in shards of at most `shard_bytes`.

transformers has no Matryoshka pooling: the exported model runs at full scale only.
"""
from __future__ import annotations

import json
import math
import pathlib
import struct

import numpy as np

from m3_jax.checkpoint import m3dir, reader
from m3_jax.convert import hf
from m3_jax.convert.convert import flatten

ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def hf_tensors(cfg, flat_params: dict):
  """Yields (HF name, numpy tensor in the HF orientation), one at a time, in table order."""
  for rule in hf.rules(cfg):
    leaf = flat_params[rule.m3]
    back = hf.TRANSFORMS[rule.transform][1]
    for i, name in enumerate(hf.expand(rule)):
      x = np.asarray(leaf[i] if rule.layers else leaf)
      yield name, np.ascontiguousarray(back(x))


def _planned(cfg, flat_params):
  """[(name, shape, dtype name, nbytes)] without computing any tensor."""
  out = []
  for rule in hf.rules(cfg):
    dtype = str(np.dtype(flat_params[rule.m3].dtype))
    if dtype not in ST_NAMES:
      raise ValueError(f"parameter {rule.m3} has dtype {dtype}: export writes {', '.join(ST_NAMES)}")
    shape = rule.hf_shape()
    nbytes = math.prod(shape) * np.dtype(flat_params[rule.m3].dtype).itemsize
    out += [(name, shape, dtype, nbytes) for name in hf.expand(rule)]
  return out


def write_safetensors(out_dir: pathlib.Path, cfg, flat_params: dict, shard_bytes: int = 4 << 30) -> list[str]:
  plan = _planned(cfg, flat_params)
  shards, cur, size = [], [], 0
  for item in plan:
    if cur and size + item[3] > shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(item)
    size += item[3]
  shards.append(cur)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  tensors = hf_tensors(cfg, flat_params)
  weight_map = {}
  for fname, shard in zip(names, shards):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, nbytes in shard:
      header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = fname
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(out_dir / fname, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for name, shape, dtype, nbytes in shard:
        got_name, x = next(tensors)
        assert got_name == name and tuple(x.shape) == tuple(shape), (got_name, name, x.shape, shape)
        f.write(x.tobytes())
  if len(shards) > 1:
    total = sum(item[3] for item in plan)
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  return names


def export(ckpt_dir, out_dir, shard_bytes: int = 4 << 30, step: int | None = None) -> pathlib.Path:
  """`m3 export --ckpt CKPT [--step N] OUT`: CKPT is an m3 checkpoint directory or a training workdir (its step
  `step`, the latest when None)."""
  from transformers import LlavaConfig, LlavaNextConfig
  ckpt = reader.read_checkpoint(ckpt_dir, step)
  cfg, params = ckpt.config, ckpt.params
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"output directory {out} exists and is not empty: choose a new directory")
  out.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  tokenizer = None
  if m3dir.has_tokenizer(ckpt.tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir)
  if cfg.image_token_id >= cfg.llm.vocab_size:
    cfg, flat = image_token_row(cfg, flat, tokenizer)
  d = hf.hf_config(cfg)
  d.pop("model_type")
  d.pop("pad_token_id", None)
  # (m3's own: the chat template and image aspect the model was trained and evaluated with; `m3 convert` reads
  # them back, transformers keeps them as unknown config attributes)
  d.update(m3_template=ckpt.template, m3_image_aspect=ckpt.aspect)
  config = (LlavaNextConfig if cfg.type == "llava_next" else LlavaConfig)(**d)
  dtypes = {str(x.dtype) for x in flat.values()}
  config.dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
  config.save_pretrained(str(out))
  write_safetensors(out, cfg, flat, shard_bytes)
  pre = ckpt.preprocessor
  if pre is not None:
    pre = dict(pre)
    if cfg.type == "llava_next":  # llava-hf reads (h, w)
      pre.update(image_processor_type="LlavaNextImageProcessor",
                 image_grid_pinpoints=[list(p) for p in hf.hf_pinpoints(cfg)])
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  processor = "LlavaNextProcessor" if cfg.type == "llava_next" else "LlavaProcessor"
  processor_config = {"processor_class": processor, "image_token": IMAGE_TOKEN, "patch_size": cfg.vision.patch_size,
                      "vision_feature_select_strategy": d["vision_feature_select_strategy"],
                      "num_additional_image_tokens": 1}
  (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
  return out


IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64   # llava-hf pads LLaVA's 32000 + <image> to 32064


def image_token_row(cfg, flat: dict, tokenizer):
  """A checkpoint from original LLaVA / M3 has no `<image>` token (LLaVA splices the image in at index -200;
  m3 converts it to image_token_id = vocab_size), and transformers' Llava looks the placeholder up in the embedding.
  As llava-hf's conversion: `<image>` appended to the tokenizer at id vocab_size, the embedding and LM head padded
  to a multiple of 64 rows (the new rows the mean of the old: the placeholder's row is never used, and a padded
  token's logit is the mean logit, never the answer's). Returns (cfg, flat) with the padded vocabulary."""
  import dataclasses
  vocab = cfg.llm.vocab_size
  if tokenizer is None or len(tokenizer) != vocab or IMAGE_TOKEN in tokenizer.get_vocab():
    have = "no tokenizer" if tokenizer is None else f"a tokenizer of {len(tokenizer)} tokens"
    raise ValueError(f"the checkpoint's image placeholder id {cfg.image_token_id} is past its vocabulary of {vocab} "
                     f"and it has {have}: export adds {IMAGE_TOKEN} at id {vocab} to a tokenizer of exactly "
                     f"{vocab} tokens without one, as llava-hf's conversion does")
  from tokenizers import AddedToken
  tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
  assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab
  padded = -(-(vocab + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  embed, head = flat["llm/embed/embedding"], flat["llm/lm_head/kernel"]   # [V, D], [D, V]
  # (means in float32: a bfloat16 sum of 32000 rows loses most of the mean)
  flat = {**flat,
          "llm/embed/embedding": np.concatenate([embed, np.repeat(
              embed.astype(np.float32).mean(0, keepdims=True), padded - vocab, 0).astype(embed.dtype)], 0),
          "llm/lm_head/kernel": np.concatenate([head, np.repeat(
              head.astype(np.float32).mean(1, keepdims=True), padded - vocab, 1).astype(head.dtype)], 1)}
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=padded), image_token_id=vocab)
  return cfg, flat
