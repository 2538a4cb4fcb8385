"""A training workdir's step -> an m3 checkpoint directory (`m3 convert WORKDIR OUT [--step N]`).

The step's params are read and verified against their save-time checksums, and written unchanged (the stored
dtype, unless `--dtype` names another: floating params are cast to it) with the run's tokenizer (`tokenizer/`),
`preprocessor_config.json`, chat template and image aspect, so the directory loads like any converted checkpoint
and, in the stored dtype, has the same identity as the workdir step (checkpoint.reader.identity).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from etils import epath

from m3_jax.checkpoint import m3dir, reader, workdir as workdir_lib


def to_m3dir(workdir: str | epath.PathLike, out: str | epath.PathLike, step: int | None = None,
             dtype: str | None = None) -> epath.Path:
  """Writes `workdir`'s checkpoint `step` (the latest when None) as the m3 checkpoint directory `out`, its floating
  params cast to `dtype` when given (as `m3 convert --dtype`)."""
  step = workdir_lib.resolve_step(workdir, step)
  ckpt = reader.read_checkpoint(workdir, step)
  tokenizer = ckpt.tokenizer_dir if m3dir.has_tokenizer(ckpt.tokenizer_dir) else None
  params = ckpt.params
  if dtype is not None:
    to = jnp.dtype(dtype)
    params = jax.tree.map(lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != to
                          else a, params)
  return m3dir.save(out, ckpt.config, params, tokenizer_src=tokenizer, preprocessor_cfg=ckpt.preprocessor,
                    template=ckpt.template, image_aspect=ckpt.aspect,
                    source={"format": "m3-workdir", "workdir": str(workdir), "step": int(step)})
