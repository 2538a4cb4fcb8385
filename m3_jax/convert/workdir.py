"""A training workdir's step -> an m3 checkpoint directory (`m3 convert WORKDIR OUT [--step N]`).

The step's params are read and verified against their save-time checksums, and written unchanged (the stored
dtype) with the run's tokenizer (`tokenizer/`), `preprocessor_config.json`, chat template and image aspect, so the
directory loads like any converted checkpoint and has the same identity as the workdir step
(checkpoint.reader.identity).
"""
from __future__ import annotations

from etils import epath

from m3_jax.checkpoint import m3dir, reader, workdir as workdir_lib


def to_m3dir(workdir: str | epath.PathLike, out: str | epath.PathLike, step: int | None = None) -> epath.Path:
  """Writes `workdir`'s checkpoint `step` (the latest when None) as the m3 checkpoint directory `out`."""
  step = workdir_lib.resolve_step(workdir, step)
  ckpt = reader.read_checkpoint(workdir, step)
  tokenizer = ckpt.tokenizer_dir if m3dir.has_tokenizer(ckpt.tokenizer_dir) else None
  return m3dir.save(out, ckpt.config, ckpt.params, tokenizer_src=tokenizer, preprocessor_cfg=ckpt.preprocessor,
                    template=ckpt.template, image_aspect=ckpt.aspect,
                    source={"format": "m3-workdir", "workdir": str(workdir), "step": int(step)})
