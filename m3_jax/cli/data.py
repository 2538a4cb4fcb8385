"""`m3 data check` (validate a LLaVA JSON file) and `m3 data probe` (build the granularity probe)."""
from __future__ import annotations

import argparse
import collections
import json
import pathlib

from m3_jax.data.conversation import TEMPLATES


def add_arguments(parser: argparse.ArgumentParser):
  parser.epilog = ("examples:\n  m3 data check llava_v1_5_mix665k.json --image-folder data/\n"
                   "  m3 data probe --out data/probe")
  sub = parser.add_subparsers(dest="data_command", metavar="{check,probe}", help="check | probe")
  sub.required = True
  c = sub.add_parser("check", help="validate a LLaVA JSON file; non-zero exit when any record is bad",
                     description="Counts records and names every bad one (missing/unreadable image, a path that "
                     "escapes the image folder, no or malformed turns, a first turn not from the human, missing or "
                     "extra <image>, an empty answer, and with --tokenizer an answer cut away by truncation).")
  c.add_argument("json_file", metavar="JSON", help="LLaVA JSON file (a list of {id, image?, conversations})")
  c.add_argument("--image-folder", default="", help="folder the 'image' paths are relative to (default: the "
                 "JSON file's folder)")
  c.add_argument("--tokenizer", default="", help="m3 checkpoint, training workdir or tokenizer directory: also "
                 "tokenize every record and check truncation")
  c.add_argument("--max-length", type=int, default=2048, help="training max_length (with --tokenizer)")
  c.add_argument("--max-scale", type=int, default=0, help="visual tokens of the largest trained scale (default: "
                 "from the checkpoint's m3_config.json, else 576); a LLaVA-NeXT checkpoint's images count them per "
                 "crop (base, grid, newlines), as m3 train does")
  c.add_argument("--template", default="vicuna_v1", choices=sorted(TEMPLATES), help="chat template (with --tokenizer)")
  c.add_argument("--follow-symlinks", action="store_true",
                 help="accept images reached through symlinks that leave the image folder (as data.follow_symlinks; "
                      "absolute and '..' paths stay refused)")
  c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  c.set_defaults(_data=run_check)
  p = sub.add_parser("probe", help="build the granularity probe dataset (TFDS, array_record)",
                     description="Builds the procedurally generated granularity probe (see m3_jax/data/probe.py) "
                     "as a TFDS dataset under --out; read it with data.source=probe, data.path=OUT.")
  p.add_argument("--out", required=True, help="TFDS data directory to build into")
  p.add_argument("--seed", type=int, default=0, help="generator seed")
  # Defaults: the probe's DEFAULT_SIZES (read at run time: importing the probe here would slow every `m3 --help`).
  p.add_argument("--train", type=int, default=None, help="train examples, families balanced (default 4000)")
  p.add_argument("--validation", type=int, default=None,
                 help="validation examples, families balanced (default 2000: the router's calibration split)")
  p.add_argument("--test", type=int, default=None, help="test examples, families balanced (default 400)")
  p.add_argument("--families", default="binding", choices=("binding", "presence"),
                 help="binding (default; see m3_jax/data/probe.py) or presence (the first design)")
  p.add_argument("--aspects", default="1:1", help="image aspects W:H, comma-separated, e.g. 1:1,2:1,1:2 (non-square "
                 "images give LLaVA-NeXT models real crop grids; binding families only)")
  p.set_defaults(_data=run_probe)


def run(args) -> int:
  return args._data(args)


def run_probe(args) -> int:
  from m3_jax.cli import checks
  from m3_jax.data import probe
  checks.output_dir(args.out, "--out")
  sizes = {flag: getattr(args, flag) for flag in ("train", "validation", "test") if getattr(args, flag) is not None}
  for flag, n in sizes.items():
    checks.at_least(n, f"--{flag}", 1)
  b = probe.build(args.out, seed=args.seed, sizes=sizes, family_set=args.families, aspects=args.aspects)
  counts = {s: len(b.as_data_source(s)) for s in ("train", "validation", "test")}
  print(json.dumps({"data_dir": str(b.data_dir), "config": b.builder_config.name, "splits": counts}))
  return 0


def _load_tokenizer(path: str):
  from transformers import AutoTokenizer
  from m3_jax.checkpoint import m3dir, workdir
  p = pathlib.Path(path)
  for cand in (p, workdir.tokenizer_dir(p)):
    if m3dir.has_tokenizer(cand):
      return AutoTokenizer.from_pretrained(str(cand))
  raise FileNotFoundError(f"no tokenizer files in {p} or {workdir.tokenizer_dir(p)} (expected what transformers "
                          "save_pretrained writes)")


def check(json_path: str, image_folder: str = "", *, tokenizer=None, max_length: int = 2048,
          max_scale: int = 576, template: str = "vicuna_v1", follow_symlinks: bool = False,
          anyres: dict | None = None) -> dict:
  """Validates every record -> {"records", "with_image", "text_only", "turns", "bad", "bad_records": [...]}.
  `anyres` (LLaVA-NeXT: {"grid_pinpoints", "order", "crop"}): an image counts its own visual tokens at
  `max_scale` per crop (base, unpadded grid, newlines), as `m3 train` truncates, not `max_scale`."""
  from m3_jax import geometry
  from m3_jax.data import conversation as cv
  from m3_jax.data import sources
  from m3_jax.data.errors import BadRecord
  src = sources.LlavaJson(json_path, image_folder, follow_symlinks=follow_symlinks)
  image_id = -200  # LLaVA's IMAGE_TOKEN_INDEX: any id works for counting
  if tokenizer is not None and "<image>" in tokenizer.get_vocab():
    image_id = tokenizer.convert_tokens_to_ids("<image>")
  ids = collections.Counter(str(r.get("id")) for r in src.records if isinstance(r, dict) and "id" in r)
  stats = collections.Counter()
  bad = []
  for i in range(len(src)):
    rec = src[i]
    problems = sources.check_record(rec)
    raw = src.records[i]
    if isinstance(raw, dict) and "id" not in raw:
      problems.append(f"no 'id' (record #{i})")
    elif ids.get(rec["id"], 0) > 1:
      problems.append(f"duplicate id ({ids[rec['id']]} records share it)")
    visual = max_scale
    if not problems and anyres is not None and rec["image"] is not None:
      from PIL import Image
      with Image.open(rec["image"]) as im:
        hw = (im.height, im.width)
      visual = geometry.visual_tokens(hw, max_scale, anyres["grid_pinpoints"], anyres["order"], anyres["crop"])
      if visual > max_length:
        problems.append(f"image (h, w) = {hw} takes {visual} visual tokens at scale {max_scale}, more than "
                        f"--max-length {max_length} before any text")
    if not problems and tokenizer is not None:
      try:
        cv.tokenize_conversation(rec["conversations"], tokenizer, template=template, image_token_id=image_id,
                                 has_image=rec["image"] is not None, max_length=max_length, max_scale=visual,
                                 record_id=rec["id"])
      except BadRecord as e:
        problems.append(e.problem)
    stats["records"] += 1
    has_image = isinstance(raw, dict) and raw.get("image") is not None
    stats["with_image" if has_image else "text_only"] += 1
    convs = rec.get("conversations")
    stats["turns"] += len(convs) if isinstance(convs, list) else 0
    if problems:
      bad.append({"id": rec["id"], "problems": problems})
  return {"records": stats["records"], "with_image": stats["with_image"], "text_only": stats["text_only"],
          "turns": stats["turns"], "bad": len(bad), "bad_records": bad}


def run_check(args) -> int:
  from m3_jax.cli import checks
  checks.existing(args.json_file, "JSON", "file")
  checks.existing(args.image_folder or None, "--image-folder", "dir")
  checks.existing(args.tokenizer or None, "--tokenizer", "dir")
  checks.at_least(args.max_length, "--max-length", 1)
  tokenizer, max_scale, anyres = None, args.max_scale or 576, None
  if args.tokenizer:
    from m3_jax.checkpoint import reader
    tokenizer = _load_tokenizer(args.tokenizer)
    cfg = reader.model_config(args.tokenizer)
    max_scale = args.max_scale or (max(cfg.m3.scales) if cfg is not None else 576)
    if cfg is not None and cfg.type == "llava_next":
      anyres = dict(grid_pinpoints=cfg.anyres.grid_pinpoints, order=cfg.anyres.pinpoint_order,
                    crop=cfg.vision.image_size)
  report = check(args.json_file, args.image_folder, tokenizer=tokenizer, max_length=args.max_length,
                 max_scale=max_scale, template=args.template, follow_symlinks=args.follow_symlinks, anyres=anyres)
  if args.json:
    print(json.dumps(report))
  else:
    print(f"{report['records']} records: {report['with_image']} with an image, {report['text_only']} text-only, "
          f"{report['turns']} turns; {report['bad']} bad")
    for b in report["bad_records"]:
      for p in b["problems"]:
        print(f"  {b['id']}: {p}")
  return 1 if report["bad"] else 0
