"""`m3 info --ckpt CKPT [--step N] [--json]`: what a checkpoint is, read without loading its params: architecture,
scales, parameter count, stored dtype, source, chat template, identity and its scale router (if any)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt_pos", nargs="?", default=None, metavar="CKPT", help="alias of --ckpt")
  p.add_argument("--ckpt", default=None, help="m3 checkpoint directory or training workdir")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.epilog = "example:\n  m3 info --ckpt ckpt/llava15-m3\n  m3 info --ckpt runs/demo/train --step 300 --json"


def describe(ckpt: str, step: int | None = None) -> dict:
  """The facts `m3 info` shows, as plain data."""
  from etils import epath

  from m3_jax.checkpoint import m3dir, reader, workdir
  from m3_jax.convert import hf
  path = epath.Path(ckpt)
  cfg = reader.model_config(path)
  if m3dir.is_m3dir(path):
    meta = m3dir.read_meta(path)
    kind, template, source, sums = "m3 checkpoint directory", meta.get("template", "llava_hf"), \
        meta.get("source"), m3dir.read_checksums(path)
    dtype = meta.get("param_dtype")
    home = path
  elif workdir.is_workdir(path):
    run = workdir.read_config(path)
    step = workdir.resolve_step(path, step)
    init = run.get("checkpoint", {}).get("init_from") or None
    kind, template, source = "training workdir", run["data"]["template"], {"trained_by": "m3 train", "init_from": init}
    sums = workdir.params_checksums(path, step)
    dtype = None
    home = path / workdir.CHECKPOINTS / str(step)
  else:
    raise FileNotFoundError(f"{ckpt} is neither an m3 checkpoint directory ({m3dir.CONFIG}) nor a training workdir "
                            f"({workdir.CONFIG} + {workdir.CHECKPOINTS}/)")
  if sums is not None:  # the stored dtypes, from the checksums recorded at save time ("DTYPE:HEX")
    dtypes = sorted({v.split(":")[0] for v in sums.values()})
    dtype = dtypes[0] if len(dtypes) == 1 else dtypes
  router = home / "router"
  return {
      "path": str(path), "kind": kind, "step": step if kind == "training workdir" else None,
      "type": cfg.type, "scales": list(cfg.m3.scales), "pool": cfg.m3.pool, "pool_position": cfg.m3.pool_position,
      "parameters": hf.count(cfg), "param_dtype": dtype, "compute_dtype": cfg.dtype, "template": template,
      "llm": {"depth": cfg.llm.depth, "width": cfg.llm.width, "heads": cfg.llm.heads, "kv_heads": cfg.llm.kv_heads,
              "vocab_size": cfg.llm.vocab_size},
      "vision": {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                 "depth": cfg.vision.depth, "width": cfg.vision.width},
      "source": source, "identity": reader.identity(path, step),
      "router": _router(router) if router.exists() else None,
  }


def _router(folder) -> dict:
  """A router folder: its path and the content of every JSON file in it (its metadata), by file name."""
  return {"path": str(folder), **{f.name: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}}


def run(args: argparse.Namespace) -> int:
  from m3_jax.cli import checks
  from m3_jax.errors import BadValue
  ckpt = args.ckpt or args.ckpt_pos
  if ckpt is None:
    raise BadValue("give the checkpoint: m3 info --ckpt CKPT")
  checks.checkpoint(ckpt)
  info = describe(ckpt, args.step)
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  llm, vis = info["llm"], info["vision"]
  rows = [("checkpoint", f"{info['path']} ({info['kind']}" + (f", step {info['step']})" if info["step"] is not None
                                                               else ")")),
          ("model", f"{info['type']}: LLM {llm['depth']} layers x {llm['width']} ({llm['heads']} heads, "
                    f"{llm['kv_heads']} kv), vocab {llm['vocab_size']}; vision {vis['image_size']}px / "
                    f"patch {vis['patch_size']}, {vis['depth']} layers x {vis['width']}"),
          ("scales", ", ".join(map(str, info["scales"])) + f" ({info['pool']} pooling, {info['pool_position']})"),
          ("parameters", f"{info['parameters']:,}"),
          ("dtype", f"stored {info['param_dtype']}, compute {info['compute_dtype']}"),
          ("template", info["template"]),
          ("source", json.dumps(info["source"])),
          ("identity", info["identity"]),
          ("router", info["router"]["path"] if info["router"] else "none (`m3 router fit` makes one)")]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  return 0
